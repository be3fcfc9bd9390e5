"""``layerkv generate``: run prompts through the engine in this process, or through a running fleet
with ``--endpoint HOST:PORT``. Torch is imported only inside the in-process path."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from common.errors import InvalidArgument, LayerKVError
from common.types import SamplingParams

Opt, Arg = typer.Option, typer.Argument
_SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop_token_ids", "ignore_eos")


def _parse_ids(text: str, what: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x != ""]
    except ValueError as exc:
        raise InvalidArgument(f"{what} must be comma-separated integers, got {text!r}") from exc


def _read_batch(path: Path, defaults: dict[str, Any]) -> list[Any]:
    from worker_svc.local_generate import PromptSpec

    specs = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InvalidArgument(f"{path}:{lineno}: not valid JSON: {exc}") from exc
        if not isinstance(obj, dict) or ("prompt" in obj) == ("prompt_ids" in obj):
            raise InvalidArgument(f"{path}:{lineno}: give exactly one of 'prompt' or 'prompt_ids'")
        unknown = set(obj) - {"prompt", "prompt_ids", "placement", "stop_ids", *_SAMPLING_FIELDS}
        if unknown:
            raise InvalidArgument(f"{path}:{lineno}: unknown fields {sorted(unknown)}")
        fields = dict(defaults)
        fields.update({k: obj[k] for k in _SAMPLING_FIELDS if k in obj})
        if "stop_ids" in obj:
            fields["stop_token_ids"] = obj["stop_ids"]
        fields["stop_token_ids"] = tuple(fields.get("stop_token_ids") or ())
        specs.append(PromptSpec(text=obj.get("prompt"), prompt_ids=obj.get("prompt_ids"),
                                sampling=SamplingParams(**fields), placement=obj.get("placement")))
    if not specs:
        raise InvalidArgument(f"batch file {path} has no prompts")
    return specs


def register(app: typer.Typer) -> None:
    @app.command()
    def generate(
        texts: Annotated[list[str] | None, Arg(help="prompt texts (same as --prompt)")] = None,
        model: Annotated[str, Opt(help="local HF folder, .gguf file, a name (smollm2) or a preset "
                                       "(tiny-llama)")] = "tiny-llama",
        chat: Annotated[bool, Opt("--chat", help="send each text prompt as a user message through the "
                                                  "model's chat template")] = False,
        prompt: Annotated[list[str] | None, Opt(help="a text prompt (repeatable)")] = None,
        prompt_ids: Annotated[str | None, Opt("--prompt-ids", help="one prompt as ids: 1,2,3")] = None,
        batch: Annotated[Path | None, Opt(help="JSON Lines file, one prompt object per line")] = None,
        max_tokens: Annotated[int, Opt(help="tokens to generate per prompt")] = 32,
        temperature: Annotated[float, Opt(help="0 is greedy")] = 0.0,
        top_p: Annotated[float, Opt(help="nucleus mass in (0, 1]")] = 1.0,
        top_k: Annotated[int, Opt(help="0 disables")] = 0,
        seed: Annotated[int | None, Opt(help="sampling seed")] = None,
        stop_ids: Annotated[str | None, Opt("--stop-ids", help="comma-separated stop token ids")] = None,
        ignore_eos: Annotated[bool, Opt(help="keep generating past end-of-sequence")] = False,
        device: Annotated[str, Opt(help="cpu, cuda or auto")] = "cpu",
        dtype: Annotated[str, Opt(help="float32, float16, bfloat16 or auto")] = "float32",
        block_size: Annotated[int, Opt(help="tokens per KV block")] = 16,
        gpu_blocks: Annotated[int | None, Opt(help="GPU-tier KV blocks (default: what fits)")] = None,
        host_blocks: Annotated[int | None, Opt(help="host-tier KV blocks")] = None,
        placement: Annotated[str | None, Opt(help="letters per layer, G (GPU) or H (host): GHGH")] = None,
        gpu_layers: Annotated[int | None, Opt(help="GPU-resident layers, spread through the depth")] = None,
        preemption: Annotated[str, Opt(help="when KV growth finds no room: recompute or swap-layers")] = (
            "recompute"),
        host_access: Annotated[str, Opt(help="host layers: auto (in place on CPU), stream (through staging, "
                                             "as on a GPU) or direct")] = "auto",
        max_num_batched_tokens: Annotated[int, Opt(help="tokens per engine step (prefill chunks)")] = 2048,
        json_output: Annotated[bool, Opt("--json", help="JSON Lines, one per prompt")] = False,
        endpoint: Annotated[str | None, Opt(help="HOST:PORT of a running scheduler")] = None,
        api_token: Annotated[str, Opt(envvar="LAYERKV_API_TOKEN", help="bearer token (--endpoint)")] = "",
        tls_ca: Annotated[str, Opt(envvar="LAYERKV_TLS_CA", help="CA of the scheduler's TLS cert")] = "",
        per_call: Annotated[bool, Opt("--per-call", help="one Generate call per prompt, not one "
                                                         "shared stream (--endpoint; debugging)")] = False,
    ) -> None:
        """Generate text for one or more prompts."""
        try:
            stop = tuple(_parse_ids(stop_ids, "--stop-ids")) if stop_ids else ()
            defaults: dict[str, Any] = dict(
                max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                stop_token_ids=stop, ignore_eos=ignore_eos)
            SamplingParams(**defaults)  # reject bad values before loading anything
            texts_all = list(texts or []) + list(prompt or [])
            if endpoint:
                if prompt_ids or batch:
                    raise InvalidArgument("--endpoint takes text prompts only (not --prompt-ids or --batch)")
                if chat:
                    raise InvalidArgument("--chat runs in-process only: with --endpoint, use the scheduler's "
                                          "HTTP /v1/chat/completions (or send the rendered prompt)")
                if not texts_all:
                    raise InvalidArgument("give a prompt")
                from layerkv import remote_generate

                raise typer.Exit(remote_generate.run(
                    endpoint=endpoint, prompts=texts_all, json_output=json_output, max_tokens=max_tokens,
                    temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, ignore_eos=ignore_eos,
                    api_token=api_token, tls_ca=tls_ca, per_call=per_call))
            if placement is not None and gpu_layers is not None:
                raise InvalidArgument("give --placement or --gpu-layers, not both")
            from worker_svc.local_generate import PromptSpec, run_local

            specs: list[PromptSpec] = []
            sampling = SamplingParams(**defaults)
            specs += [PromptSpec(text=t, sampling=sampling) for t in texts_all]
            if prompt_ids:
                specs.append(PromptSpec(prompt_ids=_parse_ids(prompt_ids, "--prompt-ids"), sampling=sampling))
            if batch:
                specs += _read_batch(batch, defaults)
            if not specs:
                raise InvalidArgument("give a prompt: TEXT, --prompt, --prompt-ids or --batch")
            from worker_svc.engine_config import EngineConfig

            config = EngineConfig(model=model, device=device, dtype=dtype, block_size=block_size,
                                  gpu_blocks=gpu_blocks, host_blocks=host_blocks, preemption_mode=preemption,
                                  max_num_batched_tokens=max_num_batched_tokens, host_access=host_access)
            code = run_local(config, specs, json_output, placement=placement, gpu_layers=gpu_layers,
                             chat=chat)
        except LayerKVError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from exc
        raise typer.Exit(code)
