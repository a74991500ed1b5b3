"""The API's endpoints: ``GET /v1/models``, ``POST /v1/chat/completions`` and
``POST /v1/completions``, streaming (server-sent events) or not.

A client that goes away, mid-stream or while waiting for a whole answer, cancels its
generations: the same cancellation ``stop`` uses, so the engine runs at most one more step
for them.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from service.config import ServerSettings
from service.core.chats import ChatCore
from service.core.metrics import CancelCause
from service.engine.engine import Engine
from service.engine.types import Delta, FinishReason, GenerationResult
from service.errors import ModelError, ServiceError, StoreUnavailable
from service.store.records import User
from service.transports.http.held import HeldReplies
from service.transports.http.pages import ANY_METHOD
from service.transports.http.plain import event_stream
from service.transports.openai.errors import (
    ApiError,
    bad_request,
    from_service,
    model_not_found,
    unauthorized,
)
from service.transports.openai.requests import (
    ChatRequest,
    CompletionRequest,
    chat_request,
    completion_request,
)

_FINISH = {FinishReason.STOP: "stop", FinishReason.LENGTH: "length"}


@dataclass(frozen=True, slots=True)
class _Job:
    """One accepted request: what to answer with and the running choices."""

    chat: bool  # chat.completion(.chunk) or text_completion
    id: str
    model: str
    created: int
    prompt_tokens: int
    held: HeldReplies
    include_usage: bool

    def chunk_frame(self) -> tuple[bytes, bytes]:
        """The bytes around the choices of every streamed chunk, ``data: {…"choices":[`` and
        ``]…}\\n\\n``, encoded once per request: a token's event then costs one small
        ``orjson.dumps`` of its choice."""
        usage_field = {"usage": None} if self.include_usage else {}
        whole = orjson.dumps(self.envelope([], chunk=True, **usage_field))
        head, _, tail = whole.partition(b'"choices":[]')
        return b"data: " + head + b'"choices":[', b"]" + tail + b"\n\n"

    def envelope(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        kind = ("chat.completion.chunk" if self.chat else "text_completion") if extra.pop("chunk") else None
        return {
            "id": self.id,
            "object": kind or ("chat.completion" if self.chat else "text_completion"),
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": choices,
            **extra,
        }

    def usage(self, results: list[GenerationResult]) -> dict[str, Any]:
        completion = sum(r.completion_tokens for r in results)
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
            # The choices share one prompt: what the first found cached is what was reused.
            "prompt_tokens_details": {"cached_tokens": results[0].cached_tokens if results else 0},
        }


def _failure(result: GenerationResult) -> ApiError | None:
    if result.reason is FinishReason.ERROR:
        return ApiError(500, result.error or "generation failed", kind="server_error")
    if result.reason is FinishReason.CANCELLED:
        return ApiError(
            503, "the generation was cancelled by the server", kind="server_error", code="cancelled"
        )
    return None


class OpenAIApi:
    def __init__(self, core: ChatCore, settings: ServerSettings) -> None:
        self.core = core
        self.settings = settings
        self.created = int(time.time())

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/models", self._errors(self.models), methods=["GET"]),
            Route("/models/{model:path}", self._errors(self.model), methods=["GET"]),
            Route("/chat/completions", self._errors(self.chat_completions), methods=["POST"]),
            Route("/completions", self._errors(self.completions), methods=["POST"]),
            Route("/{path:path}", self._errors(self.unknown), methods=ANY_METHOD),
        ]

    def _errors(self, handler: Any) -> Any:
        async def endpoint(request: Request) -> Response:
            try:
                response: Response = await handler(request)
            except ApiError as exc:
                return exc.response()
            return response

        return endpoint

    # ---- endpoints -----------------------------------------------------------------------

    async def unknown(self, request: Request) -> Response:
        raise ApiError(404, f"no endpoint {request.method} {request.url.path}", kind="invalid_request_error")

    async def models(self, request: Request) -> Response:
        await self._user(request)
        return JSONResponse(
            {"object": "list", "data": [self._model(m["id"]) for m in self.core.models.describe()]}
        )

    async def model(self, request: Request) -> Response:
        await self._user(request)
        name = request.path_params["model"]
        if name not in self.core.models:
            raise model_not_found(name)
        return JSONResponse(self._model(name))

    async def chat_completions(self, request: Request) -> Response:
        user = await self._user(request)
        req = chat_request(await self._body(request), self.settings.max_sessions)
        model, engine = await self._engine(req.model)
        prompt = engine.tokenizer.prompt_ids(req.messages)
        return await self._run(request, user, engine, model, prompt, req, chat=True, prompt_param="messages")

    async def completions(self, request: Request) -> Response:
        user = await self._user(request)
        req = completion_request(await self._body(request), self.settings.max_sessions)
        model, engine = await self._engine(req.model)
        if isinstance(req.prompt, str):
            prompt = engine.tokenizer.encode_document(req.prompt)
        else:
            if max(req.prompt) >= engine.tokenizer.vocab_size:
                raise bad_request(f"token ids must be below {engine.tokenizer.vocab_size}", "prompt")
            prompt = req.prompt
        return await self._run(request, user, engine, model, prompt, req, chat=False, prompt_param="prompt")

    # ---- the parts -----------------------------------------------------------------------

    def _model(self, name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": self.created, "owned_by": "localchat"}

    async def _user(self, request: Request) -> User:
        if self.settings.auth == "none":
            return self.core.local_user
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise unauthorized()
        try:
            user = await self.core.authenticate(token.strip())
        except StoreUnavailable as exc:
            raise from_service(exc, "") from None
        if user is None:
            raise unauthorized()
        return user

    async def _body(self, request: Request) -> object:
        limit = self.settings.max_body_bytes
        too_large = ApiError(
            413,
            f"the request body is larger than {limit} bytes",
            kind="invalid_request_error",
            code="body_too_large",
        )
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise too_large
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise too_large
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise bad_request(f"the body is not valid JSON: {exc}", None, "invalid_json") from None

    async def _engine(self, model: str | None) -> tuple[str, Engine]:
        name = model or self.core.models.default_id
        if name not in self.core.models:
            raise model_not_found(name)
        try:
            return name, await self.core.engine(name)
        except ModelError as exc:
            raise from_service(exc, "model") from None

    async def _run(
        self,
        request: Request,
        user: User,
        engine: Engine,
        model: str,
        prompt: list[int],
        req: ChatRequest | CompletionRequest,
        *,
        chat: bool,
        prompt_param: str,
    ) -> Response:
        sent_at = time.perf_counter()
        try:
            sampling = self.core.sampling(req.sampling, model)
            seed = sampling.seed
            params = [
                sampling if seed is None or i == 0 else dataclasses.replace(sampling, seed=(seed + i) % 2**63)
                for i in range(req.n)
            ]
            # A chat on a base model is a plain transcript: its replies end where the next turn would.
            stops = engine.tokenizer.turn_stops if chat else ()
            replies = self.core.submit_choices(
                user, engine, prompt, params, sent_at=sent_at, turn_stops=stops
            )
        except ServiceError as exc:
            raise from_service(exc, prompt_param) from None
        job = _Job(
            chat=chat,
            id=f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            model=model,
            created=int(time.time()),
            prompt_tokens=len(prompt),
            held=HeldReplies(replies),
            include_usage=req.include_usage,
        )
        if req.stream:
            return event_stream(_events(job), self.settings.sse_keepalive_s)
        return await _whole(job, request)


def _data(payload: dict[str, Any] | str) -> bytes:
    """One ``data:`` event, encoded (sse-starlette passes bytes through as they are)."""
    body = payload.encode() if isinstance(payload, str) else orjson.dumps(payload)
    return b"data: " + body + b"\n\n"


async def _events(job: _Job) -> AsyncIterator[bytes]:
    """The stream: a role chunk per choice (chat), a chunk per delta, a finish chunk per
    choice, the usage chunk when asked for, then ``[DONE]``. Leaving early (the client
    closed the stream) cancels the choices still running."""
    head, tail = job.chunk_frame()
    results: list[GenerationResult | None] = [None] * len(job.held.replies)
    try:
        if job.chat:
            for index in range(len(job.held.replies)):
                delta = {"role": "assistant", "content": ""}
                choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": None}
                yield head + orjson.dumps(choice) + tail
        while any(r is None for r in results):
            index, event = await job.held.next()
            if isinstance(event, Delta):
                if event.text:
                    yield head + orjson.dumps(_piece(job, index, event.text, None)) + tail
                continue
            results[index] = event
            failure = _failure(event)
            if failure is not None:
                job.held.cancel(CancelCause.CLOSE)
                yield _data(orjson.loads(failure.response().body))
                return
            yield head + orjson.dumps(_piece(job, index, None, _FINISH[event.reason])) + tail
        if job.include_usage:
            finished = [r for r in results if r is not None]
            yield _data(job.envelope([], chunk=True, usage=job.usage(finished)))
        yield _data("[DONE]")
    finally:
        job.held.cancel(CancelCause.DISCONNECT)


def _piece(job: _Job, index: int, text: str | None, finish: str | None) -> dict[str, Any]:
    if job.chat:
        delta = {} if text is None else {"content": text}
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
    return {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}


async def _whole(job: _Job, request: Request) -> Response:
    """Wait for every choice; a client that leaves meanwhile cancels them."""
    results = await job.held.wait(request)
    for result in results:
        failure = _failure(result)
        if failure is not None:
            return failure.response()
    choices = []
    for index, result in enumerate(results):
        finish = _FINISH[result.reason]
        if job.chat:
            message = {"role": "assistant", "content": result.text, "refusal": None}
            choices.append({"index": index, "message": message, "logprobs": None, "finish_reason": finish})
        else:
            choices.append({"index": index, "text": result.text, "logprobs": None, "finish_reason": finish})
    return JSONResponse(job.envelope(choices, chunk=False, usage=job.usage(results)))


def openai_routes(core: ChatCore, settings: ServerSettings) -> list[BaseRoute]:
    return OpenAIApi(core, settings).routes()
