"""One-shot and streaming generation for scripts: ``POST /generate``, ``/stream``, ``/chat``,
``/generate_batch``, ``/tokenize`` and ``/detokenize`` (schema/openapi.yaml).

Every generation is a stateless request of the chat core (``submit_choices`` /
``submit_batch``): admitted by the engine, counted against the user's limit and in the metrics,
kept in no chat. A client that leaves cancels it (see :mod:`service.transports.http.held`).

A stream is ``data: {"token", "index"}`` per piece of text, then ``data: {"done": true, ...}``,
or ``data: {"error"}`` when the generation fails; it streams whatever ``Accept`` says.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from sse_starlette import ServerSentEvent
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from service.core.metrics import CancelCause
from service.core.reply import timing_of, usage_of
from service.engine.engine import Engine
from service.engine.tokenizer import ChatMessage
from service.engine.types import Delta, FinishReason, GenerationResult
from service.store.records import User
from service.transports.http.held import HeldReplies
from service.transports.http.plain import (
    PlainError,
    PlainRoutes,
    data_event,
    messages_from,
    params_from,
    token_data,
)


def failure(result: GenerationResult) -> PlainError | None:
    """Why a generation gave no answer (the engine failed, the server cancelled it)."""
    if result.reason is FinishReason.ERROR:
        return PlainError(500, result.error or "generation failed")
    if result.reason is FinishReason.CANCELLED:
        return PlainError(503, "the generation was cancelled by the server")
    return None


def _flag(body: dict[str, Any], name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise PlainError(400, f"{name} must be a boolean")
    return value


def _text(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value:
        raise PlainError(400, f"{name} must be a non-empty string")
    return value


class GenerateRoutes(PlainRoutes):
    def routes(self) -> list[BaseRoute]:
        return [
            Route("/generate", self.endpoint(self.generate), methods=["POST"]),
            Route("/stream", self.endpoint(self.stream), methods=["POST"]),
            Route("/chat", self.endpoint(self.chat), methods=["POST"]),
            Route("/generate_batch", self.endpoint(self.generate_batch), methods=["POST"]),
            Route("/tokenize", self.endpoint(self.tokenize), methods=["POST"]),
            Route("/detokenize", self.endpoint(self.detokenize), methods=["POST"]),
        ]

    # ---- endpoints -----------------------------------------------------------------------

    async def generate(self, request: Request) -> Response:
        """One prompt; streamed unless ``"stream": false``."""
        return await self._prompt(request, streaming=None)

    async def stream(self, request: Request) -> Response:
        """``/generate``, always streamed."""
        return await self._prompt(request, streaming=True)

    async def chat(self, request: Request) -> Response:
        """A conversation, under the model's chat template; streamed unless ``"stream": false``."""
        user, body = await self.user(request), await self.body(request)
        messages = messages_from(body.get("messages"))
        streaming = _flag(body, "stream", True)
        name, engine = await self.engine(body.get("model"))
        ids = engine.tokenizer.prompt_ids(messages)
        held = self._start(user, body, name, engine, [ids], engine.tokenizer.turn_stops)
        if streaming:
            return self.events(_stream(held))
        return await _whole(held, request, [body["messages"]], many=False)

    async def generate_batch(self, request: Request) -> Response:
        """Several prompts, decoded together: a JSON list of the answers, in order."""
        user, body = await self.user(request), await self.body(request)
        prompts = body.get("prompts")
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p for p in prompts):
            raise PlainError(400, "prompts must be a non-empty list of non-empty strings")
        limit = self.settings.max_batch_prompts
        if len(prompts) > limit:
            raise PlainError(
                413, f"at most {limit} prompts per batch (--max-batch-prompts); got {len(prompts)}"
            )
        raw = _flag(body, "raw", False)
        name, engine = await self.engine(body.get("model"))
        encoded = [_encoded(engine, prompt, raw) for prompt in prompts]
        held = self._start(user, body, name, engine, [ids for ids, _ in encoded], encoded[0][1])
        return await _whole(held, request, prompts, many=True)

    async def tokenize(self, request: Request) -> Response:
        """``{"text"}`` as the model's token ids, as written (no special tokens added)."""
        await self.user(request)
        body = await self.body(request)
        text = body.get("text")
        if not isinstance(text, str):
            raise PlainError(400, "text must be a string")
        _, engine = await self.engine(body.get("model"))
        return JSONResponse({"ids": engine.tokenizer.encode(text)})

    async def detokenize(self, request: Request) -> Response:
        """``{"ids"}`` as text (special tokens included); 400 for an id outside the vocabulary."""
        await self.user(request)
        body = await self.body(request)
        _, engine = await self.engine(body.get("model"))
        ids = body.get("ids")
        vocab = engine.tokenizer.vocab_size
        if not isinstance(ids, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab for i in ids
        ):
            raise PlainError(400, f"ids must be a list of token ids, each in 0..{vocab - 1}")
        return JSONResponse({"text": engine.tokenizer.decode(ids)})

    # ---- the parts -----------------------------------------------------------------------

    async def _prompt(self, request: Request, *, streaming: bool | None) -> Response:
        user, body = await self.user(request), await self.body(request)
        prompt = _text(body, "prompt")
        raw = _flag(body, "raw", False)
        if streaming is None:
            streaming = _flag(body, "stream", True)
        name, engine = await self.engine(body.get("model"))
        ids, stops = _encoded(engine, prompt, raw)
        held = self._start(user, body, name, engine, [ids], stops)
        if streaming:
            return self.events(_stream(held))
        return await _whole(held, request, [prompt], many=False)

    def _start(
        self,
        user: User,
        body: dict[str, Any],
        model: str,
        engine: Engine,
        prompts: list[list[int]],
        turn_stops: tuple[str, ...],
    ) -> HeldReplies:
        """Submit the prompts (one reply each) with the body's params; the core's refusals
        propagate (``endpoint`` maps them to statuses)."""
        sent_at = time.perf_counter()
        sampling = self.core.sampling(params_from(body).given(), model)
        if len(prompts) == 1:
            replies = self.core.submit_choices(
                user, engine, prompts[0], [sampling], sent_at=sent_at, turn_stops=turn_stops
            )
        else:
            replies = self.core.submit_batch(
                user, engine, prompts, sampling, sent_at=sent_at, turn_stops=turn_stops
            )
        return HeldReplies(replies)


def _encoded(engine: Engine, prompt: str, raw: bool) -> tuple[list[int], tuple[str, ...]]:
    """The prompt's ids and the stop strings of its answer: one user turn under the model's chat
    template, or (``raw``, or a base model without one) the text as the start of a document."""
    tokenizer = engine.tokenizer
    if raw or not tokenizer.chat:
        return tokenizer.encode_document(prompt), ()
    return tokenizer.prompt_ids([ChatMessage(role="user", content=prompt)]), tokenizer.turn_stops


async def _stream(held: HeldReplies) -> AsyncIterator[ServerSentEvent]:
    """A token event per piece of text, then done (or an error); leaving early (the client
    closed the stream) cancels the generation."""
    try:
        while True:
            _, event = await held.next()
            if isinstance(event, Delta):
                if event.text:
                    yield data_event(token_data(event))
                continue
            failed = failure(event)
            if failed is not None:
                yield data_event({"error": failed.message})
                return
            yield data_event(
                {
                    "done": True,
                    "total_tokens": event.completion_tokens,
                    "reason": event.reason.value,
                    "usage": usage_of(event),
                    "timing": timing_of(event),
                }
            )
            return
    finally:
        held.cancel(CancelCause.DISCONNECT)


async def _whole(held: HeldReplies, request: Request, inputs: list[Any], *, many: bool) -> Response:
    """The answers as JSON once all have ended, each with its input: a list when ``many``, else
    the one object; a failed generation fails the request."""
    results = await held.wait(request)
    answers = []
    for given, result in zip(inputs, results, strict=True):
        failed = failure(result)
        if failed is not None:
            raise failed
        answers.append(
            {
                "input": given,
                "output_ids": result.token_ids,
                "output_text": result.text,
                "reason": result.reason.value,
                "usage": usage_of(result),
                "timing": timing_of(result),
            }
        )
    return JSONResponse(answers if many else answers[0])
