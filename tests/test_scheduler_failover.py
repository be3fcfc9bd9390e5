"""Failures under load: a worker dies mid-stream, the scheduler restarts, the policy is swapped.
Every request must complete with exactly the tokens an undisturbed run gives (the stub's tokens
depend on the whole context, so a regenerated request continues where the client left off)."""

from __future__ import annotations

import asyncio

import grpc
import grpc.aio

from common.proto.layerkv.v1 import admin_pb2, scheduler_pb2, types_pb2
from scheduler_svc.testing.fleet import Fleet, collect, generate_request, start_fleet
from scheduler_svc.testing.stub_worker import StubWorker, expected_tokens


async def until(condition, describe, timeout_s: float = 10.0) -> None:
    """Wait for ``condition()``; fail with ``describe()`` instead of hanging."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting: {describe()}"
        await asyncio.sleep(0.002)


async def resilient_generate(fleet: Fleet, prompt: list[int], max_tokens: int, request_id: str) -> list[int]:
    """Generate, and on a broken stream re-attach from the last offset (what a careful client does).

    A stream that broke before any token may have broken before the scheduler stored the request,
    so that case retries Generate with the same id: idempotent, it attaches if the request exists.
    """
    tokens: list[int] = []
    final = None
    request = generate_request(prompt, max_tokens, request_id=request_id)
    call = fleet.client.Generate(request)
    while final is None:
        try:
            async for response in call:
                if response.HasField("chunk"):
                    assert response.chunk.offset == len(tokens), "no token lost or repeated"
                    tokens.extend(response.chunk.token_ids)
                else:
                    final = response.final
        except grpc.aio.AioRpcError as err:
            assert err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), err
            await asyncio.sleep(0.05)
        if final is None and not tokens:
            call = fleet.client.Generate(request)
        elif final is None:
            call = fleet.client.Attach(scheduler_pb2.AttachRequest(request_id=request_id, offset=len(tokens)))
    assert final.finish_reason == types_pb2.FINISH_REASON_LENGTH
    assert final.output_tokens == len(tokens)
    return tokens


async def test_worker_dying_mid_stream_requests_finish_on_the_other(redis_url: str) -> None:
    victim, survivor = StubWorker("victim", step_s=0.004), StubWorker("survivor", step_s=0.004)
    fleet = await start_fleet(redis_url, [victim, survivor], policy="least-loaded")
    try:
        prompts = {f"r{i}": [i + 1] * (4 + i % 5) for i in range(16)}
        tasks = {
            rid: asyncio.ensure_future(resilient_generate(fleet, p, 30, rid)) for rid, p in prompts.items()
        }
        await until(lambda: len(victim.running_ids) >= 3, lambda: f"victim runs {victim.running_ids}")
        moved = {rid.split("@")[0] for rid in victim.running_ids}
        await victim.stop()
        results = {rid: await asyncio.wait_for(task, 30) for rid, task in tasks.items()}
        for rid, prompt in prompts.items():
            assert results[rid] == expected_tokens(prompt, 30), rid
        for rid in moved:
            info = (await fleet.client.GetRequest(scheduler_pb2.GetRequestRequest(request_id=rid))).request
            assert info.worker_id == "survivor" and info.requeues == 1
            assert f"{rid}@1" in survivor.dispatched
    finally:
        await fleet.close()


async def test_scheduler_restart_mid_load_completes_every_request(redis_url: str) -> None:
    workers = [StubWorker("w0", step_s=0.004), StubWorker("w1", step_s=0.004)]
    # A small queue limit is irrelevant here; a tight GPU budget keeps some requests waiting.
    for w in workers:
        w.gpu_blocks = 4 * 12 * 3  # three requests of <= 48 tokens at a time
    fleet = await start_fleet(redis_url, workers)
    try:
        prompts = {f"q{i}": [i + 3] * 6 for i in range(12)}
        tasks = {
            rid: asyncio.ensure_future(resilient_generate(fleet, p, 40, rid)) for rid, p in prompts.items()
        }
        await until(
            lambda: sum(len(w.running_ids) for w in workers) == 6 and len(fleet.server.core.queue) > 0,
            lambda: f"running {[w.running_ids for w in workers]}, queue {list(fleet.server.core.queue)}",
        )
        await asyncio.wait_for(fleet.restart_scheduler(), 20)
        results = {rid: await asyncio.wait_for(task, 30) for rid, task in tasks.items()}
        for rid, prompt in prompts.items():
            assert results[rid] == expected_tokens(prompt, 40), rid
        # requests running at the restart were requeued as a new attempt (``<id>@1``), and no
        # worker keeps blocks of any attempt once everything finished
        await until(
            lambda: all(w.running_ids == [] for w in workers), lambda: [w.running_ids for w in workers]
        )
        assert all(w.gpu_free == w.gpu_blocks for w in workers)
        second = [rid for w in workers for rid in w.dispatched if rid.endswith("@1")]
        assert len(second) >= 6, second
    finally:
        await fleet.close()


async def test_set_policy_under_load_loses_nothing_and_touches_no_worker(redis_url: str) -> None:
    workers = [StubWorker("w0", step_s=0.003), StubWorker("w1", step_s=0.003)]
    fleet = await start_fleet(redis_url, workers)
    try:
        ports = [w.port for w in workers]
        prompts = {f"s{i}": [i + 1] * 5 for i in range(40)}
        tasks = {
            rid: asyncio.ensure_future(
                collect(fleet.client.Generate(generate_request(p, 20, request_id=rid)))
            )
            for rid, p in prompts.items()
        }
        await asyncio.sleep(0.02)
        names = ["least-loaded", "layerkv", "fcfs-full", "least-loaded"]
        for name in names:
            resp = await fleet.admin.SetPolicy(
                admin_pb2.SetPolicyRequest(policy=admin_pb2.PolicySpec(name=name))
            )
            assert resp.current.name == name
            await asyncio.sleep(0.01)
        for rid, prompt in prompts.items():
            tokens, final = await asyncio.wait_for(tasks[rid], 30)
            assert tokens == expected_tokens(prompt, 20) and final.output_tokens == 20
        assert [w.port for w in workers] == ports and all(w.aborted == [] for w in workers)
        assert sum(len(w.dispatched) for w in workers) == len(prompts)  # nothing ran twice
        stored = await fleet.server.store.get_policy()
        assert stored is not None and stored.name == "least-loaded"
    finally:
        await fleet.close()
