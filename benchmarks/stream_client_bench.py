"""Per-request cost of ``common.stream_client`` on one GenerateStream against a Generate call each.

One process holds a real redis-server's client, the scheduler (``create_server``, port 0) and two
stub workers (no model): what ``layerkv generate --endpoint`` and other front ends pay per request
through the whole stack. A burst of ``--requests`` requests (``--max-tokens`` each, all in flight
at once) goes through a ``GenerateClient`` with ``multiplex`` on and off, and, for reference,
through the OpenAI API's in-process gateway (``CoreGateway``: admission and the token log called
directly, no gRPC; its HTTP layer left out), in rotated order each round; per mode the median over
rounds of wall time per request and of this process's CPU time per request (client + scheduler +
stubs, on its one core).

    python benchmarks/stream_client_bench.py --requests 400 --rounds 6
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # runnable as `python benchmarks/stream_client_bench.py` from anywhere
    sys.path.insert(0, str(REPO))

from common.stream_client import Finished, GenerateClient, GenerateJob, RequestStream  # noqa: E402
from common.types import SamplingParams  # noqa: E402
from layerkv.testing.redis_server import RedisServer  # noqa: E402
from scheduler_svc.openai_api.gateway import CoreGateway  # noqa: E402
from scheduler_svc.requests import StreamFinal  # noqa: E402
from scheduler_svc.testing.fleet import start_fleet  # noqa: E402
from scheduler_svc.testing.stub_worker import StubWorker  # noqa: E402


async def drain(stream: RequestStream) -> None:
    async for event in stream:
        if isinstance(event, Finished):
            assert event.output_tokens > 0, event


async def in_process(gateway: CoreGateway, job: GenerateJob) -> None:
    submitted = await gateway.submit(list(job.prompt), job.sampling)
    async for item in gateway.stream(submitted.request_id):
        if isinstance(item, StreamFinal):
            assert item.record.output_tokens > 0, item.record


async def burst(client: GenerateClient | CoreGateway, requests: int, max_tokens: int) -> tuple[float, float]:
    jobs = [GenerateJob((i % 200 + 1, 7, 9), SamplingParams(max_tokens=max_tokens, ignore_eos=True))
            for i in range(requests)]  # fmt: skip
    wall, cpu = time.perf_counter(), time.process_time()
    if isinstance(client, CoreGateway):
        await asyncio.gather(*(in_process(client, j) for j in jobs))
    else:
        await asyncio.gather(*(drain(client.generate(j)) for j in jobs))
    return (time.perf_counter() - wall) / requests, (time.process_time() - cpu) / requests


async def main(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    with tempfile.TemporaryDirectory() as folder:
        redis = RedisServer(Path(folder)).start()
        fleet = await start_fleet(redis.url, [StubWorker("w0", step_s=0.002), StubWorker("w1", step_s=0.002)])
        try:
            clients: dict[str, GenerateClient | CoreGateway] = {
                "stream": GenerateClient(fleet.channel),
                "per_call": GenerateClient(fleet.channel, multiplex=False),
                "in_process": CoreGateway(fleet.server.core),
            }
            for client in clients.values():  # warm up: the stream opened, code paths run once
                await burst(client, 50, args.max_tokens)
            modes = list(clients)
            samples: dict[str, list[tuple[float, float]]] = {m: [] for m in clients}
            for r in range(args.rounds):
                for mode in modes[r % 3:] + modes[: r % 3]:  # rotated: none always first
                    samples[mode].append(await burst(clients[mode], args.requests, args.max_tokens))
            for client in clients.values():
                if isinstance(client, GenerateClient):
                    await client.close()
        finally:
            await fleet.close()
            redis.stop()
    return {
        mode: {
            "wall_ms_per_request": 1e3 * statistics.median(w for w, _ in got),
            "cpu_ms_per_request": 1e3 * statistics.median(c for _, c in got),
        }
        for mode, got in samples.items()
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=400, help="requests per burst, all in flight")
    parser.add_argument("--max-tokens", type=int, default=4, help="tokens generated per request")
    parser.add_argument("--rounds", type=int, default=6, help="bursts per mode (order rotated each round)")
    import uvloop

    result = uvloop.run(main(parser.parse_args()))
    print(json.dumps(result, indent=2))
    s, p = result["stream"], result["per_call"]
    print(f"per-call / stream: wall {p['wall_ms_per_request'] / s['wall_ms_per_request']:.2f}x, "
          f"cpu {p['cpu_ms_per_request'] / s['cpu_ms_per_request']:.2f}x")  # fmt: skip
