"""Real vLLM's side of ``engine_vs_vllm.py``: its offline engine, driven step by step, in the vLLM venv.

Run with the vLLM venv's interpreter (it imports nothing of ours). It builds one ``vllm.LLM`` on
the model folder given in argv[1] (a JSON object of engine options), prints ``READY``, then reads
one JSON job per stdin line (``{"batch", "prompt_len", "gen_len", "tag"}``) and answers each with one
JSON line of timings measured exactly as ours are: prefill = wall time of the steps until every
request has its first token, decode = wall time of the remaining steps, both around
``LLMEngine.step()`` (vLLM's engine core runs in this process, so a step is its whole work).
"""

from __future__ import annotations

import json
import os
import sys
import time


def prompt_ids(row: int, prompt_len: int, vocab: int) -> list[int]:
    """The same deterministic prompt the parent gives our engine (ids 3 and up: no special tokens)."""
    return [3 + (i * 31 + row * 7) % (vocab - 3) for i in range(prompt_len)]


def main() -> None:
    opts = json.loads(sys.argv[1])
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process: timed steps
    import torch
    from vllm import LLM, SamplingParams

    torch.set_num_threads(int(opts.pop("threads")))
    vocab = int(opts.pop("vocab_size"))
    llm = LLM(**opts)
    engine = llm.llm_engine
    print("READY " + json.dumps({"torch_threads": torch.get_num_threads()}), flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        b, p, d = int(job["batch"]), int(job["prompt_len"]), int(job["gen_len"])
        params = SamplingParams(temperature=0.0, max_tokens=d, ignore_eos=True, detokenize=False)
        for row in range(b):
            engine.add_request(f"{job['tag']}-{row}", {"prompt_token_ids": prompt_ids(row, p, vocab)},
                               params)
        started: set[str] = set()
        prefill_s = decode_s = 0.0
        first_tokens: list[int] = []
        while engine.has_unfinished_requests():
            t0 = time.perf_counter()
            outs = engine.step()
            dt = time.perf_counter() - t0
            if len(started) < b:
                prefill_s += dt
            else:
                decode_s += dt
            for out in outs:
                if out.request_id not in started and out.outputs and out.outputs[0].token_ids:
                    started.add(out.request_id)
                    if out.request_id.endswith("-0"):
                        first_tokens = list(out.outputs[0].token_ids[:1])
        print(json.dumps({"prefill_s": prefill_s, "decode_s": decode_s, "decode_tokens": b * (d - 1),
                          "first_token_row0": first_tokens}), flush=True)


if __name__ == "__main__":
    main()
