"""The chat core: every turn of every transport starts, runs and ends here.

Transports call it with what the client asked for and map its typed errors (``NotFound``,
``Busy``, ``Draining``, ``TooManyRequests``, ``InvalidParams``, ``ModelError``, and the
engine's ``QueueFull`` and ``ContextOverflow``) to their own error frames or statuses.
Admission is the engine's: a chat turn asks it (``Engine.check``) before the user's message
is stored, so a refused turn leaves no trace, and is submitted once it is stored (the
message is stored before generation starts, as the contract says).
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from uuid import UUID

from service.config import ServerSettings
from service.core.conversation import Conversation, chat_key, replayed
from service.core.metrics import CancelCause, Metrics
from service.core.registry import Replies
from service.core.reply import Finisher, Reply
from service.engine.beam import ScorerName
from service.engine.engine import Engine, GenerationStream
from service.engine.prefix_index import common_prefix
from service.engine.tokenizer import ChatMessage
from service.engine.types import BeamResult, ChatKey, Delta, FinishReason, GenerationResult, SamplingParams
from service.errors import (
    Busy,
    Draining,
    InvalidParams,
    ModelError,
    NotFound,
    ServiceError,
    TooManyRequests,
)
from service.model_pool import ModelPool
from service.protocol import codec, frames
from service.store.records import Completion, StoredMessage, StoredReply, User, parse_id
from service.store.store import Store

log = logging.getLogger(__name__)

_STORED_STATUS = {
    FinishReason.STOP: "complete",
    FinishReason.LENGTH: "complete",
    FinishReason.CANCELLED: "cancelled",
    FinishReason.ERROR: "error",
}


def stored_status(reason: FinishReason) -> str:
    """The status a reply that ended for ``reason`` is stored with."""
    return _STORED_STATUS[reason]


def completion(result: GenerationResult, deltas: Sequence[Delta] = ()) -> Completion:
    """What the database keeps of a finished generation; with its ``deltas``, how it streamed
    (kept only when they account for its tokens and text exactly, as the engine's always do)."""
    delta_tokens = [d.tokens for d in deltas]
    delta_chars = [len(d.text) for d in deltas]
    exact = sum(delta_tokens) == result.completion_tokens and sum(delta_chars) == len(result.text)
    return Completion(
        text=result.text,
        token_ids=result.token_ids,
        status=stored_status(result.reason),
        prompt_tokens=result.prompt_tokens,
        cached_tokens=result.cached_tokens,
        completion_tokens=result.completion_tokens,
        queued_ms=result.queued_ms,
        ttft_ms=result.ttft_ms,
        total_ms=result.total_ms,
        tokens_per_s=result.tokens_per_s,
        error=result.error,
        delta_tokens=delta_tokens if exact else None,
        delta_chars=delta_chars if exact else None,
        reason=result.reason.value,
    )


def stored_deltas(stored: StoredReply) -> list[Delta]:
    """A finished reply's deltas as it streamed them (one delta covering every token and the
    whole text where the stored row does not say how it streamed)."""
    tokens, chars = stored.delta_tokens, stored.delta_chars
    if tokens is None or chars is None or len(tokens) != len(chars):
        tokens, chars = [len(stored.token_ids)], [len(stored.text)]
    deltas: list[Delta] = []
    index = offset = 0
    for covered, length in zip(tokens, chars, strict=True):
        if covered <= 0:
            continue
        deltas.append(Delta(index=index, text=stored.text[offset : offset + length], tokens=covered))
        index += covered
        offset += length
    return deltas


def _refused(message: str, prompt_tokens: int) -> Completion:
    return Completion(
        text="",
        token_ids=[],
        status="error",
        prompt_tokens=prompt_tokens,
        cached_tokens=0,
        completion_tokens=0,
        queued_ms=0.0,
        ttft_ms=None,
        total_ms=0.0,
        tokens_per_s=0.0,
        error=message,
    )


class ChatCore:
    def __init__(
        self,
        settings: ServerSettings,
        store: Store,
        models: ModelPool,
        metrics: Metrics,
        local_user: User,
        *,
        on_change: Callable[[], None] = lambda: None,
        record: Finisher | None = None,
    ) -> None:
        """``record`` stores a finished reply (default :meth:`record`); ``on_change`` is
        called whenever a reply starts (for waiters that must not poll)."""
        self.settings = settings
        self.store = store
        self.models = models
        self.metrics = metrics
        self.local_user = local_user
        self.replies = Replies(on_change)
        self.draining = False
        self._record: Finisher = record or self.record
        self._posting: set[tuple[UUID, UUID]] = set()  # (user id, chat id) while post() starts a turn

    # ---- who and how ---------------------------------------------------------------------

    async def authenticate(self, token: str | None) -> User | None:
        if self.settings.auth == "none":
            return self.local_user
        if token is None:
            return None
        return await self.store.user_for_token(token)

    def sampling(self, given: Mapping[str, Any], model_id: str | None = None) -> SamplingParams:
        """Validated sampling parameters; a field left out takes the model's default
        (``model_id``'s, from its GGUF or its family), else the server's. Raises
        ``InvalidParams``."""
        values = dict(given)
        if "stop" in values:
            values["stop"] = tuple(values["stop"])
        values.setdefault("max_tokens", self.settings.default_max_tokens)
        if model_id is not None:
            for name, value in self.models.sampling_defaults(model_id).params().items():
                values.setdefault(name, value)
        try:
            sampling = SamplingParams(**values)
        except TypeError as exc:
            raise InvalidParams(str(exc)) from None
        sampling.validate()
        if sampling.max_tokens > self.settings.max_tokens:
            raise InvalidParams(f"max_tokens must be at most {self.settings.max_tokens}")
        return sampling

    async def engine(self, model_id: str | None) -> Engine:
        """The engine of ``model_id`` (the default when ``None``); raises ``ModelError``."""
        return await self.models.engine(model_id or self.models.default_id)

    # ---- chats ---------------------------------------------------------------------------

    async def open(
        self,
        user: User,
        *,
        chat: str | None,
        model: str | None,
        title: str | None,
        system: str | None,
        params: frames.Params,
    ) -> tuple[Conversation, list[StoredMessage]]:
        """Continue a stored chat, or create one; its conversation and stored messages."""
        self.sampling(params.given())
        if chat is not None:
            chat_id = parse_id(chat)
            found = None if chat_id is None else await self.store.get_chat(user.id, chat_id)
            if found is None:
                raise NotFound("no such chat")
            model_id = model or found.model
            engine = await self.engine(model_id)
            params = params.over(codec.parse_params(found.params))
            stored = await self.store.messages(user.id, found.id) or []
        else:
            model_id = model or self.models.default_id
            engine = await self.engine(model_id)
            found, stored = await self.store.create_chat(
                user.id, model=model_id, title=title, system=system, params=params.given()
            )
        messages, token_ids = replayed(stored)
        conversation = Conversation(
            chat_id=found.id,
            user_id=user.id,
            model_id=model_id,
            engine=engine,
            params=params,
            messages=messages,
            token_ids=token_ids,
        )
        return conversation, stored

    async def send(
        self, conversation: Conversation, text: str, params: frames.Params, *, sent_at: float
    ) -> Reply:
        """Start the next turn of ``conversation``: the engine admits it, the user's message and
        the reply's place are stored, then it is submitted. The reply runs unattached: attach
        a sink."""
        conversation.fold_finished()
        if conversation.generating:
            raise Busy("this session is already generating")
        sampling = self.sampling(params.over(conversation.params).given(), conversation.model_id)
        self._admitting()
        engine = conversation.engine
        messages = [*conversation.messages, ChatMessage(role="user", content=text)]
        prompt = engine.tokenizer.next_turn_ids(conversation.token_ids, messages)
        engine.check(prompt, sampling)  # InvalidParams, ContextOverflow, QueueFull
        offset = common_prefix(conversation.token_ids, prompt)
        message_id = uuid.uuid4()
        user_message = await self.store.begin_turn(
            conversation.chat_id,
            user_text=text,
            user_token_ids=prompt[offset:],
            prompt_offset=offset,
            assistant_id=message_id,
        )
        try:
            stream = engine.submit(conversation.key, prompt, sampling, turn_stops=engine.tokenizer.turn_stops)
            reply = self._reply(
                stream, conversation.user_id, conversation.chat_id, prompt, sent_at, message_id
            )
        except ServiceError as exc:  # the queue filled up since the check: the turn ends as an error
            await self.store.finish_message(message_id, _refused(str(exc), len(prompt)))
            raise
        reply.user_message_id = user_message.id
        reply.placed.set()
        conversation.messages = messages
        conversation.token_ids = prompt
        conversation.reply = reply
        return reply

    def stop(self, conversation: Conversation) -> None:
        if conversation.reply is not None:
            conversation.reply.cancel(CancelCause.STOP)

    def resume(self, conversation: Conversation, message: str) -> Reply | None:
        """The running reply ``message`` of this conversation's chat that nobody holds, now
        the conversation's (the caller attaches a sink); ``None`` when it has finished (its
        text is stored) or never existed."""
        reply = self.replies.detached(parse_id(message), conversation.user_id, conversation.chat_id)
        if reply is not None:
            conversation.reply = reply
        return reply

    async def post(self, user: User, chat: str, text: str, params: frames.Params, *, sent_at: float) -> Reply:
        """The next turn of a stored chat for a client that holds no session (the REST chat
        API). At most one reply runs per chat (else ``Busy``) and ``max_sessions`` replies of
        chats per user, whichever client started them (else ``TooManyRequests``). Nobody holds
        the reply: it is ``independent``, runs to its end, and readers attach and detach as
        they come and go."""
        chat_id = parse_id(chat)
        if chat_id is None:
            raise NotFound("no such chat")
        claim = (user.id, chat_id)
        if claim in self._posting or self.replies.of_chat(user.id, chat_id):
            raise Busy("this chat is already generating a reply")
        running = sum(1 for r in self.replies.of_user(user.id) if r.chat_id is not None)
        running += sum(1 for owner, _ in self._posting if owner == user.id)
        if running >= self.settings.max_sessions:
            raise TooManyRequests(
                f"at most {self.settings.max_sessions} replies at once per user; {running} are running"
            )
        self._posting.add(claim)
        try:
            conversation, _ = await self.open(
                user, chat=chat, model=None, title=None, system=None, params=frames.Params()
            )
            reply = await self.send(conversation, text, params, sent_at=sent_at)
        finally:
            self._posting.discard(claim)
        reply.independent = True
        return reply

    async def find_reply(self, user: User, chat: str, message: str) -> Reply | StoredReply:
        """The reply ``message`` of the user's chat: running here (or being stored), else as
        stored (``status`` ``generating`` there: it runs on another instance, or its instance
        died and is not swept yet). Raises ``NotFound`` for anything else, another user's
        reply included."""
        chat_id, message_id = parse_id(chat), parse_id(message)
        if chat_id is None or message_id is None:
            raise NotFound("no such reply in this chat")
        reply = self.replies.find(message_id, user.id, chat_id)
        if reply is not None:
            return reply
        # Not running here: a reply leaves the registry only once it is recorded.
        stored = await self.store.reply(user.id, chat_id, message_id)
        if stored is None:
            raise NotFound("no such reply in this chat")
        return stored

    async def stop_reply(self, user: User, chat: str, message: str) -> Reply | StoredReply:
        """Cancel the running reply ``message`` and wait until it is recorded; a finished one
        is returned as it is."""
        found = await self.find_reply(user, chat, message)
        if isinstance(found, Reply):
            found.cancel(CancelCause.STOP)
            await found.done.wait()
        return found

    async def delete_chat(self, user: User, chat: str) -> None:
        """Delete the chat, stop its replies and drop its KV caches; raises ``NotFound``."""
        chat_id = parse_id(chat)
        if chat_id is None or not await self.store.delete_chat(user.id, chat_id):
            raise NotFound("no such chat")
        doomed = [r for r in self.replies.of_user(user.id) if r.chat_id == chat_id]
        await self.replies.cancel(doomed, CancelCause.CLOSE)
        for engine in self.models.loaded():
            engine.forget(chat_key(user.id, chat_id))

    # ---- stateless requests --------------------------------------------------------------

    def submit_choices(
        self,
        user: User,
        engine: Engine,
        prompt: list[int],
        params: list[SamplingParams],
        *,
        sent_at: float,
        turn_stops: tuple[str, ...] = (),
    ) -> list[Reply]:
        """Start ``len(params)`` replies to one prompt, kept in no chat (an API request), as
        one engine fork: the prompt is prefilled once and the choices decode together. Each
        gets a fresh cache key of the user's, so the engine may reuse the user's cached
        prefixes and never another user's."""
        keys = self._stateless_keys(user, len(params))
        # QueueFull, ContextOverflow, InvalidParams: all choices are queued, or none.
        streams = engine.submit_fork(keys, prompt, params, turn_stops=turn_stops)
        return self._stateless_replies(user, streams, [prompt] * len(streams), sent_at)

    def submit_batch(
        self,
        user: User,
        engine: Engine,
        prompts: list[list[int]],
        params: SamplingParams,
        *,
        sent_at: float,
        turn_stops: tuple[str, ...] = (),
    ) -> list[Reply]:
        """Start one reply per prompt, kept in no chat, queued in the engine together (all or
        none) so that they decode in the same batched steps. Each counts as one generation
        against the user's limit, as a choice does."""
        keys = self._stateless_keys(user, len(prompts))
        streams = engine.submit_batch(keys, prompts, [params] * len(prompts), turn_stops=turn_stops)
        return self._stateless_replies(user, streams, prompts, sent_at)

    def _stateless_keys(self, user: User, count: int, *, rows: int | None = None) -> list[ChatKey]:
        """Fresh cache keys of the user's for ``count`` more stateless generations taking
        ``rows`` decode rows in all (default ``count``; a beam search takes its width); raises
        ``Draining`` or ``TooManyRequests`` (past ``max_sessions`` rows running at once)."""
        self._admitting()
        running = sum(r.stream.rows for r in self.replies.of_user(user.id) if r.chat_id is None)
        if running + (count if rows is None else rows) > self.settings.max_sessions:
            raise TooManyRequests(
                f"at most {self.settings.max_sessions} generations at once per user; {running} are running"
            )
        return [chat_key(user.id, f"api-{uuid.uuid4()}") for _ in range(count)]

    def _stateless_replies(
        self, user: User, streams: list[GenerationStream], prompts: list[list[int]], sent_at: float
    ) -> list[Reply]:
        replies = [
            self._reply(stream, user.id, None, prompt, sent_at)
            for stream, prompt in zip(streams, prompts, strict=True)
        ]
        for reply in replies:
            reply.placed.set()
        return replies

    def submit_beam(
        self,
        user: User,
        engine: Engine,
        prompt: list[int],
        params: SamplingParams,
        width: int,
        *,
        scorer: ScorerName,
        sent_at: float,
        turn_stops: tuple[str, ...] = (),
    ) -> Reply:
        """Start a beam search of ``width`` beams, kept in no chat (see ``Engine.submit_beam``).
        Its beams count as ``width`` of the user's generations; its result is a ``BeamResult``."""
        (key,) = self._stateless_keys(user, 1, rows=width)
        stream = engine.submit_beam(key, prompt, params, width, scorer=scorer, turn_stops=turn_stops)
        return self._stateless_replies(user, [stream], [prompt], sent_at)[0]

    async def rerank(
        self, user: User, result: BeamResult, messages: list[ChatMessage], model_id: str
    ) -> BeamResult:
        """``result`` with its candidates re-ranked by ``model_id`` (the ``--reranker``): each
        candidate's text, tokenized by that model and following the conversation under its
        template, scores the mean log-probability of its tokens (teacher-forced, all candidates
        in one engine fork). A candidate without text is not scored and ranks last. The winner
        may change; every candidate starts with the text already streamed (see ``beam.py``,
        scorer ``reranker``), so the new tail follows it."""
        engine = await self.engine(model_id)
        prompt = engine.tokenizer.prompt_ids(messages)
        texts = [(i, engine.tokenizer.encode(c.text)) for i, c in enumerate(result.candidates)]
        texts = [(i, tokens) for i, tokens in texts if tokens]
        scores: dict[int, float] = {}
        if texts:
            keys = [chat_key(user.id, f"api-{uuid.uuid4()}") for _ in texts]
            streams = engine.submit_scoring(keys, prompt, [tokens for _, tokens in texts])
            try:
                for (index, _), stream in zip(texts, streams, strict=True):
                    scored = await stream.result()
                    if scored.reason in (FinishReason.ERROR, FinishReason.CANCELLED):
                        raise ModelError(f"the reranker failed: {scored.error or scored.reason.value}")
                    scores[index] = scored.extra["logprob"] / scored.extra["scored_tokens"]
            finally:
                for stream in streams:
                    stream.cancel()
        order = sorted(range(len(result.candidates)), key=lambda i: (i not in scores, -scores.get(i, 0.0), i))
        candidates = [dataclasses.replace(result.candidates[i], score=scores.get(i)) for i in order]
        winner = candidates[0]
        early = result.text[: len(result.text) - len(result.tail)]
        if not winner.text.startswith(early):
            raise ModelError("a reranked candidate does not start with the streamed text")
        return dataclasses.replace(
            result,
            reason=winner.reason,
            text=winner.text,
            token_ids=winner.token_ids,
            completion_tokens=len(winner.token_ids),
            tail=winner.text[len(early) :],
            candidates=candidates,
            scorer=f"reranker:{model_id}",
        )

    # ---- replies -------------------------------------------------------------------------

    def _admitting(self) -> None:
        if self.draining:
            raise Draining("the server is shutting down")

    def _reply(
        self,
        stream: GenerationStream,
        user_id: UUID,
        chat_id: UUID | None,
        prompt: list[int],
        sent_at: float,
        message_id: UUID | None = None,
    ) -> Reply:
        reply = Reply(
            message_id=message_id or uuid.uuid4(),
            chat_id=chat_id,
            user_id=user_id,
            prompt_ids=prompt,
            stream=stream,
            metrics=self.metrics,
            on_finish=self._finished,
            sent_at=sent_at,
        )
        self.replies.track(reply)
        return reply

    async def _finished(self, reply: Reply, result: GenerationResult) -> None:
        try:
            await reply.placed.wait()
            if reply.chat_id is not None and not reply.abandoned:
                await self._record(reply, result)
        finally:
            self.replies.forget(reply)

    async def record(self, reply: Reply, result: GenerationResult) -> None:
        await self.store.finish_message(reply.message_id, completion(result, reply.deltas))

    def revoke(self, user_id: UUID) -> None:
        """The user's token was revoked: cancel their replies, including those waiting for a
        reconnect that can no longer happen."""
        for reply in self.replies.of_user(user_id):
            reply.cancel(CancelCause.REVOKED)

    async def drain(self) -> None:
        """Start nothing new; give the running replies up to ``shutdown_grace_s`` to finish."""
        self.draining = True
        if self.replies.running:
            log.info(
                "letting %d generation(s) finish (at most %.0f s)",
                len(self.replies),
                self.settings.shutdown_grace_s,
            )
        await self.replies.finish(self.settings.shutdown_grace_s)

    async def shutdown(self) -> None:
        """Cancel every reply and wait until each result is recorded."""
        await self.replies.cancel(list(self.replies.running.values()), CancelCause.SHUTDOWN)

    async def ready(self) -> str | None:
        """Why the service is not ready, or ``None`` when it is."""
        if not self.models.ready:
            return "the default model is not loaded"
        try:
            await self.store.ping()
        except Exception as exc:
            return f"database unreachable: {exc}"
        return None
