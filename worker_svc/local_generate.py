"""The in-process path of ``layerkv generate``: submit every prompt to one engine at once, step it
until all finish (continuous batching), and print the answers in input order."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from typing import TextIO

from common.chat_template import ChatMessage, render_chat, template_of
from common.errors import InvalidArgument
from common.placement import interleaved
from common.types import Placement, SamplingParams
from worker_svc.engine import Engine
from worker_svc.engine_config import EngineConfig


@dataclass(frozen=True)
class PromptSpec:
    """One prompt of a generate run: text or token ids, its sampling, an optional placement."""

    sampling: SamplingParams
    text: str | None = None
    prompt_ids: list[int] | None = None
    placement: str | None = None  # letters, overrides the run's --placement / --gpu-layers


@dataclass
class _Answer:
    index: int
    submitted_s: float
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = ""
    error: str | None = None
    ttft_s: float = 0.0
    latency_s: float = 0.0
    placement: str = ""
    bytes_offloaded: int = 0
    bytes_loaded: int = 0
    preemptions: int = 0  # times preempted by recompute (re-prefilled later)


def run_local(config: EngineConfig, specs: list[PromptSpec], json_output: bool, placement: str | None = None,
              gpu_layers: int | None = None, out: TextIO | None = None, chat: bool = False) -> int:
    """``chat``: each text prompt is one user message, rendered with the model's chat template."""
    stream = out or sys.stdout
    engine = Engine.from_config(config)
    layers = engine.geometry.num_layers
    if gpu_layers is not None and not 0 <= gpu_layers <= layers:
        raise InvalidArgument(f"--gpu-layers must be in [0, {layers}], got {gpu_layers}")
    default = (Placement.from_letters(placement, layers) if placement
               else interleaved(layers, gpu_layers) if gpu_layers is not None else None)
    template = template_of(engine.tokenizer) if chat else None
    if chat and template is None:
        raise InvalidArgument(f"model {config.model!r} has no chat template: drop --chat and send a "
                              f"plain prompt")
    answers: dict[str, _Answer] = {}
    for i, spec in enumerate(specs):
        text = spec.text or ""
        if template is not None and spec.prompt_ids is None:
            text = render_chat(template, [ChatMessage("user", text)])
        ids = spec.prompt_ids if spec.prompt_ids is not None else engine.tokenizer.encode(text)
        chosen = Placement.from_letters(spec.placement, layers) if spec.placement else default
        rid = f"p{i}"
        engine.add_request(rid, ids, spec.sampling, chosen)
        answers[rid] = _Answer(i, time.perf_counter())
    while engine.has_work():
        step = engine.step()
        now = time.perf_counter()
        for rid in step.preempted:
            answers[rid].preemptions += 1
        for o in step.outputs:
            a = answers[o.request_id]
            if not a.token_ids and o.new_token_ids:
                a.ttft_s = now - a.submitted_s
            a.token_ids += o.new_token_ids
            a.placement = o.placement or a.placement
            a.bytes_offloaded += o.bytes_offloaded
            a.bytes_loaded += o.bytes_loaded
            if o.finished:
                a.finish_reason = o.finish_reason.value if o.finish_reason else ""
                a.error, a.latency_s = o.error, now - a.submitted_s
    failed = False
    for a in sorted(answers.values(), key=lambda x: x.index):
        text = engine.tokenizer.decode(a.token_ids)
        failed = failed or a.error is not None
        if json_output:
            record = {"index": a.index, "token_ids": a.token_ids, "text": text,
                      "finish_reason": a.finish_reason, "ttft_s": a.ttft_s, "latency_s": a.latency_s,
                      "placement": a.placement, "preemptions": a.preemptions,
                      "bytes_offloaded": a.bytes_offloaded, "bytes_loaded": a.bytes_loaded}
            if a.error:
                record["error"] = a.error
            stream.write(json.dumps(record) + "\n")
        else:
            stream.write(f"[{a.index}] {text}\n" if not a.error else f"[{a.index}] error: {a.error}\n")
    stream.flush()
    return 1 if failed else 0
