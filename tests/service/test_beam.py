"""``POST /stream_chat_beam`` against the real service on the tiny model, over HTTP: the raw SSE
frames checked against schema/openapi.yaml, limits, and a client that leaves mid-search."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import httpx
import numpy as np
import orjson
import pytest

from service.app import running_service
from service.config import EngineSettings, ServiceSettings
from service.core.reply import Reply
from service.engine.beam import log_softmax
from service.engine.loader import load_engine
from service.engine.models.registry import PreparedModel
from service.engine.runner import Runner
from service.engine.tokenizer import ChatTokenizer
from service.engine.types import BeamResult, FinishReason
from service.server import ChatServer
from tests.engine_gate import GateFactory
from tests.protocol.openapi_check import validate_event, validate_json, validate_request
from tests.service.client import TIMEOUT_S
from tests.service.conftest import noting_cancels

PATH = "/stream_chat_beam"


def url(server: ChatServer) -> str:
    return f"http://127.0.0.1:{server.port}{PATH}"


async def stream(server: ChatServer, body: dict[str, Any]) -> tuple[list[str], list[dict[str, Any]]]:
    """POST ``body`` as ``curl --json`` would; the raw lines and the decoded, validated events."""
    validate_request("POST", PATH, body)
    lines: list[str] = []
    async with (
        httpx.AsyncClient(timeout=TIMEOUT_S) as http,
        http.stream("POST", url(server), json=body, headers={"Accept": "application/json"}) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        async for line in response.aiter_lines():
            lines.append(line)
    events = [orjson.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data: ")]
    for event in events:
        validate_event("POST", PATH, 200, event)
    return lines, events


async def test_stream_chat_beam_streams_the_agreed_prefix_then_the_winner(server: ChatServer) -> None:
    """final_prefix frames, one winner_tail, done: the frames add up to the winner, the early ones
    cover ``streamed_early`` tokens, the winner has the best score; use_rerank names its scorer;
    a width past the cap is 400."""
    body = {"messages": ["Bonjour"], "beam_width": 2, "max_tokens": 10}
    lines, events = await stream(server, body)
    assert all(line.startswith(("data: ", ": ")) or line == "" for line in lines)
    *early, tail, done = events
    assert [e["type"] for e in early] == ["final_prefix"] * len(early)
    assert (tail["type"], done["type"], done["done"]) == ("winner_tail", "done", True)
    assert done["streamed_early"] == sum(e["tokens"] for e in early) > 0
    assert [e["index"] for e in early] == [sum(x["tokens"] for x in early[:i]) for i in range(len(early))]
    assert tail["index"] == done["streamed_early"]
    assert tail["index"] + tail["tokens"] == done["total_tokens"] == done["usage"]["completion_tokens"]
    winner = done["candidates"][0]
    assert "".join(e["text"] for e in early) + tail["text"] == winner["text"]
    assert winner["score"] == max(c["score"] for c in done["candidates"])
    assert (done["scorer"], done["beam_width"], len(done["candidates"])) == ("logprob", 2, 2)

    _, reranked = await stream(server, {**body, "use_rerank": True, "beam_width": 3})
    done = reranked[-1]
    assert done["scorer"] == "length_normalised"
    for candidate in done["candidates"]:
        assert abs(candidate["score"] - candidate["logprob"] / candidate["tokens"]) < 1e-9

    async with httpx.AsyncClient(timeout=TIMEOUT_S) as http:
        refused = await http.post(url(server), json={**body, "beam_width": 9})
    assert refused.status_code == 400
    validate_json("POST", PATH, 400, refused.json())
    assert "beam_width" in refused.json()["error"]


async def test_a_client_that_leaves_cancels_the_search_within_one_step(
    server: ChatServer, engine_gate: GateFactory
) -> None:
    """The client closes the stream while the engine holds the fifth model run: the search ends
    after that run, cancelled as a disconnect."""
    (engine,) = server.models.loaded()
    gate = engine_gate(server)
    permits = 4  # the prefill and three decode steps; the fifth run waits at the gate
    gate.hold(permits)
    body = {"messages": ["Count"], "beam_width": 3, "max_tokens": 200}
    async with (
        httpx.AsyncClient(timeout=TIMEOUT_S) as http,
        http.stream("POST", url(server), json=body) as response,
    ):
        assert response.status_code == 200
        await server.wait_until(lambda: len(server._generations) == 1)
        (reply,) = server._generations.values()
        cancelled = noting_cancels(reply)
    await asyncio.wait_for(cancelled.wait(), TIMEOUT_S)  # the server saw the client leave
    gate.release()
    await server.idle()
    result = _result(reply)
    assert result.reason is FinishReason.CANCELLED
    assert engine.stats.decode_steps <= permits  # the three, and at most the one it was in
    assert engine.stats.running == 0


def _result(reply: Reply) -> BeamResult:
    assert isinstance(reply.result, BeamResult)
    return reply.result


def mean_logprob(runner: Runner, prompt: list[int], tokens: list[int]) -> float:
    """The mean log-probability of ``tokens`` after ``prompt``, teacher-forced on a bare runner (the
    prompt in one prefill, then one token per decode step, as the engine computes them)."""
    logits = runner.forward(0, np.asarray([prompt], dtype=np.int64), [0])
    total = 0.0
    for i, token in enumerate(tokens):
        total += float(log_softmax(logits[0:1])[0, token])
        logits = runner.forward(0, np.asarray([[token]], dtype=np.int64), [len(prompt) + i])
    return total / len(tokens)


async def test_a_reranker_model_ranks_the_candidates(
    service_settings: ServiceSettings, tiny_base_model: PreparedModel
) -> None:
    """With ``--reranker`` another offered model (another vocabulary here) scores each candidate's
    text by its mean log-probability, recomputed here on a bare runner; the best score wins and the
    frames still add up to it."""
    reranker = tiny_base_model.directory.name
    settings = dataclasses.replace(
        service_settings,
        models=(*service_settings.models, str(tiny_base_model.directory)),
        server=dataclasses.replace(service_settings.server, reranker=reranker),
    )
    body = {"messages": ["Bonjour"], "beam_width": 3, "max_tokens": 6, "use_rerank": True}
    async with running_service(settings) as server:
        _, events = await stream(server, body)
    *early, tail, done = events
    assert done["scorer"] == f"reranker:{reranker}"
    candidates = done["candidates"]
    assert "".join(e["text"] for e in early) + tail["text"] == candidates[0]["text"]
    assert tail["index"] + tail["tokens"] == done["total_tokens"] == candidates[0]["tokens"]
    scores = [c["score"] for c in candidates]
    assert scores == sorted(scores, reverse=True)
    tokenizer = ChatTokenizer.from_dir(tiny_base_model.directory)
    runner = load_engine(tiny_base_model, EngineSettings(threads=2, kv_slots=2, max_context=256)).runner
    assert isinstance(runner, Runner)
    prompt = tokenizer.prompt_ids([{"role": "user", "content": "Bonjour"}])
    for candidate in candidates:
        expected = mean_logprob(runner, prompt, tokenizer.encode(candidate["text"]))
        assert candidate["score"] == pytest.approx(expected, abs=1e-3)
