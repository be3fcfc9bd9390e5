"""Our engine against real vLLM's offline engine: prefill and decode tokens/s, side by side in one run.

Both sides load the same saved model folder (``benchmarks/vs_vllm_model.py``) in the same dtype
with one torch thread each. For each batch size B, B prompts of P tokens (the same ids on both
sides) are added together and each generates D tokens, greedy, EOS ignored. Each side's steps are
timed around its own ``step()`` call: prefill = the steps until every request has its first token
(one step: the step budget holds the whole batch on both sides), decode = the rest; decode
tokens/s = B * (D - 1) / decode time. Our ``Engine`` runs in this process; vLLM's ``LLMEngine``
(engine core in-process, its default torch.compile on) runs in the vLLM venv as a child process
(``benchmarks/vllm_offline_child.py``) that takes one job per line, so the two sides alternate
within each repeat and see the same machine load. Figures are the best of ``--repeats``.

    python benchmarks/vs_vllm.py --setup               # once: the vLLM venv at .bench/vllm-venv
    python benchmarks/engine_vs_vllm.py                # large shape (51M), batches 1 and 32
    python benchmarks/engine_vs_vllm.py --model-shape small --repeats 5
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # runnable as `python benchmarks/engine_vs_vllm.py` from anywhere
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks.vllm_offline_child import prompt_ids  # noqa: E402
from benchmarks.vllm_venv import venv_python, vllm_works  # noqa: E402
from benchmarks.vs_vllm_model import ensure_model_folder  # noqa: E402
from benchmarks.vs_vllm_real import vllm_cpu_env  # noqa: E402
from benchmarks.vs_vllm_settings import MODEL_SHAPES, VLLM_BLOCK_TOKENS  # noqa: E402
from common.types import Placement, SamplingParams  # noqa: E402
from worker_svc.engine import Engine, EngineConfig  # noqa: E402

CHILD = REPO / "benchmarks" / "vllm_offline_child.py"


@dataclass(frozen=True)
class Timing:
    """One side's run of one batch."""

    prefill_s: float
    decode_s: float
    prefill_tokens: int
    decode_tokens: int
    first_token_row0: list[int]  # a check that both sides run the same model

    @property
    def prefill_tok_s(self) -> float:
        return self.prefill_tokens / self.prefill_s

    @property
    def decode_tok_s(self) -> float:
        return self.decode_tokens / self.decode_s


def run_ours(engine: Engine, tag: str, batch: int, prompt_len: int, gen_len: int) -> Timing:
    """One batch through our engine, timed per step as the vLLM child times its steps."""
    vocab = engine.model_config.vocab_size
    layers = engine.geometry.num_layers
    params = SamplingParams(max_tokens=gen_len, ignore_eos=True)  # greedy (temperature 0)
    for row in range(batch):
        engine.add_request(f"{tag}-{row}", prompt_ids(row, prompt_len, vocab), params,
                           Placement.all_gpu(layers))
    started: set[str] = set()
    first: list[int] = []
    prefill_s = decode_s = 0.0
    while engine.has_work():
        t0 = time.perf_counter()
        out = engine.step()
        dt = time.perf_counter() - t0
        if len(started) < batch:
            prefill_s += dt
        else:
            decode_s += dt
        for r in out.outputs:
            if r.request_id not in started and r.new_token_ids:
                started.add(r.request_id)
                if r.request_id == f"{tag}-0":
                    first = list(r.new_token_ids[:1])
    return Timing(prefill_s, decode_s, batch * prompt_len, batch * (gen_len - 1), first)


class VllmChild:
    """vLLM's offline engine in the vLLM venv, answering one timing job per line."""

    def __init__(self, venv: Path, model_dir: Path, dtype: str, threads: int, max_num_seqs: int,
                 step_tokens: int, max_model_len: int, vocab_size: int, log_path: Path) -> None:
        opts = {"model": str(model_dir), "dtype": dtype, "block_size": VLLM_BLOCK_TOKENS,
                "max_num_seqs": max_num_seqs, "max_num_batched_tokens": step_tokens,
                "max_model_len": max_model_len, "enable_prefix_caching": False, "seed": 0,
                "threads": threads, "vocab_size": vocab_size}
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen([str(venv_python(venv)), str(CHILD), json.dumps(opts)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                                     env=vllm_cpu_env(threads, kvcache_space_gib=1), text=True)
        self.log_path = log_path
        self.ready = json.loads(self._line("READY").removeprefix("READY "))

    def _line(self, expect: str = "") -> str:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if not expect or line.startswith(expect) or line.startswith("{"):
                return line.strip()
        tail = self.log_path.read_text(errors="replace").splitlines()[-30:]
        raise RuntimeError(f"the vLLM child exited ({self.proc.wait()}); log tail:\n" + "\n".join(tail))

    def run(self, tag: str, batch: int, prompt_len: int, gen_len: int) -> Timing:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"tag": tag, "batch": batch, "prompt_len": prompt_len,
                                          "gen_len": gen_len}) + "\n")
        self.proc.stdin.flush()
        got = json.loads(self._line("{"))
        return Timing(got["prefill_s"], got["decode_s"], batch * prompt_len, got["decode_tokens"],
                      got["first_token_row0"])

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def best(runs: list[Timing]) -> dict[str, float]:
    return {"prefill_tok_s": max(r.prefill_tok_s for r in runs),
            "decode_tok_s": max(r.decode_tok_s for r in runs)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--venv", type=Path, default=REPO / ".bench" / "vllm-venv",
                   help="the vLLM venv (build it with `python benchmarks/vs_vllm.py --setup --venv DIR`)")
    p.add_argument("--model-shape", choices=sorted(MODEL_SHAPES), default="large",
                   help="the random Llama both sides load (default large: 51M parameters)")
    p.add_argument("--model-dir", type=Path, default=None,
                   help="the model folder (default .bench/model-SHAPE)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--batches", default="1,32", help="comma-separated batch sizes (default 1,32)")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens per request (default 128)")
    p.add_argument("--gen-len", type=int, default=32, help="tokens generated per request, >= 2 (default 32)")
    p.add_argument("--block-size", type=int, default=16, help="our tokens per KV block (vLLM's is 32)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each side (default 1)")
    p.add_argument("--repeats", type=int, default=3, help="best of this many runs per figure (default 3)")
    p.add_argument("--out", type=Path, default=REPO / ".bench" / "engine_vs_vllm.json",
                   help="JSON written here")
    args = p.parse_args(argv)
    try:
        args.batch_list = [int(b) for b in args.batches.split(",")]
    except ValueError:
        p.error(f"--batches must be comma-separated integers, got {args.batches!r}")
    if not args.batch_list or min(args.batch_list) < 1:
        p.error(f"--batches must be >= 1, got {args.batches!r}")
    if args.prompt_len < 1 or args.gen_len < 2 or args.repeats < 1 or args.threads < 1:
        p.error("--prompt-len and --repeats and --threads must be >= 1, --gen-len >= 2")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    versions = vllm_works(args.venv)
    if not versions:
        raise SystemExit(f"no working vLLM in {args.venv}: run `python benchmarks/vs_vllm.py --setup "
                         f"--venv {args.venv}` first")
    shape = MODEL_SHAPES[args.model_shape]
    model_dir = ensure_model_folder(args.model_dir or REPO / ".bench" / f"model-{args.model_shape}", shape)
    torch.set_num_threads(args.threads)
    max_batch = max(args.batch_list)
    step_tokens = max(max_batch * args.prompt_len, 2048)  # a whole batch's prefill is one step on both sides
    max_len = args.prompt_len + args.gen_len
    engine = Engine.from_config(EngineConfig(
        model=str(model_dir), device="cpu", dtype=args.dtype, block_size=args.block_size,
        gpu_blocks=max_batch * shape.num_layers * -(-max_len // args.block_size) + shape.num_layers,
        max_num_seqs=max_batch, max_prefill_tokens=step_tokens, max_num_batched_tokens=step_tokens))
    log_path = args.out.with_suffix(".vllm.log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"[engine-vs-vllm] starting vLLM's offline engine (log {log_path}; compiles for a minute or two)",
          flush=True)
    child = VllmChild(args.venv, model_dir, args.dtype, args.threads, max_batch, step_tokens,
                      max_len + VLLM_BLOCK_TOKENS, shape.vocab_size, log_path)
    try:
        run_ours(engine, "warm", 2, 16, 4)
        child.run("warm", 2, 16, 4)
        rows = []
        for b in args.batch_list:
            ours_runs, theirs_runs = [], []
            for rep in range(args.repeats + 1):  # the first of each is a warm-up at this shape
                o = run_ours(engine, f"b{b}-{rep}", b, args.prompt_len, args.gen_len)
                t = child.run(f"b{b}-{rep}", b, args.prompt_len, args.gen_len)
                if rep:
                    ours_runs.append(o)
                    theirs_runs.append(t)
            ours, theirs = best(ours_runs), best(theirs_runs)
            rows.append({"batch": b, "ours": ours, "vllm": theirs,
                         "ratio": {k: ours[k] / theirs[k] for k in ours},
                         "same_first_token": ours_runs[0].first_token_row0 == theirs_runs[0].first_token_row0,
                         "runs": {"ours": [asdict(r) for r in ours_runs],
                                  "vllm": [asdict(r) for r in theirs_runs]}})
            print(f"[engine-vs-vllm] batch {b} done", flush=True)
    finally:
        child.close()
    info = {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "torch_ours": torch.__version__, "vllm_and_torch_of_venv": versions,
            "model_shape": args.model_shape, "parameters": shape.parameters(), "dtype": args.dtype,
            "prompt_len": args.prompt_len, "gen_len": args.gen_len, "threads": args.threads,
            "repeats": args.repeats, "our_block_size": args.block_size, "vllm_block_size": VLLM_BLOCK_TOKENS,
            "command": " ".join(["python benchmarks/engine_vs_vllm.py",
                                 *(sys.argv[1:] if argv is None else argv)])}
    print(f"model {args.model_shape} ({shape.parameters() / 1e6:.1f}M) {args.dtype}, "
          f"prompt {args.prompt_len}, gen {args.gen_len}, {args.threads} thread(s), best of {args.repeats}; "
          f"ours torch {torch.__version__}, vLLM/torch {versions}")
    print("| batch | prefill tok/s ours | vLLM | ratio | decode tok/s ours | vLLM | ratio | same 1st token |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        o, v, q = r["ours"], r["vllm"], r["ratio"]
        print(f"| {r['batch']} | {o['prefill_tok_s']:,.0f} | {v['prefill_tok_s']:,.0f} "
              f"| {q['prefill_tok_s']:.2f} "
              f"| {o['decode_tok_s']:,.0f} | {v['decode_tok_s']:,.0f} | {q['decode_tok_s']:.2f} "
              f"| {'yes' if r['same_first_token'] else 'NO'} |")
    args.out.write_text(json.dumps({"info": info, "rows": rows}, indent=2))
    print(f"[engine-vs-vllm] wrote {args.out}")


if __name__ == "__main__":
    main()
