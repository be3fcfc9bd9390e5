"""``layerkv generate --endpoint HOST:PORT``: send prompts to a running fleet and stream the answers.

All prompts are submitted at once (the fleet batches them), as tagged requests on one
``GenerateStream`` call (``common.stream_client``; ``multiplex=False``, the CLI's ``--per-call``,
or a scheduler without it: one ``Generate`` call each). Text is printed as it arrives: the
first unfinished prompt streams live, later ones are buffered and printed when their turn comes,
so the output is in input order. With ``json_output`` each request prints one JSON line
``{"index","token_ids","text","finish_reason","ttft_s","latency_s"}``, in input order. Torch-free.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TextIO

from common.errors import LayerKVError
from common.proto.layerkv.v1 import scheduler_pb2
from common.security import bearer_metadata, open_channel
from common.stream_client import Finished, GenerateClient, GenerateJob, RequestStream, Tokens, wire_request
from common.types import SamplingParams


@dataclass
class RemoteResult:
    """One prompt's answer as it builds up."""

    index: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = ""
    ttft_s: float = 0.0  # measured by the scheduler: arrival to first token
    latency_s: float = 0.0  # arrival to finish
    error: str = ""
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def as_json(self) -> str:
        record = {
            "index": self.index,
            "token_ids": self.token_ids,
            "text": self.text,
            "finish_reason": self.finish_reason,
            "ttft_s": self.ttft_s,
            "latency_s": self.latency_s,
        }
        if self.error:
            record["error"] = self.error
        return json.dumps(record)


@dataclass(frozen=True)
class RemoteOptions:
    """Sampling and connection options of one ``generate --endpoint`` run."""

    max_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    ignore_eos: bool = False
    api_token: str = ""
    tls_ca: str = ""
    server_name: str = ""  # TLS name override when the endpoint's host is not in the certificate
    timeout_s: float | None = None
    multiplex: bool = True  # False: one Generate call per prompt (the per-call path, for debugging)


def _job(prompt: str, opts: RemoteOptions) -> GenerateJob:
    sampling = SamplingParams(
        max_tokens=opts.max_tokens, temperature=opts.temperature, top_p=opts.top_p, top_k=opts.top_k,
        seed=opts.seed, ignore_eos=opts.ignore_eos,
    )  # fmt: skip
    return GenerateJob(prompt, sampling)


def _request(prompt: str, opts: RemoteOptions) -> scheduler_pb2.GenerateRequest:
    """What is sent for one prompt, on either path."""
    return wire_request(_job(prompt, opts))


async def _one(
    stream: RequestStream, result: RemoteResult, opts: RemoteOptions, on_text: asyncio.Queue[tuple[int, str]]
) -> None:
    try:
        async with asyncio.timeout(opts.timeout_s):
            async for event in stream:
                if isinstance(event, Tokens):
                    result.token_ids.extend(event.token_ids)
                    result.text += event.text
                    if event.text:
                        on_text.put_nowait((result.index, event.text))
                else:
                    assert isinstance(event, Finished)
                    reason = event.finish_reason
                    result.finish_reason = reason.value if reason is not None else "unspecified"
                    result.ttft_s = event.ttft_s
                    result.latency_s = event.latency_s
                    result.error = event.error
    except TimeoutError:
        stream.cancel()
        result.finish_reason = "error"
        result.error = "Unavailable: Deadline Exceeded"  # what a gRPC deadline read as before
    except LayerKVError as err:
        result.finish_reason = "error"
        result.error = f"{type(err).__name__}: {err}"
    finally:
        result.done.set()
        on_text.put_nowait((result.index, ""))  # wake the printer


async def generate_remote(
    endpoint: str, prompts: Sequence[str], opts: RemoteOptions, json_output: bool, out: TextIO
) -> list[RemoteResult]:
    """Send every prompt, print as described in the module docstring, return the results."""
    results = [RemoteResult(i) for i in range(len(prompts))]
    text_events: asyncio.Queue[tuple[int, str]] = asyncio.Queue()
    async with open_channel(endpoint, ca=opts.tls_ca, server_name=opts.server_name) as channel:
        client = GenerateClient(channel, bearer_metadata(opts.api_token), multiplex=opts.multiplex)
        tasks = [
            asyncio.create_task(_one(client.generate(_job(p, opts)), r, opts, text_events))
            for p, r in zip(prompts, results, strict=True)
        ]
        current, printed = 0, 0  # prompt being shown live; characters of it already printed
        while current < len(results):
            res = results[current]
            if not json_output and len(res.text) > printed:
                out.write(res.text[printed:])
                out.flush()
                printed = len(res.text)
            if res.done.is_set():
                if json_output:
                    out.write(res.as_json() + "\n")
                else:
                    tail = f" [error: {res.error}]" if res.error else ""
                    out.write(tail + "\n")
                out.flush()
                current, printed = current + 1, 0
                continue
            await text_events.get()
        await asyncio.gather(*tasks)
        await client.close()
    return results


def run(
    endpoint: str,
    prompts: Sequence[str],
    json_output: bool = False,
    *,
    max_tokens: int = 32,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    ignore_eos: bool = False,
    api_token: str = "",
    tls_ca: str = "",
    server_name: str = "",
    per_call: bool = False,
    out: TextIO | None = None,
) -> int:
    """Entry point of ``layerkv generate --endpoint``; returns the process exit code.

    Without ``api_token`` the token ``layerkv up`` saved for this endpoint is used (if any)."""
    import uvloop

    from layerkv import credentials

    api_token = api_token or credentials.load(endpoint).api_token
    opts = RemoteOptions(
        max_tokens, temperature, top_p, top_k, seed, ignore_eos, api_token, tls_ca, server_name,
        multiplex=not per_call,
    )
    stream = out if out is not None else sys.stdout
    started = time.monotonic()
    try:
        results = uvloop.run(generate_remote(endpoint, prompts, opts, json_output, stream))
    except LayerKVError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    failed = [r for r in results if r.error]
    if failed and not json_output:
        print(f"{len(failed)} of {len(results)} requests failed", file=sys.stderr)
    if not json_output:
        print(f"({len(results)} requests, {time.monotonic() - started:.2f} s)", file=sys.stderr)
    return 1 if failed else 0
