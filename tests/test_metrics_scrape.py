"""The scheduler's /metrics, scraped over HTTP after real requests through the OpenAI API: the
vLLM-style series count exactly what was generated, and the scrape-time gauges follow the fleet."""

from __future__ import annotations

import asyncio

import httpx
import openai
from prometheus_client.parser import text_string_to_metric_families

from scheduler_svc.testing.fleet import start_fleet
from scheduler_svc.testing.stub_worker import StubWorker
from tests.conftest import free_port


async def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with httpx.AsyncClient() as http:
        text = (await http.get(url)).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:  # type: ignore[type-arg]
    return samples[(name, tuple(sorted(labels.items())))]


async def test_vllm_style_series_count_what_was_generated(redis_url: str) -> None:
    worker = StubWorker("w0", step_s=0.01)
    metrics_port = free_port()
    fleet = await start_fleet(redis_url, [worker], http_port=0, metrics_port=metrics_port)
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    m = {"model_name": "stub"}
    try:
        base = f"http://127.0.0.1:{fleet.server.http_port}/v1"
        async with openai.AsyncOpenAI(base_url=base, api_key="x", max_retries=0) as client:
            lengths = [(5, 7), (9, 3), (20, 11)]  # (prompt chars, max_tokens)
            await asyncio.gather(*(
                client.completions.create(model="stub", prompt="p" * chars, max_tokens=n)
                for chars, n in lengths
            ))  # fmt: skip
            done = await scrape(url)
            prompts = sum(chars + 1 for chars, _ in lengths)  # + BOS
            generated = sum(n for _, n in lengths)
            assert value(done, "vllm:prompt_tokens_total", **m) == prompts
            assert value(done, "vllm:generation_tokens_total", **m) == generated
            assert value(done, "vllm:time_to_first_token_seconds_count", **m) == 3
            assert value(done, "vllm:e2e_request_latency_seconds_count", **m) == 3
            assert value(done, "vllm:request_queue_time_seconds_count", **m) == 3
            # The stub sends one token per request per step: one gap between each two tokens.
            assert value(done, "vllm:inter_token_latency_seconds_count", **m) == generated - 3
            assert value(done, "layerkv_ttft_seconds_count") == 3  # our own twin, observed together
            assert value(done, "vllm:num_requests_running", **m) == 0
            assert value(done, "vllm:num_requests_waiting", **m) == 0

            stream = await client.completions.create(
                model="stub", prompt="q" * 40, max_tokens=150, stream=True
            )
            async for _ in stream:
                break
            busy = await scrape(url)
            assert value(busy, "vllm:num_requests_running", **m) == 1
            await asyncio.sleep(0.05)  # a step report with the request's blocks reaches the scheduler
            busy = await scrape(url)
            assert value(busy, "vllm:kv_cache_usage_perc", **m) > 0
            await stream.close()
            for _ in range(500):
                idle = await scrape(url)
                if value(idle, "vllm:num_requests_running", **m) == 0:
                    break
                await asyncio.sleep(0.01)
            assert value(idle, "vllm:num_requests_running", **m) == 0
        fleet.server.metrics.preempted("w0", 2)  # what the worker-event decoding calls
        after = await scrape(url)
        assert value(after, "vllm:num_preemptions_total", **m) == 2
        assert value(after, "layerkv_preemptions_total", worker="w0") == 2
        names = {name for name, _ in after}
        assert not any(n.startswith("layerkv_worker_") for n in names), "worker series live on the worker"
    finally:
        await fleet.close()


def test_a_kept_series_is_the_exported_one() -> None:
    from prometheus_client import generate_latest

    from common.metrics import SchedulerMetrics

    metrics = SchedulerMetrics()
    first = metrics.series(metrics.dispatches, "w0")
    assert first is metrics.series(metrics.dispatches, "w0") is metrics.dispatches.labels("w0")
    assert metrics.series(metrics.dispatches, "w1") is not first  # one series per label value
    first.inc()
    metrics.series(metrics.dispatches, "w0").inc(2)
    metrics.series(metrics.requests, "length").inc()
    metrics.observe_tokens("r", 3, 5, 1.0)
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(generate_latest(metrics.registry).decode())
        for s in family.samples
    }
    assert samples[("layerkv_dispatches_total", (("worker", "w0"),))] == 3
    assert samples[("layerkv_dispatches_total", (("worker", "w1"),))] == 0
    assert samples[("layerkv_requests_finished_total", (("reason", "length"),))] == 1
    assert samples[("vllm:generation_tokens_total", (("model_name", ""),))] == 3
    assert samples[("vllm:prompt_tokens_total", (("model_name", ""),))] == 5
