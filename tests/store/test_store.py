"""The history store against a real PostgreSQL: turns, paging, isolation."""

from __future__ import annotations

import asyncio
import uuid
from uuid import UUID

import asyncpg
import pytest

from service.store import Store, User, parse_id
from service.store.records import token_hash
from tests.completions import completion

MODEL = "tiny"


async def _chat(store: Store, user: User, **fields: object) -> UUID:
    chat, _ = await store.create_chat(
        user.id,
        model=MODEL,
        title=fields.get("title"),  # type: ignore[arg-type]
        system=fields.get("system"),  # type: ignore[arg-type]
        params={},
    )
    return chat.id


async def _turn(store: Store, chat_id: UUID, text: str, reply: str | None = "ok") -> UUID:
    """A user message and its assistant reply (left generating when ``reply`` is None)."""
    assistant_id = uuid.uuid4()
    await store.begin_turn(chat_id, user_text=text, user_token_ids=[7], assistant_id=assistant_id)
    if reply is not None:
        await store.finish_message(assistant_id, completion(reply))
    return assistant_id


async def test_local_user_is_created_once(store: Store) -> None:
    """local_user returns the same user every time, even when called concurrently."""
    racing = await asyncio.gather(*(store.local_user() for _ in range(4)))
    again = await store.local_user()
    assert set(racing) == {again}
    assert again.name == "local"


async def test_create_chat_stores_system_prompt_first(store: Store, user: User) -> None:
    """A system prompt becomes the first message, complete, with no token ids."""
    chat, messages = await store.create_chat(
        user.id, model=MODEL, title=None, system="Be brief.", params={"temperature": 0.5, "stop": ["\n"]}
    )
    assert (chat.user_id, chat.model, chat.title) == (user.id, MODEL, None)
    assert chat.params == {"temperature": 0.5, "stop": ["\n"]}
    assert [(m.role, m.text, m.status, m.token_ids) for m in messages] == [
        ("system", "Be brief.", "complete", [])
    ]
    assert await store.get_chat(user.id, chat.id) == chat
    assert await store.messages(user.id, chat.id) == messages


async def test_create_chat_without_system_prompt_has_no_messages(store: Store, user: User) -> None:
    """No system prompt: the chat starts empty."""
    chat, messages = await store.create_chat(user.id, model=MODEL, title="Plans", system=None, params={})
    assert messages == []
    assert chat.title == "Plans"
    assert await store.messages(user.id, chat.id) == []


async def test_begin_turn_stores_user_message_and_hides_the_generating_reply(
    store: Store, user: User
) -> None:
    """The user's message is stored at once; the assistant row is invisible while generating."""
    chat_id = await _chat(store, user, system="sys")
    assistant_id = uuid.uuid4()
    stored = await store.begin_turn(
        chat_id, user_text="Hello?", user_token_ids=[5, 6], assistant_id=assistant_id
    )
    assert (stored.role, stored.text, stored.status, stored.token_ids) == (
        "user",
        "Hello?",
        "complete",
        [5, 6],
    )
    history = await store.messages(user.id, chat_id)
    assert history is not None
    assert [m.role for m in history] == ["system", "user"]
    assert history[-1] == stored
    [summary] = await store.list_chats(user.id, limit=10)
    assert summary.messages == 2


async def test_begin_turn_keeps_the_prompt_offset_of_the_user_message(store: Store, user: User) -> None:
    """prompt_offset reads back on the user message; other messages have 0."""
    chat_id = await _chat(store, user, system="s")
    await store.begin_turn(
        chat_id, user_text="again", user_token_ids=[9, 9], assistant_id=uuid.uuid4(), prompt_offset=17
    )
    history = await store.messages(user.id, chat_id)
    assert history is not None
    assert [(m.role, m.prompt_offset) for m in history] == [("system", 0), ("user", 17)]


async def test_user_for_token_finds_only_live_tokens(store: Store, db: asyncpg.Connection) -> None:
    """A token matches its user by SHA-256; unknown and revoked tokens match nobody."""
    alice = await store.ensure_user("alice")
    bob = await store.ensure_user("bob")
    await db.execute("UPDATE users SET token_hash = $2 WHERE id = $1", alice.id, token_hash("alice-token"))
    await db.execute(
        "UPDATE users SET token_hash = $2, revoked_at = now() WHERE id = $1", bob.id, token_hash("bob-token")
    )
    assert await store.user_for_token("alice-token") == alice
    assert await store.user_for_token("bob-token") is None
    assert await store.user_for_token("guess") is None


async def test_finish_message_round_trips_text_tokens_status_and_usage(
    store: Store, user: User, db: asyncpg.Connection
) -> None:
    """Everything finish_message writes reads back exactly, token ids up to int32's maximum included."""
    chat_id = await _chat(store, user)
    assistant_id = await _turn(store, chat_id, "Count", reply=None)
    token_ids = [0, 1, 151_935, 262_143, 2**31 - 1]
    record = completion("héllo ✓ 🙂", status="cancelled", token_ids=token_ids, ttft_ms=None, error=None)
    await store.finish_message(assistant_id, record)
    await store.finish_message(assistant_id, record)  # idempotent
    history = await store.messages(user.id, chat_id)
    assert history is not None
    reply = history[-1]
    assert (reply.id, reply.role, reply.text, reply.status, reply.token_ids) == (
        assistant_id,
        "assistant",
        "héllo ✓ 🙂",
        "cancelled",
        token_ids,
    )
    row = await db.fetchrow("SELECT * FROM messages WHERE id = $1", assistant_id)
    assert row is not None
    assert (row["prompt_tokens"], row["cached_tokens"], row["completion_tokens"]) == (12, 4, 3)
    assert (row["queued_ms"], row["ttft_ms"], row["total_ms"], row["tokens_per_s"]) == (0.5, None, 40.0, 75.5)
    assert row["error"] is None
    assert row["finished_at"] is not None


async def test_finish_message_stores_the_error(store: Store, user: User, db: asyncpg.Connection) -> None:
    """An errored generation keeps its partial text and its error message."""
    chat_id = await _chat(store, user)
    assistant_id = await _turn(store, chat_id, "Hi", reply=None)
    await store.finish_message(assistant_id, completion("par", status="error", error="decoder failed"))
    assert await db.fetchval("SELECT error FROM messages WHERE id = $1", assistant_id) == "decoder failed"


async def test_finish_message_refuses_a_status_a_generation_cannot_end_with(store: Store) -> None:
    """Only complete, cancelled and error end a generation."""
    with pytest.raises(ValueError, match="interrupted"):
        await store.finish_message(uuid.uuid4(), completion(status="interrupted"))


async def test_finish_message_bumps_the_chat_to_the_top(store: Store, user: User) -> None:
    """A finished reply makes its chat the most recently updated one."""
    older = await _chat(store, user)
    assistant_id = await _turn(store, older, "first", reply=None)
    newer = await _chat(store, user)
    assert [c.id for c in await store.list_chats(user.id, limit=10)] == [newer, older]
    await store.finish_message(assistant_id, completion())
    assert [c.id for c in await store.list_chats(user.id, limit=10)] == [older, newer]


async def test_text_with_nul_characters_is_stored_with_replacement_characters(
    store: Store, user: User
) -> None:
    """PostgreSQL text cannot hold U+0000: it is stored as U+FFFD instead of failing the turn."""
    chat_id = await _chat(store, user)
    stored = await store.begin_turn(chat_id, user_text="a\x00b", user_token_ids=[], assistant_id=uuid.uuid4())
    assert stored.text == "a\ufffdb"


async def test_title_comes_from_the_first_user_message(store: Store, user: User) -> None:
    """An untitled chat takes the first non-blank line of its first message, cut to 80 characters."""
    chat_id = await _chat(store, user)
    await _turn(store, chat_id, "\n  " + "x" * 100 + "  \nsecond line")
    await _turn(store, chat_id, "later message")
    chat = await store.get_chat(user.id, chat_id)
    assert chat is not None
    assert chat.title == "x" * 80


async def test_a_given_title_is_kept(store: Store, user: User) -> None:
    """A chat opened with a title keeps it after its first turn."""
    chat_id = await _chat(store, user, title="Mine")
    await _turn(store, chat_id, "Hello")
    chat = await store.get_chat(user.id, chat_id)
    assert chat is not None
    assert chat.title == "Mine"


async def test_another_users_chat_is_indistinguishable_from_a_missing_one(store: Store, user: User) -> None:
    """get_chat, messages, delete_chat and list_chats never reveal someone else's chat."""
    other = await store.ensure_user("mallory")
    assert other.id != user.id
    theirs = await _chat(store, other, system="secret")
    await _turn(store, theirs, "private")
    mine = await _chat(store, user)
    assert await store.get_chat(user.id, theirs) is None
    assert await store.messages(user.id, theirs) is None
    assert await store.delete_chat(user.id, theirs) is False
    assert [c.id for c in await store.list_chats(user.id, limit=10)] == [mine]
    assert await store.list_chats(user.id, limit=10, before=theirs) == []
    assert await store.get_chat(other.id, theirs) is not None  # still there for its owner
    missing = uuid.uuid4()
    assert await store.get_chat(user.id, missing) is None
    assert await store.messages(user.id, missing) is None
    assert await store.delete_chat(user.id, missing) is False


async def test_list_chats_pages_newest_first_with_a_cursor(store: Store, user: User) -> None:
    """Pages of `limit` chats, each continuing after the previous page's last chat."""
    created = [await _chat(store, user) for _ in range(5)]
    newest_first = created[::-1]
    listed = await store.list_chats(user.id, limit=10)
    assert [c.id for c in listed] == newest_first
    pages: list[list[UUID]] = []
    before: UUID | None = None
    while page := await store.list_chats(user.id, limit=2, before=before):
        pages.append([c.id for c in page])
        before = page[-1].id
    assert pages == [newest_first[0:2], newest_first[2:4], newest_first[4:5]]
    assert await store.list_chats(user.id, limit=0) == []


async def test_list_chats_breaks_timestamp_ties_by_id(
    store: Store, user: User, db: asyncpg.Connection
) -> None:
    """Chats updated at the same instant still page without loss or repetition."""
    created = [await _chat(store, user) for _ in range(4)]
    await db.execute("UPDATE chats SET updated_at = '2024-01-01T00:00:00Z'")
    expected = sorted(created, reverse=True)
    first = await store.list_chats(user.id, limit=2)
    second = await store.list_chats(user.id, limit=2, before=first[-1].id)
    assert [c.id for c in first + second] == expected


async def test_messages_pages_backwards_from_a_cursor(store: Store, user: User) -> None:
    """With limit, the newest messages come back oldest first; before pages further back."""
    chat_id = await _chat(store, user, system="s")
    for i in range(3):
        await _turn(store, chat_id, f"q{i}", reply=f"a{i}")
    everything = await store.messages(user.id, chat_id)
    assert everything is not None
    assert [m.text for m in everything] == ["s", "q0", "a0", "q1", "a1", "q2", "a2"]
    last_three = await store.messages(user.id, chat_id, limit=3)
    assert last_three == everything[-3:]
    earlier = await store.messages(user.id, chat_id, limit=3, before=last_three[0].id)
    assert earlier == everything[1:4]
    rest = await store.messages(user.id, chat_id, limit=3, before=earlier[0].id)
    assert rest == everything[:1]
    assert await store.messages(user.id, chat_id, before=everything[2].id) == everything[:2]
    assert await store.messages(user.id, chat_id, limit=3, before=uuid.uuid4()) == []


async def test_delete_chat_removes_its_messages(store: Store, user: User, db: asyncpg.Connection) -> None:
    """Deleting a chat deletes its messages; a reply finishing afterwards is a no-op."""
    chat_id = await _chat(store, user, system="s")
    await _turn(store, chat_id, "q")
    in_flight = await _turn(store, chat_id, "q2", reply=None)
    assert await store.delete_chat(user.id, chat_id) is True
    assert await store.get_chat(user.id, chat_id) is None
    assert await db.fetchval("SELECT count(*) FROM messages WHERE chat_id = $1", chat_id) == 0
    assert await store.delete_chat(user.id, chat_id) is False
    await store.finish_message(in_flight, completion())


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not-a-uuid",
        "12345678-1234-1234-1234-12345678901",  # one digit short
        "12345678-1234-1234-1234-1234567890123",
        "1234567g-1234-1234-1234-123456789012",
        "{12345678-1234-1234-1234-123456789012}",
        "urn:uuid:12345678-1234-1234-1234-123456789012",
        "12345678123412341234123456789012",
        "12345678-1234-1234-1234-123456789012\n",
    ],
)
def test_parse_id_rejects_malformed_ids(text: str) -> None:
    """Anything but a canonical 8-4-4-4-12 UUID parses to None."""
    assert parse_id(text) is None


def test_parse_id_accepts_canonical_uuids_in_either_case() -> None:
    """The canonical form parses, upper or lower case."""
    value = uuid.uuid4()
    assert parse_id(str(value)) == value
    assert parse_id(str(value).upper()) == value
