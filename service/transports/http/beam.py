"""``POST /stream_chat_beam``: a beam search over a conversation, streamed honestly.

The request is ``{"messages", "beam_width"?, "max_tokens"?, "use_rerank"?, "model"?}``. The
server-sent events:

- ``{"type": "final_prefix", "text", "index", "tokens"}``: text of tokens every beam that can still
  win agrees on, sent as soon as that is known (``index``: the first token it covers; ``tokens``:
  how many it covers; bytes of an unfinished character are held back, as in ``chat.v1``);
- ``{"type": "winner_tail", "text", "index", "tokens"}``: once, at the end: the rest of the winner;
- ``{"type": "done", "done": true, ...}``: the reason, how many tokens streamed early, the scorer,
  the candidates (the winner first) with their log-probabilities and scores, usage and timing;
- ``{"error": "..."}`` instead, if the search fails or the server cancels it.

Beams follow the model's own log-probabilities: ``temperature``, ``top_p`` and the other
sampling fields are ignored. ``beam_width`` is at most ``MAX_BEAM_WIDTH`` (and the engine's
batch), else 400. The winner is the finished beam with the best cumulative log-probability; with
``"use_rerank": true`` the best length-normalised log-probability (cumulative log-probability
over the number of tokens), or, when the server runs with ``--reranker MODEL``, the best mean
log-probability of its text under that model (``ChatCore.rerank``; scorer ``reranker:MODEL``).
Nothing is stored: the request is in no chat. A client that goes away cancels the search (or
its re-ranking) within one decode step.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from sse_starlette import ServerSentEvent
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from service.config import ServerSettings
from service.core.chats import ChatCore
from service.core.metrics import CancelCause
from service.core.reply import Reply, timing_of, usage_of
from service.engine.beam import ScorerName
from service.engine.types import BeamResult, Delta, FinishReason, GenerationResult
from service.errors import ModelError, ServiceError
from service.transports.http.plain import PlainError, PlainRoutes, data_event, messages_from

MAX_BEAM_WIDTH = 8
DEFAULT_BEAM_WIDTH = 4


@dataclass(slots=True)
class _QueueSink:
    queue: asyncio.Queue[Delta | GenerationResult]

    def delta(self, delta: Delta) -> None:
        self.queue.put_nowait(delta)

    def done(self, reply: Reply, result: GenerationResult) -> None:
        self.queue.put_nowait(result)


def _int(body: dict[str, Any], name: str, default: int | None) -> int | None:
    value = body.get(name, default)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise PlainError(400, f"{name} must be an integer")
    return value


class BeamRoutes(PlainRoutes):
    def __init__(self, core: ChatCore, settings: ServerSettings) -> None:
        super().__init__(core, settings)
        if settings.reranker is not None and settings.reranker not in core.models:
            offered = ", ".join(m["id"] for m in core.models.describe())
            raise ModelError(f"--reranker {settings.reranker!r} is not an offered model ({offered})")

    def routes(self) -> list[BaseRoute]:
        return [Route("/stream_chat_beam", self.endpoint(self.stream_chat_beam), methods=["POST"])]

    async def stream_chat_beam(self, request: Request) -> Response:
        sent_at = time.perf_counter()
        user = await self.user(request)
        body = await self.body(request)
        messages = messages_from(body.get("messages"))
        width = _int(body, "beam_width", DEFAULT_BEAM_WIDTH)
        assert width is not None
        if not 1 <= width <= MAX_BEAM_WIDTH:
            raise PlainError(400, f"beam_width must be between 1 and {MAX_BEAM_WIDTH}")
        max_tokens = _int(body, "max_tokens", None)
        rerank = body.get("use_rerank", False)
        if not isinstance(rerank, bool):
            raise PlainError(400, "use_rerank must be true or false")
        reranker = self.settings.reranker if rerank else None
        scorer: ScorerName = "logprob" if not rerank else "reranker" if reranker else "length_normalised"
        model, engine = await self.engine(body.get("model"))
        given = {} if max_tokens is None else {"max_tokens": max_tokens}
        params = self.core.sampling(given)  # InvalidParams past the server's max_tokens: 400
        prompt = engine.tokenizer.prompt_ids(messages)
        reply = self.core.submit_beam(
            user,
            engine,
            prompt,
            params,
            width,
            scorer=scorer,
            sent_at=sent_at,
            turn_stops=engine.tokenizer.turn_stops,
        )
        queue: asyncio.Queue[Delta | GenerationResult] = asyncio.Queue()
        reply.attach(_QueueSink(queue))

        async def finish(result: BeamResult) -> BeamResult:
            if reranker is None:
                return result
            return await self.core.rerank(user, result, messages, reranker)

        return self.events(_events(reply, queue, model, finish))


async def _events(
    reply: Reply,
    queue: asyncio.Queue[Delta | GenerationResult],
    model: str,
    finish: Callable[[BeamResult], Awaitable[BeamResult]],
) -> AsyncIterator[ServerSentEvent]:
    """The stream; leaving it early (the client went away) cancels the search."""
    try:
        while True:
            event = await queue.get()
            if isinstance(event, Delta):
                if event.text:
                    yield data_event(_piece("final_prefix", event.text, event.index, event.tokens))
                continue
            if event.reason is FinishReason.ERROR:
                yield data_event({"error": event.error or "the beam search failed"})
                return
            if event.reason is FinishReason.CANCELLED or not isinstance(event, BeamResult):
                yield data_event({"error": "the beam search was cancelled by the server"})
                return
            try:
                event = await finish(event)
            except ServiceError as exc:
                yield data_event({"error": str(exc)})
                return
            tail_tokens = event.completion_tokens - event.streamed_early
            yield data_event(_piece("winner_tail", event.tail, event.streamed_early, tail_tokens))
            yield data_event(_done(event, model))
            return
    finally:
        if not reply.done.is_set():
            reply.cancel(CancelCause.DISCONNECT)


def _piece(kind: str, text: str, index: int, tokens: int) -> dict[str, Any]:
    return {"type": kind, "text": text, "index": index, "tokens": tokens}


def _done(result: BeamResult, model: str) -> dict[str, Any]:
    return {
        "type": "done",
        "done": True,
        "model": model,
        "reason": result.reason.value,
        "total_tokens": result.completion_tokens,
        "streamed_early": result.streamed_early,
        "beam_width": result.width,
        "scorer": result.scorer,
        "steps": result.steps,
        "candidates": [
            {
                "text": c.text,
                "tokens": len(c.token_ids),
                "logprob": c.logprob,
                "score": c.score,
                "reason": c.reason.value,
            }
            for c in result.candidates
        ],
        "usage": usage_of(result),
        "timing": timing_of(result),
    }
