"""The OpenAI-compatible API, driven by the real ``openai`` SDK (and curl) against the real
service on the tiny model: the answers match what ``chat.v1`` gives for the same prompt,
errors come as the SDK's exception classes, and a client that leaves cancels its work."""

from __future__ import annotations

import asyncio
import secrets
import shutil
import subprocess
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import orjson
import pytest
from openai import AsyncOpenAI, OpenAI

from service.core.reply import Reply
from service.engine.types import ChatKey, FinishReason, SamplingParams
from service.server import ChatServer
from service.store.records import token_hash
from tests.engine_gate import GateFactory
from tests.service.client import TIMEOUT_S, Client
from tests.service.conftest import ServiceFactory, noting_cancels, ws_url
from tests.service.test_http import scrape

GREEDY: dict[str, Any] = {"temperature": 0, "max_tokens": 12}
HELLO = [{"role": "user", "content": "Say hello to the lighthouse keeper."}]


def base_url(server: ChatServer) -> str:
    return f"http://127.0.0.1:{server.port}/v1"


def sdk(server: ChatServer, key: str = "unused") -> AsyncOpenAI:
    return AsyncOpenAI(base_url=base_url(server), api_key=key, max_retries=0, timeout=TIMEOUT_S)


@pytest.fixture
async def api(server: ChatServer) -> AsyncIterator[AsyncOpenAI]:
    client = sdk(server)
    yield client
    await client.close()


def model_id(server: ChatServer) -> str:
    return server.models.default_id


async def chat_v1_reply(server: ChatServer, text: str, **params: Any) -> dict[str, Any]:
    """The reply ``chat.v1`` gives to ``text`` as the first turn of a new chat."""
    client = await Client.connect(ws_url(server))
    try:
        await client.hello()
        await client.open("s")
        reply = await client.chat("s", text, **params)
        return {"text": reply.text, **reply.done}
    finally:
        await client.close()


# ---- models and completions ------------------------------------------------------------------


async def test_models_list_names_every_model(server: ChatServer, api: AsyncOpenAI) -> None:
    """``GET /v1/models`` lists the served models in OpenAI's shape; one can be fetched by id."""
    listed = await api.models.list()
    assert [m.id for m in listed.data] == [m["id"] for m in server.models.describe()]
    assert all(m.object == "model" and m.owned_by and m.created > 0 for m in listed.data)
    assert (await api.models.retrieve(model_id(server))).id == model_id(server)
    with pytest.raises(openai.NotFoundError):
        await api.models.retrieve("no-such-model")


async def test_chat_completion_answers_as_chat_v1_does(server: ChatServer, api: AsyncOpenAI) -> None:
    """A greedy chat completion is the reply ``chat.v1`` gives to the same first turn, with the
    usage counted the same way; and it is not written to the chat history."""
    expected = await chat_v1_reply(server, HELLO[0]["content"], **GREEDY)
    answer = await api.chat.completions.create(model=model_id(server), messages=HELLO, **GREEDY)  # type: ignore[arg-type]
    assert answer.object == "chat.completion"
    (choice,) = answer.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == expected["text"]
    assert choice.finish_reason == expected["reason"]
    assert answer.usage is not None
    assert answer.usage.prompt_tokens == expected["usage"]["prompt_tokens"]
    assert answer.usage.completion_tokens == expected["usage"]["completion_tokens"]
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens
    assert answer.usage.prompt_tokens_details is not None
    # The same user's chat.v1 chat holds this very prompt: all of it is reused but the last two
    # positions (a prefill after position 0 computes at least two tokens, see kv_cache.chunk_end).
    assert answer.usage.prompt_tokens_details.cached_tokens == answer.usage.prompt_tokens - 2
    chats = await server.store.list_chats(server.local_user.id, limit=10)
    assert len(chats) == 1, "only the chat.v1 chat is stored; the API request is stateless"


async def test_sync_client_and_content_parts(server: ChatServer) -> None:
    """The synchronous SDK works too; ``content`` as a list of text parts reads as their concatenation."""
    expected = await chat_v1_reply(server, HELLO[0]["content"], **GREEDY)
    parts = [{"type": "text", "text": "Say hello to the "}, {"type": "text", "text": "lighthouse keeper."}]

    def call() -> str | None:
        with OpenAI(base_url=base_url(server), api_key="unused", max_retries=0, timeout=TIMEOUT_S) as client:
            answer = client.chat.completions.create(
                model=model_id(server),
                messages=[{"role": "user", "content": parts}],  # type: ignore[list-item]
                **GREEDY,
            )
            return answer.choices[0].message.content

    assert await asyncio.to_thread(call) == expected["text"]


async def test_streaming_chunks_carry_role_deltas_finish_and_usage(
    server: ChatServer, api: AsyncOpenAI
) -> None:
    """``stream: true``: the role first, then the text deltas, then ``finish_reason``, then (with
    ``include_usage``) a chunk with an empty ``choices`` list and the usage; the text is the
    non-streamed answer's."""
    whole = await api.chat.completions.create(model=model_id(server), messages=HELLO, **GREEDY)  # type: ignore[arg-type]
    stream = await api.chat.completions.create(
        model=model_id(server),
        messages=HELLO,  # type: ignore[arg-type]
        stream=True,
        stream_options={"include_usage": True},
        **GREEDY,
    )
    chunks = [chunk async for chunk in stream]
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    *body, finish, usage = chunks[1:]
    assert all(c.choices[0].finish_reason is None and c.choices[0].delta.content for c in body)
    assert "".join(c.choices[0].delta.content or "" for c in body) == whole.choices[0].message.content
    assert finish.choices[0].finish_reason == whole.choices[0].finish_reason
    assert usage.choices == []
    assert usage.usage is not None
    assert whole.usage is not None
    assert usage.usage.prompt_tokens == whole.usage.prompt_tokens
    assert usage.usage.completion_tokens == whole.usage.completion_tokens
    assert usage.usage.total_tokens == whole.usage.total_tokens
    # The first request left this very prompt in the user's cache: all but two positions reused.
    assert usage.usage.prompt_tokens_details is not None
    assert usage.usage.prompt_tokens_details.cached_tokens == whole.usage.prompt_tokens - 2


async def test_three_choices_decode_together(server: ChatServer, api: AsyncOpenAI) -> None:
    """``n = 3``: three choices, indexed 0..2; greedy, they agree; the usage counts all three."""
    one = await api.chat.completions.create(model=model_id(server), messages=HELLO, **GREEDY)  # type: ignore[arg-type]
    forked = (await scrape(server))['localchat_prompt_tokens_reused_total{how="forked"}']
    three = await api.chat.completions.create(model=model_id(server), messages=HELLO, n=3, **GREEDY)  # type: ignore[arg-type]
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert {c.message.content for c in three.choices} == {one.choices[0].message.content}
    assert three.usage is not None
    assert one.usage is not None
    assert three.usage.prompt_tokens == one.usage.prompt_tokens
    assert three.usage.completion_tokens == 3 * one.usage.completion_tokens
    # The prompt was prefilled once: the two other choices copied it (see it in /metrics).
    after = (await scrape(server))['localchat_prompt_tokens_reused_total{how="forked"}']
    assert after - forked == 2 * one.usage.prompt_tokens


async def test_stop_strings_end_the_text_before_them(server: ChatServer, api: AsyncOpenAI) -> None:
    """A stop string (alone, or in a list) cuts the answer just before it, with ``finish_reason: stop``."""
    params = {"temperature": 0, "max_tokens": 24}
    full = (await api.chat.completions.create(model=model_id(server), messages=HELLO, **params)).choices[0]  # type: ignore[arg-type]
    text = full.message.content or ""
    assert len(text) > 6, text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    for given in (stop, [stop, "\x00never"]):
        cut = await api.chat.completions.create(model=model_id(server), messages=HELLO, stop=given, **params)  # type: ignore[arg-type]
        assert cut.choices[0].message.content == text[: text.index(stop)]
        assert cut.choices[0].finish_reason == "stop"


async def test_completions_take_a_raw_prompt_or_token_ids(server: ChatServer, api: AsyncOpenAI) -> None:
    """``/v1/completions`` continues a raw prompt with no template (encoded as a document: the
    model's BOS, if it takes one, first); its token ids give the same text."""
    prompt = "The lighthouse keeper said"
    (engine,) = server.models.loaded()
    by_text = await api.completions.create(model=model_id(server), prompt=prompt, **GREEDY)
    by_ids = await api.completions.create(
        model=model_id(server), prompt=engine.tokenizer.encode_document(prompt), **GREEDY
    )
    assert by_text.object == "text_completion"
    assert by_text.choices[0].text == by_ids.choices[0].text
    assert by_text.usage is not None
    assert by_text.usage.prompt_tokens == len(engine.tokenizer.encode_document(prompt))
    streamed = await api.completions.create(model=model_id(server), prompt=prompt, stream=True, **GREEDY)
    assert "".join([c.choices[0].text async for c in streamed if c.choices]) == by_text.choices[0].text


async def test_the_second_request_of_a_conversation_reuses_the_first(
    server: ChatServer, api: AsyncOpenAI
) -> None:
    """A stateless client resends the conversation: the second request's ``cached_tokens`` is the
    prefix it shares with the first request's prompt and answer, exactly."""
    (engine,) = server.models.loaded()
    first = await api.chat.completions.create(model=model_id(server), messages=HELLO, **GREEDY)  # type: ignore[arg-type]
    await server.idle()
    await engine.wait_idle()
    answer = first.choices[0].message.content or ""
    follow = [*HELLO, {"role": "assistant", "content": answer}, {"role": "user", "content": "And then?"}]
    second = await api.chat.completions.create(model=model_id(server), messages=follow, **GREEDY)  # type: ignore[arg-type]
    prompt = engine.tokenizer.prompt_ids(HELLO)  # type: ignore[arg-type]
    # What the first request's cache holds: its prompt and every generated id but the last
    # (sampled, never fed). Another owner's run of the same greedy generation tells them.
    probe = engine.submit(ChatKey("probe/first"), prompt, SamplingParams(temperature=0, max_tokens=12))
    resident = prompt + (await probe.result()).token_ids[:-1]
    follow_ids = engine.tokenizer.prompt_ids(follow)  # type: ignore[arg-type]
    shared = next(
        (i for i, (a, b) in enumerate(zip(resident, follow_ids, strict=False)) if a != b), len(resident)
    )
    assert second.usage is not None
    assert second.usage.prompt_tokens_details is not None
    assert second.usage.prompt_tokens_details.cached_tokens == min(shared, len(follow_ids) - 2)


# ---- errors -------------------------------------------------------------------------------------


async def test_errors_have_openais_shape_and_status(server: ChatServer, api: AsyncOpenAI) -> None:
    """Unknown model 404, bad or unsupported parameters 400 naming the field, a prompt longer than
    the context 400: each the SDK's exception class, with OpenAI's error body."""
    with pytest.raises(openai.NotFoundError) as missing:
        await api.chat.completions.create(model="no-such-model", messages=HELLO)  # type: ignore[arg-type]
    assert missing.value.code == "model_not_found"
    assert missing.value.param == "model"
    for bad, param in (
        ({"temperature": 50}, None),
        ({"n": 0}, "n"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"logprobs": True}, "logprobs"),
    ):
        with pytest.raises(openai.BadRequestError) as refused:
            await api.chat.completions.create(model=model_id(server), messages=HELLO, **bad)  # type: ignore[call-overload]
        assert refused.value.param == param, bad
        body = refused.value.body
        assert isinstance(body, dict), body
        assert set(body) == {"message", "type", "param", "code"}, body
    image = [{"type": "image_url", "image_url": {"url": "data:,"}}]
    with pytest.raises(openai.BadRequestError) as refused:
        await api.chat.completions.create(
            model=model_id(server), messages=[{"role": "user", "content": image}]
        )  # type: ignore[list-item]
    assert refused.value.param == "messages[0].content[0]"
    with pytest.raises(openai.BadRequestError) as refused:
        await api.chat.completions.create(
            model=model_id(server), messages=[{"role": "user", "content": "word " * 400}]
        )
    assert refused.value.code == "context_length_exceeded"


async def test_body_limits_and_malformed_json(start_service: ServiceFactory) -> None:
    """A body over the limit is 413, malformed JSON 400: both in OpenAI's error shape."""
    async with start_service(max_body_bytes=2048) as server, httpx.AsyncClient(timeout=TIMEOUT_S) as http:
        url = f"{base_url(server)}/chat/completions"
        big = {"model": model_id(server), "messages": [{"role": "user", "content": "x" * 4096}]}
        response = await http.post(
            url, content=orjson.dumps(big), headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "body_too_large"
        response = await http.post(url, content=b"{not json", headers={"Content-Type": "application/json"})
        assert response.status_code == 400
        assert response.json()["error"]["type"] == "invalid_request_error"


async def test_full_queue_is_503(start_service: ServiceFactory) -> None:
    """When the engine's queue is full the SDK gets an ``APIStatusError`` with status 503."""
    async with start_service(engine={"max_waiting": 0}) as server:
        api = sdk(server)
        with pytest.raises(openai.APIStatusError) as refused:
            await api.chat.completions.create(model=model_id(server), messages=HELLO)  # type: ignore[arg-type]
        assert refused.value.status_code == 503
        await api.close()


async def test_concurrent_requests_per_user_are_limited(
    start_service: ServiceFactory, engine_gate: GateFactory
) -> None:
    """Past ``max_sessions`` generations at once for one user, a request is 429 (``RateLimitError``)."""
    async with start_service(max_sessions=2) as server:
        gate = engine_gate(server)
        gate.hold(0)
        api = sdk(server)
        running = await api.chat.completions.create(
            model=model_id(server),
            messages=HELLO,  # type: ignore[arg-type]
            n=2,
            stream=True,
            **GREEDY,
        )
        with pytest.raises(openai.RateLimitError):
            await api.chat.completions.create(model=model_id(server), messages=HELLO)  # type: ignore[arg-type]
        gate.release()
        assert len([c async for c in running if c.choices and c.choices[0].finish_reason]) == 2
        await api.close()


async def test_bearer_tokens_under_token_auth(start_service: ServiceFactory) -> None:
    """Under ``--auth token`` the API key is a user's token: missing, unknown or revoked is 401."""
    async with start_service(auth="token") as server:
        token = secrets.token_urlsafe(32)
        await server.store.add_user("ada", token_hash(token))
        async with sdk(server, "not-a-token") as stranger:
            with pytest.raises(openai.AuthenticationError):
                await stranger.models.list()
        async with httpx.AsyncClient(timeout=TIMEOUT_S) as http:  # the SDK always sends a key
            response = await http.get(f"{base_url(server)}/models")
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
        ada = sdk(server, token)
        assert (await ada.chat.completions.create(model=model_id(server), messages=HELLO, **GREEDY)).choices  # type: ignore[arg-type]
        assert await server.store.revoke_user("ada")
        with pytest.raises(openai.AuthenticationError):
            await ada.chat.completions.create(model=model_id(server), messages=HELLO)  # type: ignore[arg-type]
        await ada.close()


# ---- leaving early --------------------------------------------------------------------------------


async def test_closing_a_stream_cancels_its_generation_within_one_step(
    server: ChatServer, api: AsyncOpenAI, engine_gate: GateFactory
) -> None:
    """The client closes the stream after the first text: the engine runs at most the one step it
    was in when the cancel came, and the cancellation counts as a disconnect."""
    (engine,) = server.models.loaded()
    gate = engine_gate(server)
    permits = 4  # the prefill and three decode steps; the fifth run waits at the gate
    gate.hold(permits)
    stream = await api.chat.completions.create(
        model=model_id(server),
        messages=HELLO,  # type: ignore[arg-type]
        stream=True,
        temperature=0,
        max_tokens=200,
    )
    (reply,) = server._generations.values()
    cancelled = noting_cancels(reply)
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            break
    await stream.close()
    await asyncio.wait_for(cancelled.wait(), TIMEOUT_S)  # the server saw the client leave
    gate.release()
    await server.idle()
    result = _result(reply)
    assert result.reason is FinishReason.CANCELLED
    assert result.completion_tokens <= permits + 1
    assert engine.stats.generated_tokens <= permits + 1
    _, _, body = await _get(server, "/metrics")
    assert 'localchat_cancellations_total{cause="disconnect"} 1.0' in body


def _result(reply: Reply) -> Any:
    assert reply.result is not None
    return reply.result


async def _get(server: ChatServer, path: str) -> tuple[int, str, str]:
    async with httpx.AsyncClient(timeout=TIMEOUT_S) as http:
        response = await http.get(f"http://127.0.0.1:{server.port}{path}")
        return response.status_code, response.headers.get("content-type", ""), response.text


async def test_keep_alive_comments_while_queued(
    start_service: ServiceFactory, engine_gate: GateFactory
) -> None:
    """While a streamed request waits for the engine, comment lines keep the connection alive."""
    async with start_service(sse_keepalive_s=0.05) as server:
        gate = engine_gate(server)
        gate.hold(0)
        body = {"model": model_id(server), "messages": HELLO, "stream": True, **GREEDY}
        lines: list[str] = []
        async with (
            httpx.AsyncClient(timeout=TIMEOUT_S) as http,
            http.stream("POST", f"{base_url(server)}/chat/completions", json=body) as response,
        ):
            async for line in response.aiter_lines():
                lines.append(line)
                if line == ": keep-alive":
                    gate.release()
                if line == "data: [DONE]":
                    break
        first_text = next(i for i, line in enumerate(lines) if '"content":"' in line and '"role"' not in line)
        assert ": keep-alive" in lines[:first_text]


# ---- curl -------------------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
async def test_curl_streams_server_sent_events(server: ChatServer) -> None:
    """``curl -N`` sees the raw stream: ``data:`` lines of JSON chunks separated by blank lines,
    ending with ``data: [DONE]``."""
    body = orjson.dumps({"messages": HELLO, "stream": True, **GREEDY}).decode()
    command = [
        "curl", "-sS", "-N", f"{base_url(server)}/chat/completions",
        "-H", "Content-Type: application/json", "-H", "Authorization: Bearer unused", "-d", body,
    ]  # fmt: skip
    done = await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    events = [e for e in done.stdout.split("\n\n") if e]
    assert all(e.startswith("data: ") and "\n" not in e for e in events), done.stdout
    assert events[-1] == "data: [DONE]"
    chunks = [orjson.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
