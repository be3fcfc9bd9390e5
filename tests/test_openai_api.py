"""The OpenAI-compatible HTTP API with the official ``openai`` client against a real scheduler
(real gRPC to stub workers, real Redis, uvicorn on port 0): completions and chat, streamed and
not, stop strings, errors in OpenAI's shape, the bearer token, and cancellation on disconnect."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import openai
import pytest

from common.chat_template import ChatMessage, ChatTemplate, render_chat
from common.tokenizer import ByteTokenizer
from scheduler_svc.testing.fleet import Fleet, start_fleet
from scheduler_svc.testing.stub_worker import StubWorker, expected_tokens

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)
BYTES = ByteTokenizer()


def expected_text(prompt: str, n: int) -> str:
    return bytes(expected_tokens(BYTES.encode(prompt), n)).decode()  # stub tokens are ASCII bytes


def chat_prompt(*messages: tuple[str, str]) -> str:
    return render_chat(ChatTemplate(CHATML), [ChatMessage(r, c) for r, c in messages])


async def _start(redis_url: str, workers: list[StubWorker], **settings: object) -> Fleet:
    fleet = await start_fleet(redis_url, workers, http_port=0, **settings)
    return fleet


def base_url(fleet: Fleet) -> str:
    return f"http://127.0.0.1:{fleet.server.http_port}"


def give_chat_template(fleet: Fleet, template: str = CHATML) -> None:
    # The stub workers' byte tokenizer has no template; a model's comes in its GetTokenizer reply.
    for handle in fleet.server.core.pool.handles():
        handle.tokenizer.chat_template = template  # type: ignore[union-attr]


@pytest.fixture
async def fleet(redis_url: str) -> AsyncIterator[Fleet]:
    fleet = await _start(redis_url, [StubWorker("w0", step_s=0.01)])
    give_chat_template(fleet)
    yield fleet
    await fleet.close()


@pytest.fixture
async def client(fleet: Fleet) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=base_url(fleet) + "/v1", api_key="unused", max_retries=0) as c:
        yield c


async def test_completion_whole_and_streamed(client: openai.AsyncOpenAI) -> None:
    done = await client.completions.create(model="stub", prompt="Hello", max_tokens=12, temperature=0)
    assert done.object == "text_completion" and done.model == "stub"
    assert done.choices[0].text == expected_text("Hello", 12)
    assert done.choices[0].finish_reason == "length"
    assert done.usage is not None
    assert (done.usage.prompt_tokens, done.usage.completion_tokens, done.usage.total_tokens) == (6, 12, 18)

    stream = await client.completions.create(
        model="stub", prompt="Hello", max_tokens=12, stream=True, stream_options={"include_usage": True}
    )
    chunks = [c async for c in stream]
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(texts) == expected_text("Hello", 12)
    assert len(texts) > 2, "text arrives as it is generated"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and set(finishes[:-1]) == {None}
    assert texts[-1], "the finish reason rides on the last text, no empty chunk of its own"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 12 and chunks[-1].usage.prompt_tokens == 6


async def test_token_id_prompts_are_accepted(client: openai.AsyncOpenAI) -> None:
    done = await client.completions.create(model="stub", prompt=[5, 6, 7], max_tokens=4)
    assert done.choices[0].text == bytes(expected_tokens([5, 6, 7], 4)).decode()
    assert done.usage is not None and done.usage.prompt_tokens == 3


async def test_chat_whole_and_streamed_apply_the_chat_template(client: openai.AsyncOpenAI) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    prompt_ids = BYTES.encode(chat_prompt(("system", "Be brief."), ("user", "Hi there")))
    want = bytes(expected_tokens(prompt_ids, 10)).decode()
    done = await client.chat.completions.create(model="stub", messages=messages, max_completion_tokens=10)
    assert done.object == "chat.completion"
    assert done.choices[0].message.role == "assistant" and done.choices[0].message.content == want
    assert done.choices[0].finish_reason == "length"
    assert done.usage is not None and done.usage.prompt_tokens == len(prompt_ids)

    stream = await client.chat.completions.create(
        model="stub", messages=messages, max_tokens=10, stream=True, stream_options={"include_usage": True}
    )
    chunks = [c async for c in stream]
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert deltas[0].role == "assistant" and all(d.role is None for d in deltas[1:])
    assert "".join(d.content or "" for d in deltas) == want
    assert chunks[-2].choices[0].finish_reason == "length" and chunks[-2].choices[0].delta.content
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 10


async def test_stop_strings_cut_the_text_and_end_the_request(
    fleet: Fleet, client: openai.AsyncOpenAI
) -> None:
    # 100 tokens at 10 ms a step: the cancel after the stop string comes long before the end.
    full = expected_text("Hello", 100)
    stop = full[7:9]
    cut = full[: full.index(stop)]
    done = await client.completions.create(model="stub", prompt="Hello", max_tokens=100, stop=[stop, "\x00"])
    assert done.choices[0].text == cut and done.choices[0].finish_reason == "stop"
    stream = await client.completions.create(
        model="stub", prompt="Hello", max_tokens=100, stop=stop, stream=True
    )
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].text for c in chunks) == cut
    assert chunks[-1].choices[0].finish_reason == "stop"
    worker = fleet.workers[0]
    await _until(lambda: not worker.running_ids, "the stopped requests were aborted on the worker")
    assert len(worker.aborted) == 2  # cut short on the worker, not generated to max_tokens


async def test_stop_token_ids_end_with_reason_stop(client: openai.AsyncOpenAI) -> None:
    tokens = expected_tokens(BYTES.encode("Hello"), 30)
    done = await client.completions.create(
        model="stub", prompt="Hello", max_tokens=30, extra_body={"stop_token_ids": [tokens[4]]}
    )
    first = tokens.index(tokens[4])
    assert done.choices[0].finish_reason == "stop"
    assert done.usage is not None and done.usage.completion_tokens == first + 1


async def _until(condition, what: str, timeout_s: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        await asyncio.sleep(0.01)


async def test_a_closed_stream_cancels_the_request_and_frees_its_blocks(redis_url: str) -> None:
    worker = StubWorker("w0", step_s=0.02)
    fleet = await _start(redis_url, [worker])
    try:
        async with openai.AsyncOpenAI(base_url=base_url(fleet) + "/v1", api_key="x", max_retries=0) as client:
            stream = await client.completions.create(
                model="stub", prompt="x" * 20, max_tokens=200, stream=True
            )
            seen = 0
            async for chunk in stream:
                seen += len(chunk.choices[0].text) if chunk.choices else 0
                if seen >= 3:
                    break
            assert worker.running_ids and worker.gpu_free < worker.gpu_blocks  # it was running
            await stream.close()  # the client goes away mid-stream
            await _until(lambda: not worker.running_ids, "the worker aborted the request")
            assert worker.gpu_free == worker.gpu_blocks and len(worker.aborted) == 1
            (state,) = fleet.server.core.requests.values()
            assert state.record.finish_reason == "abort" and len(state.tokens) < 200
    finally:
        await fleet.close()


async def test_errors_are_in_openais_shape(fleet: Fleet, client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        await client.completions.create(model="stub", prompt="Hello", max_tokens=-1)
    assert bad.value.status_code == 400
    assert bad.value.body["type"] == "invalid_request_error" and bad.value.body["param"] == "max_tokens"
    assert "max_tokens" in bad.value.body["message"]
    with pytest.raises(openai.BadRequestError, match="n=2"):
        await client.completions.create(model="stub", prompt="Hello", max_tokens=3, n=2)
    with pytest.raises(openai.NotFoundError) as missing:
        await client.completions.create(model="gpt-17", prompt="Hello", max_tokens=3)
    assert missing.value.body["code"] == "model_not_found" and "stub" in missing.value.body["message"]
    with pytest.raises(openai.BadRequestError) as negative:  # found by schemathesis: was a 500
        await client.completions.create(model="stub", prompt=[-5, 835], max_tokens=3)
    assert negative.value.body["param"] == "prompt" and "greater than or equal to 0" in negative.value.message
    with pytest.raises(openai.BadRequestError) as huge:  # beyond the wire's uint32: was a 500
        await client.completions.create(model="stub", prompt="Hi", max_tokens=2**40)
    assert huge.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError, match="empty"):
        await client.completions.create(model="stub", prompt="", max_tokens=3)
    with pytest.raises(openai.BadRequestError, match="longest"):
        await client.completions.create(model="stub", prompt="Hello", max_tokens=5000)
    async with httpx.AsyncClient(base_url=base_url(fleet)) as http:
        reply = await http.post(
            "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
        )
        assert reply.status_code == 400
        assert set(reply.json()["error"]) == {"message", "type", "param", "code"}
        reply = await http.post("/v1/completions", json={"model": "stub"})  # no prompt
        assert reply.status_code == 400 and reply.json()["error"]["param"] == "prompt"
    # The service keeps serving after every bad request.
    ok = await client.completions.create(model="stub", prompt="Hello", max_tokens=2)
    assert ok.choices[0].text == expected_text("Hello", 2)


async def test_chat_without_a_template_is_a_clear_400(fleet: Fleet, client: openai.AsyncOpenAI) -> None:
    give_chat_template(fleet, "")
    with pytest.raises(openai.BadRequestError, match="model has no chat template"):
        await client.chat.completions.create(model="stub", messages=[{"role": "user", "content": "Hi"}])


async def test_the_api_token_is_required_when_set(redis_url: str) -> None:
    fleet = await _start(redis_url, [StubWorker("w0")], api_token="s3cret")
    try:
        url = base_url(fleet) + "/v1"
        async with openai.AsyncOpenAI(base_url=url, api_key="wrong", max_retries=0) as wrong:
            with pytest.raises(openai.AuthenticationError) as denied:
                await wrong.completions.create(model="stub", prompt="Hi", max_tokens=2)
            assert denied.value.status_code == 401 and denied.value.body["code"] == "invalid_api_key"
            with pytest.raises(openai.AuthenticationError):
                await wrong.models.list()
        async with openai.AsyncOpenAI(base_url=url, api_key="s3cret", max_retries=0) as right:
            done = await right.completions.create(model="stub", prompt="Hi", max_tokens=2)
            assert done.choices[0].text == expected_text("Hi", 2)
        async with httpx.AsyncClient(base_url=base_url(fleet)) as http:
            assert (await http.get("/health")).status_code == 200  # probes need no token
    finally:
        await fleet.close()


async def test_models_and_health(redis_url: str) -> None:
    worker = StubWorker("w0")
    fleet = await _start(redis_url, [worker], served_model_name="my-model")
    try:
        async with openai.AsyncOpenAI(base_url=base_url(fleet) + "/v1", api_key="x", max_retries=0) as client:
            models = await client.models.list()
            assert [m.id for m in models.data] == ["my-model"]
            done = await client.completions.create(model="my-model", prompt="Hi", max_tokens=2)
            assert done.model == "my-model"
        async with httpx.AsyncClient(base_url=base_url(fleet)) as http:
            assert (await http.get("/health")).json() == {"status": "ok"}
            await worker.stop()
            await _until(lambda: not any(h.healthy for h in fleet.server.core.pool.handles()), "worker down")
            reply = await http.get("/health")
            assert reply.status_code == 503 and "no healthy worker" in reply.json()["error"]["message"]
            reply = await http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
            assert reply.status_code == 503 and reply.json()["error"]["type"] == "service_unavailable"
    finally:
        await fleet.close()


def _sse_events(body: str) -> list[str]:
    """Split an event stream the way ``vllm bench serve`` does (on blank lines)."""
    return [m.strip().removeprefix("data: ") for m in body.split("\n\n") if m.strip()]


async def test_what_vllm_bench_serve_sends_is_accepted(fleet: Fleet) -> None:
    # The bodies of vLLM's benchmark request builders (backends openai and openai-chat).
    completion = {
        "model": "stub",
        "prompt": "Hello",
        "repetition_penalty": 1.0,
        "max_tokens": 8,
        "logprobs": None,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
        "some_future_field": {"x": 1},
    }
    chat = {
        "model": "stub",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Hello"}]}],
        "max_completion_tokens": 8,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    async with httpx.AsyncClient(base_url=base_url(fleet), headers={"x-request-id": "bench-0"}) as http:
        for path, body, key in (
            ("/v1/completions", completion, "text"),
            ("/v1/chat/completions", chat, None),
        ):
            reply = await http.post(path, json=body)
            assert reply.status_code == 200, reply.text
            assert reply.headers["content-type"].startswith("text/event-stream")
            events = _sse_events(reply.text)
            assert events[-1] == "[DONE]"
            data = [json.loads(e) for e in events[:-1]]
            text = "".join(
                (d["choices"][0]["text"] if key else d["choices"][0]["delta"].get("content") or "")
                for d in data if d["choices"]
            )  # fmt: skip
            assert len(text) == 8 and data[-1]["usage"]["completion_tokens"] == 8


async def test_a_dropped_whole_response_request_is_cancelled(redis_url: str) -> None:
    worker = StubWorker("w0", step_s=0.02)
    fleet = await _start(redis_url, [worker])
    try:
        async with httpx.AsyncClient(base_url=base_url(fleet), timeout=0.5) as http:
            with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
                await http.post("/v1/completions", json={"prompt": "x" * 20, "max_tokens": 200})
        await _until(lambda: worker.aborted, "the scheduler noticed the disconnect and aborted the request")
        await _until(lambda: worker.gpu_free == worker.gpu_blocks, "its blocks are free")
        (state,) = fleet.server.core.requests.values()
        assert state.record.finish_reason == "abort" and len(state.tokens) < 200
    finally:
        await fleet.close()


async def test_a_taken_http_port_is_a_clear_error(redis_url: str) -> None:
    import socket

    from common.config import SchedulerSettings
    from common.errors import Unavailable
    from scheduler_svc.server import create_server

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = SchedulerSettings.build(host="127.0.0.1", port=0, metrics_port=0, redis_url=redis_url,
                                           http_port=port)  # fmt: skip
        with pytest.raises(Unavailable, match=f"cannot listen on 127.0.0.1:{port}"):
            await create_server(settings)


async def test_https_with_the_schedulers_certificate(redis_url: str, tmp_path: Path) -> None:
    import ssl

    from tests.pki import make_pki

    pki = make_pki(tmp_path)
    tls = {"tls_cert": pki.scheduler.cert, "tls_key": pki.scheduler.key}
    fleet = await _start(redis_url, [StubWorker("w0")], **tls)
    try:
        url = f"https://127.0.0.1:{fleet.server.http_port}/v1"
        async with (
            httpx.AsyncClient(verify=ssl.create_default_context(cafile=pki.ca)) as http,
            openai.AsyncOpenAI(base_url=url, api_key="x", max_retries=0, http_client=http) as client,
        ):
            done = await client.completions.create(model="stub", prompt="Hi", max_tokens=3)
            assert done.choices[0].text == expected_text("Hi", 3)
        async with httpx.AsyncClient() as plain:
            with pytest.raises(httpx.HTTPError):  # no plaintext next to TLS
                await plain.get(f"http://127.0.0.1:{fleet.server.http_port}/health")
    finally:
        await fleet.close()


async def test_a_full_queue_is_a_429_in_openais_shape(redis_url: str) -> None:
    # One small worker: the first request holds every GPU block, the second waits, the third is refused.
    worker = StubWorker("w0", gpu_blocks=4 * 4, step_s=0.02)
    fleet = await _start(redis_url, [worker], queue_limit=1)
    body = {"prompt": [1, 2, 3, 4], "max_tokens": 12}
    try:
        async with httpx.AsyncClient(base_url=base_url(fleet), timeout=30) as http:
            first = asyncio.ensure_future(http.post("/v1/completions", json=body))
            await _until(lambda: bool(worker.running_ids), "the first request runs")
            second = asyncio.ensure_future(http.post("/v1/completions", json=body))
            await _until(lambda: len(fleet.server.core.queue) == 1, "the second request waits")
            refused = await http.post("/v1/completions", json=body)
            assert refused.status_code == 429
            assert refused.json()["error"]["type"] == "rate_limit_exceeded"
            assert "queue" in refused.json()["error"]["message"]
            for reply in await asyncio.gather(first, second):  # the accepted ones finish
                assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 12
    finally:
        await fleet.close()
