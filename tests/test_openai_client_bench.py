"""The pure parts of benchmarks/openai_client_bench.py: the two command lines, reading the endpoint
from `layerkv up`'s banner, parsing `vllm bench serve` result JSON and the ours/vLLM table.
No vLLM needed."""

from __future__ import annotations

import json
import math
from pathlib import Path

import httpx
import pytest

from benchmarks.openai_client_bench import our_stack, parse_args
from benchmarks.openai_client_plan import (
    SERVED_NAME,
    ClientRun,
    OurStack,
    bench_argv,
    combined_json,
    comparison_rows,
    our_up_argv,
    parse_result,
    progress_of,
    read_endpoint,
    summary_block,
)
from benchmarks.vs_vllm_settings import KvBudget


def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def _run(**kw: object) -> ClientRun:
    base = dict(venv=Path("/v"), base_url="http://127.0.0.1:9", model_dir=Path("/m"), num_prompts=40,
                request_rate=1.0, input_len=256, output_len=64, result_dir=Path("/out"),
                result_filename="ours.json")
    return ClientRun(**{**base, **kw})  # type: ignore[arg-type]


def test_bench_argv_drives_completions_with_the_workload() -> None:
    argv = bench_argv(_run())
    assert argv[:3] == ["/v/bin/vllm", "bench", "serve"]
    assert _flag(argv, "--backend") == "openai"
    assert _flag(argv, "--base-url") == "http://127.0.0.1:9"
    assert _flag(argv, "--endpoint") == "/v1/completions"
    assert _flag(argv, "--model") == SERVED_NAME
    assert _flag(argv, "--tokenizer") == "/m"
    assert _flag(argv, "--dataset-name") == "random"
    assert (_flag(argv, "--random-input-len"), _flag(argv, "--random-output-len")) == ("256", "64")
    assert (_flag(argv, "--num-prompts"), _flag(argv, "--request-rate")) == ("40", "1.0")
    assert "--ignore-eos" in argv and "--save-result" in argv
    assert (_flag(argv, "--result-dir"), _flag(argv, "--result-filename")) == ("/out", "ours.json")
    assert _flag(argv, "--percentile-metrics") == "ttft,tpot,itl,e2el"


def test_both_servers_get_the_same_client_command_but_url_and_file() -> None:
    a = bench_argv(_run())
    b = bench_argv(_run(base_url="http://127.0.0.1:7", result_filename="vllm.json"))
    differ = [i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y]
    assert [a[i - 1] for i in differ] == ["--base-url", "--result-filename"]


def test_our_up_argv_converts_vllms_kv_cap() -> None:
    budget = KvBudget(vllm_blocks=30, num_layers=8, our_block_size=16)
    argv = our_up_argv("py", OurStack(model_dir=Path("/m"), budget=budget, host_blocks=100, staging_blocks=44,
                                      max_model_len=352, policy="fcfs-full"))
    assert argv[:4] == ["py", "-m", "layerkv", "up"]
    assert _flag(argv, "--model") == "/m" and _flag(argv, "--workers") == "1"
    assert _flag(argv, "--http-port") == "0"
    # 30 vLLM blocks of 32 tokens in every layer = 30 * 2 * 8 per-layer blocks of 16 tokens
    assert (_flag(argv, "--block-size"), _flag(argv, "--gpu-blocks")) == ("16", "480")
    assert _flag(argv, "--served-model-name") == SERVED_NAME
    assert (_flag(argv, "--policy"), _flag(argv, "--max-model-len")) == ("fcfs-full", "352")


BANNER = """LayerKV is up:
  scheduler gRPC     127.0.0.1:40001
  OpenAI API         http://127.0.0.1:40003/v1
  worker-0           127.0.0.1:40004  metrics 127.0.0.1:40005
Try: layerkv generate --endpoint 127.0.0.1:40001 'Hello'
  or any OpenAI client: base_url=http://127.0.0.1:40003/v1 api_key=tok-123
""".splitlines(keepends=True)


def test_read_endpoint_waits_for_the_key_line() -> None:
    assert read_endpoint(BANNER[:3]) is None  # the API line alone is not enough
    endpoint = read_endpoint(BANNER)
    assert endpoint is not None
    assert endpoint.api_url == "http://127.0.0.1:40003/v1" and endpoint.api_key == "tok-123"
    assert endpoint.base_url == "http://127.0.0.1:40003"


def _result(**kw: object) -> str:
    doc: dict[str, object] = {
        "duration": 50.0, "completed": 40, "failed": 0, "total_output_tokens": 2560,
        "request_throughput": 0.8, "output_throughput": 51.2,
        "mean_ttft_ms": 100.0, "median_ttft_ms": 90.0, "p99_ttft_ms": 300.0,
        "mean_tpot_ms": 20.0, "median_tpot_ms": 19.0, "p99_tpot_ms": 40.0,
        "mean_itl_ms": 20.0, "median_itl_ms": 18.0, "p99_itl_ms": 60.0,
        "mean_e2el_ms": 1400.0, "median_e2el_ms": 1300.0, "p99_e2el_ms": 2600.0,
        "errors": ["", ""],
    }
    doc.update(kw)
    return json.dumps(doc)


def test_parse_result_reads_throughput_and_latencies() -> None:
    r = parse_result(_result())
    assert (r.completed, r.failed, r.duration_s) == (40, 0, 50.0)
    assert (r.request_throughput, r.output_throughput) == (0.8, 51.2)
    assert r.latencies_ms["p99_ttft"] == 300.0 and r.latencies_ms["median_e2el"] == 1300.0
    assert len(r.latencies_ms) == 12


def test_parse_result_names_a_missing_figure() -> None:
    doc = json.loads(_result())
    del doc["request_throughput"]
    with pytest.raises(ValueError, match="request_throughput"):
        parse_result(json.dumps(doc))


def test_comparison_rows_are_ours_over_vllm() -> None:
    ours = parse_result(_result(request_throughput=0.6, p99_ttft_ms=600.0, failed=2, completed=38))
    vllm = parse_result(_result())
    rows = {r[0]: r[1:] for r in comparison_rows(ours, vllm)}
    assert rows["request throughput (req/s)"] == ["0.60", "0.80", "0.75"]
    assert rows["p99 TTFT (ms)"] == ["600.00", "300.00", "2.00"]
    assert rows["mean E2E (ms)"][2] == "1.00"
    assert rows["completed / failed requests"][:2] == ["38 / 2", "40 / 0"]


def test_a_figure_one_side_lacks_has_no_ratio() -> None:
    doc = json.loads(_result())
    del doc["p99_itl_ms"]
    rows = {r[0]: r[1:] for r in comparison_rows(parse_result(json.dumps(doc)), parse_result(_result()))}
    assert rows["p99 ITL (ms)"] == ["n/a", "60.00", "n/a"]
    combined = combined_json(parse_result(json.dumps(doc)), parse_result(_result()), {"policy": "layerkv"})
    ratios = combined["ratios_ours_over_vllm"]
    assert isinstance(ratios, dict)
    assert ratios["p99 ITL (ms)"] is None and ratios["mean TTFT (ms)"] == 1.0
    assert json.loads(json.dumps(combined))["policy"] == "layerkv"
    assert not any(isinstance(v, float) and math.isnan(v) for v in ratios.values())


def test_cli_refuses_a_block_size_that_does_not_divide_vllms() -> None:
    with pytest.raises(SystemExit):
        parse_args(["--block-size", "12"])
    assert parse_args(["--num-prompts", "5"]).num_prompts == 5


def test_summary_block_keeps_the_result_and_drops_trailing_noise() -> None:
    log = "\n".join(["Starting main benchmark run...", "============ Serving Benchmark Result ============",
                     "Successful requests:  40", "Mean TTFT (ms):  127.50", "=" * 50,
                     "nanobind: leaked 4 instances!"])
    block = summary_block(log)
    assert block.splitlines()[0].startswith("====") and "Mean TTFT (ms):  127.50" in block
    assert "nanobind" not in block and "Starting" not in block
    failed = "\n".join(f"line {i}" for i in range(40)) + "\nValueError: boom"
    assert summary_block(failed).splitlines()[-1] == "ValueError: boom"  # no block: the tail says why


def test_progress_of_reads_the_latest_tqdm_count() -> None:
    assert progress_of("Starting main benchmark run...") is None
    bar = "  2%|▎         | 1/40 [00:01<00:59,  1.52s/it]  5%|▌         | 2/40 [00:02<00:52,  1.39s/it]"
    assert progress_of(bar) == "2/40"


@pytest.mark.slow
def test_our_stack_starts_layerkv_up_and_yields_a_working_endpoint(tmp_path: Path) -> None:
    # A real `layerkv up` (tiny random preset, so no model folder is needed): the endpoint read from
    # its banner serves the OpenAI API under the served name with the printed key, and only with it.
    stack = OurStack(model_dir=Path("tiny-llama"), budget=KvBudget(4, 2, 16), host_blocks=64,
                     staging_blocks=8, max_model_len=128, policy="layerkv")
    log = tmp_path / "up.log"
    with our_stack(stack, log, timeout_s=240, extra_env={"LAYERKV_CREDENTIALS_DIR": str(tmp_path)}) as ep:
        models = httpx.get(f"{ep.api_url}/models", headers={"Authorization": f"Bearer {ep.api_key}"})
        assert models.status_code == 200, models.text
        assert [m["id"] for m in models.json()["data"]] == [SERVED_NAME]
        assert httpx.get(f"{ep.api_url}/models").status_code == 401
        reply = httpx.post(f"{ep.base_url}/v1/completions", timeout=60,
                           headers={"Authorization": f"Bearer {ep.api_key}"},
                           json={"model": SERVED_NAME, "prompt": "Hi", "max_tokens": 3, "ignore_eos": True})
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] == 3
    with pytest.raises(httpx.HTTPError):  # stopped: nothing listens there any more
        httpx.get(f"{ep.api_url}/models", timeout=2)
    assert "LayerKV is up" in log.read_text()
