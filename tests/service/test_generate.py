"""The plain generation routes (/generate, /stream, /chat, /generate_batch, /tokenize,
/detokenize) against one real service on the tiny model, under ``--auth token``, driven by curl
and httpx; every response is checked against schema/openapi.yaml."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import secrets
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from service.engine.engine import Engine
from service.engine.models.registry import PreparedModel
from service.engine.tokenizer import ChatMessage, ChatTokenizer
from service.engine.types import FinishReason
from service.server import ChatServer
from service.store.records import token_hash
from tests.conftest import fresh_database
from tests.engine_gate import GateFactory
from tests.protocol.openapi_check import validate_event, validate_json, validate_request
from tests.service.client import TIMEOUT_S
from tests.service.conftest import noting_cancels, serving, tiny_settings

GREEDY: dict[str, Any] = {"temperature": 0, "max_tokens": 8}
PROMPT = "Say hello to the lighthouse keeper."
BATCH = 8  # the service's --max-batch-prompts


class Service:
    """The module's running service and a user's token."""

    def __init__(self, server: ChatServer, token: str) -> None:
        self.server = server
        self.token = token
        self.url = f"http://127.0.0.1:{server.port}"
        self.auth = {"Authorization": f"Bearer {token}"}

    async def engine(self) -> Engine:
        """The default model's engine."""
        return await self.server.models.engine(self.server.models.default_id)

    async def post(
        self, path: str, body: Any, *, headers: dict[str, str] | None = None, content: bytes | None = None
    ) -> httpx.Response:
        async with httpx.AsyncClient(timeout=TIMEOUT_S) as http:
            return await http.post(
                self.url + path,
                content=orjson.dumps(body) if content is None else content,
                headers=self.auth if headers is None else headers,
            )

    async def json(self, path: str, body: Any, status: int = 200, **kwargs: Any) -> Any:
        """The JSON answer of ``path``, expected with ``status`` and checked against the document
        (and so is the request, when it is expected to succeed)."""
        if status == 200:
            validate_request("POST", path, body)
        response = await self.post(path, body, **kwargs)
        assert response.status_code == status, response.text
        assert response.headers["content-type"].startswith("application/json")
        value = response.json()
        validate_json("POST", path, status, value)
        return value

    async def events(self, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
        """The decoded ``data:`` payloads of a streamed answer, each checked (the request too)."""
        validate_request("POST", path, body)
        response = await self.post(path, body)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("text/event-stream")
        return decoded(path, response.text)


def decoded(path: str, stream: str) -> list[dict[str, Any]]:
    events = []
    for block in stream.split("\n\n"):
        data = [line.removeprefix("data: ") for line in block.split("\n") if line.startswith("data: ")]
        if data:
            event = orjson.loads("\n".join(data))
            validate_event("POST", path, 200, event)
            events.append(event)
    return events


def text_of(events: list[dict[str, Any]]) -> str:
    return "".join(e["token"] for e in events if "token" in e)


@pytest.fixture(scope="module")
async def service(
    postgres_admin_dsn: str,
    tiny_model: PreparedModel,
    tiny_base_model: PreparedModel,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[Service]:
    """The tiny chat model (the default) and the tiny base model, under ``--auth token``."""
    data_dir: Path = tmp_path_factory.mktemp("generate")
    async with fresh_database(postgres_admin_dsn) as url:
        models = (str(tiny_model.directory), str(tiny_base_model.directory))
        settings = dataclasses.replace(tiny_settings(url, tiny_model, data_dir), models=models)
        async with serving(settings, auth="token", max_batch_prompts=BATCH) as server:
            token = secrets.token_urlsafe(32)
            await server.store.add_user("ada", token_hash(token))
            yield Service(server, token)


def metric(body: str, name: str) -> float:
    line = next((line for line in body.splitlines() if line.startswith(name + " ")), None)
    return 0.0 if line is None else float(line.split()[-1])


async def cancellations(service: Service) -> float:
    async with httpx.AsyncClient(timeout=TIMEOUT_S) as http:
        body = (await http.get(service.url + "/metrics")).text
    return metric(body, 'localchat_cancellations_total{cause="disconnect"}')


# ---- streams ---------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
async def test_curl_json_streams_token_lines_then_done(service: Service) -> None:
    """``curl -N --json`` (which sends ``Accept: application/json``) gets the raw event stream:
    one ``data:`` line per event, token indices counting generated tokens from 0, then ``done``
    whose usage matches; and the whole answer (``stream: false``) has the same text."""
    request = {"prompt": PROMPT, **GREEDY}
    validate_request("POST", "/generate", request)
    body = orjson.dumps(request).decode()
    command = [
        "curl", "-sS", "-N", "-X", "POST", f"{service.url}/generate", "--json", body,
        "-H", f"Authorization: Bearer {service.token}",
    ]  # fmt: skip
    done = await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    blocks = [b for b in done.stdout.split("\n\n") if b and not b.startswith(":")]
    assert all(b.startswith("data: {") and "\n" not in b for b in blocks), done.stdout
    events = decoded("/generate", done.stdout)
    *tokens, last = events
    assert tokens, "the tiny model says something in 8 tokens"
    assert tokens[0]["index"] == 0
    for before, after in itertools.pairwise(tokens):
        assert after["index"] >= before["index"] + before.get("tokens", 1)
    assert last["done"] is True
    assert last["total_tokens"] == last["usage"]["completion_tokens"] <= GREEDY["max_tokens"]
    assert tokens[-1]["index"] + tokens[-1].get("tokens", 1) <= last["total_tokens"]
    assert (last["reason"] == "length") == (last["total_tokens"] == GREEDY["max_tokens"])

    whole = await service.json("/generate", {"prompt": PROMPT, "params": GREEDY, "stream": False})
    assert whole["input"] == PROMPT
    assert whole["output_text"] == text_of(events)
    assert len(whole["output_ids"]) == whole["usage"]["completion_tokens"] == last["total_tokens"]
    detokenized = await service.json("/detokenize", {"ids": whole["output_ids"]})
    assert detokenized["text"].startswith(whole["output_text"])


async def test_stream_chat_and_raw_prompts(service: Service) -> None:
    """``/stream`` is ``/generate``'s stream; ``/chat`` of one user message is the same prompt; the
    string and object forms of a conversation are one; ``raw`` skips the chat template."""
    generated = await service.events("/generate", {"prompt": PROMPT, **GREEDY})
    streamed = await service.events("/stream", {"prompt": PROMPT, "params": GREEDY})
    chatted = await service.events("/chat", {"messages": [PROMPT], **GREEDY})
    assert text_of(streamed) == text_of(chatted) == text_of(generated)
    assert streamed[-1]["usage"]["prompt_tokens"] == generated[-1]["usage"]["prompt_tokens"]

    turns = [PROMPT, "Hello, keeper.", "What do you see?"]
    roles = ["user", "assistant", "user"]
    as_strings = await service.events("/chat", {"messages": turns, **GREEDY})
    as_objects = await service.json(
        "/chat",
        {"messages": [{"role": r, "content": t} for r, t in zip(roles, turns, strict=True)], "stream": False}
        | GREEDY,
    )
    assert as_objects["output_text"] == text_of(as_strings)
    assert as_strings[-1]["usage"]["prompt_tokens"] > generated[-1]["usage"]["prompt_tokens"]

    ids = (await service.json("/tokenize", {"text": PROMPT}))["ids"]
    raw = await service.json("/generate", {"prompt": PROMPT, "raw": True, "stream": False, **GREEDY})
    assert raw["usage"]["prompt_tokens"] == len(ids)  # no template around it (this vocabulary adds no BOS)
    assert generated[-1]["usage"]["prompt_tokens"] > len(ids)


async def test_a_base_model_always_gets_the_prompt_raw(
    service: Service, tiny_base_model: PreparedModel
) -> None:
    """A model without a chat template gets the prompt as the start of a document (its BOS
    first), never its chat transcript, ``raw`` or not."""
    tokenizer = ChatTokenizer.from_dir(tiny_base_model.directory)
    document = tokenizer.encode_document(PROMPT)
    transcript = tokenizer.prompt_ids([ChatMessage(role="user", content=PROMPT)])
    assert len(document) != len(transcript)
    for raw in (False, True):
        body = {"prompt": PROMPT, "model": "tiny-base", "raw": raw, "stream": False, **GREEDY}
        answer = await service.json("/generate", body)
        assert answer["usage"]["prompt_tokens"] == len(document), raw


# ---- batch -----------------------------------------------------------------------------------


async def test_batch_decodes_its_prompts_in_shared_steps(service: Service) -> None:
    """Eight prompts answer in order, as each would alone, and decode together: the engine ran
    far fewer decode steps than it generated tokens. Nine are refused (413)."""
    engine = await service.engine()
    prompts = [f"Tell me about lighthouse number {i}." for i in range(BATCH)]
    params = {"temperature": 0, "max_tokens": 16}
    await service.server.idle()
    steps, tokens = engine.stats.decode_steps, engine.stats.generated_tokens
    answers = await service.json("/generate_batch", {"prompts": prompts, **params})
    decode_steps = engine.stats.decode_steps - steps
    generated = engine.stats.generated_tokens - tokens
    assert [a["input"] for a in answers] == prompts
    assert generated == sum(a["usage"]["completion_tokens"] for a in answers)
    # One prompt at a time would take a decode step per token but its first: about `generated`.
    longest = max(a["usage"]["completion_tokens"] for a in answers)
    assert decode_steps <= longest + BATCH, (decode_steps, generated)
    assert generated >= 4 * decode_steps, (decode_steps, generated)
    for i in (0, BATCH - 1):
        alone = await service.json("/generate", {"prompt": prompts[i], "stream": False, **params})
        assert alone["output_text"] == answers[i]["output_text"]

    refused = await service.json("/generate_batch", {"prompts": [*prompts, "one more"]}, 413)
    assert "--max-batch-prompts" in refused["error"]


# ---- tokens ----------------------------------------------------------------------------------


async def test_tokenize_detokenize_round_trip(service: Service) -> None:
    """Text becomes ids and back unchanged; ids outside the vocabulary are 400."""
    text = "Grüße an den Leuchtturmwärter 🗼, <|im_start|> und gute Nacht."
    ids = (await service.json("/tokenize", {"text": text}))["ids"]
    assert ids
    assert all(isinstance(i, int) for i in ids)
    assert (await service.json("/detokenize", {"ids": ids}))["text"] == text
    vocab = (await service.engine()).tokenizer.vocab_size
    for bad in ([vocab], [-1], ["1"], [True], "12"):
        refused = await service.json("/detokenize", {"ids": bad}, 400)
        assert str(vocab - 1) in refused["error"]
    await service.json("/tokenize", {"text": 12}, 400)


# ---- refusals --------------------------------------------------------------------------------


async def test_refusals_have_statuses_and_messages(service: Service) -> None:
    """Malformed JSON, bad fields and params 400, an unknown model 404, a prompt past the
    context 413, a missing or unknown token 401; nothing runs for any of them."""
    engine = await service.engine()
    generations = engine.stats.generated_tokens
    cases: list[tuple[str, Any, int, str]] = [
        ("/generate", {"prompt": PROMPT, "temperature": 50}, 400, "temperature"),
        ("/generate", {"prompt": PROMPT, "params": {"max_tokens": "many"}}, 400, "max_tokens"),
        ("/generate", {"prompt": PROMPT, "params": [1]}, 400, "params"),
        ("/generate", {"prompt": ""}, 400, "prompt"),
        ("/generate", {"prompt": PROMPT, "stream": "yes"}, 400, "stream"),
        ("/generate", {"prompt": PROMPT, "model": "no-such-model"}, 404, "no-such-model"),
        ("/generate", {"prompt": "word " * 400}, 413, "context"),
        ("/stream", {"prompt": PROMPT, "raw": 1}, 400, "raw"),
        ("/chat", {"messages": ["one", "two"]}, 400, "messages"),
        ("/chat", {"messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0]"),
        ("/generate_batch", {"prompts": []}, 400, "prompts"),
        ("/generate_batch", {"prompts": [PROMPT], "model": 7}, 400, "model"),
        ("/tokenize", {"text": "x", "model": "no-such-model"}, 404, "no-such-model"),
    ]
    for path, body, status, needle in cases:
        refused = await service.json(path, body, status)
        assert needle in refused["error"], (path, body, refused)
    malformed = await service.json("/generate", None, 400, content=b'{"prompt": ')
    assert "JSON" in malformed["error"]
    await service.json("/generate", None, 400, content=b'["a list"]')
    for headers in ({}, {"Authorization": "Bearer not-a-token"}, {"Authorization": service.token}):
        await service.json("/generate", {"prompt": PROMPT}, 401, headers=headers)
        await service.json("/detokenize", {"ids": [1]}, 401, headers=headers)
    assert engine.stats.generated_tokens == generations


# ---- leaving early ---------------------------------------------------------------------------


async def test_closing_a_stream_cancels_within_one_step(service: Service, engine_gate: GateFactory) -> None:
    """The client closes ``/generate``'s stream after its first token: the engine runs at most the
    step it was in, and the cancellation counts as a disconnect."""
    server = service.server
    engine = await service.engine()
    await server.idle()
    before, disconnects = engine.stats.generated_tokens, await cancellations(service)
    gate = engine_gate(server)
    permits = 4  # the prefill and three decode steps; the fifth run waits at the gate
    gate.hold(permits)
    body = {"prompt": PROMPT, "temperature": 0, "max_tokens": 200}
    validate_request("POST", "/generate", body)
    async with (
        httpx.AsyncClient(timeout=TIMEOUT_S) as http,
        http.stream("POST", f"{service.url}/generate", json=body, headers=service.auth) as response,
    ):
        assert response.status_code == 200
        (reply,) = server._generations.values()
        cancelled = noting_cancels(reply)
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                validate_event("POST", "/generate", 200, orjson.loads(line.removeprefix("data: ")))
                break
    await asyncio.wait_for(cancelled.wait(), TIMEOUT_S)  # the server saw the client leave
    gate.release()
    await server.idle()
    assert reply.result is not None
    assert reply.result.reason is FinishReason.CANCELLED
    assert reply.result.completion_tokens <= permits + 1
    assert engine.stats.generated_tokens - before <= permits + 1
    assert await cancellations(service) == disconnects + 1


async def test_leaving_a_whole_batch_cancels_it(service: Service, engine_gate: GateFactory) -> None:
    """A client that leaves while waiting for ``/generate_batch``'s answer cancels every prompt."""
    server = service.server
    await server.idle()
    disconnects = await cancellations(service)
    gate = engine_gate(server)
    gate.hold(0)
    prompts = [f"Count to {i}." for i in range(3)]
    body = {"prompts": prompts, "max_tokens": 200}
    validate_request("POST", "/generate_batch", body)
    request = asyncio.create_task(service.post("/generate_batch", body))
    await server.wait_until(lambda: len(server._generations) == len(prompts))
    replies = list(server._generations.values())
    noted = [noting_cancels(reply) for reply in replies]
    request.cancel()  # closes the connection
    with pytest.raises(asyncio.CancelledError):
        await request
    await asyncio.wait_for(asyncio.gather(*(c.wait() for c in noted)), TIMEOUT_S)
    gate.release()
    await server.idle()
    # The engine was held in its first run (a prefill): that one run ends, then nothing more.
    assert all(r.result is not None and r.result.reason is FinishReason.CANCELLED for r in replies)
    assert sum(r.result.completion_tokens for r in replies if r.result is not None) <= 1
    assert await cancellations(service) == disconnects + len(prompts)
