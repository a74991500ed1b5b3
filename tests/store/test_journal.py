"""The write-behind journal on its own: order, retries, bounds and shutdown, with fake writes."""

from __future__ import annotations

import asyncio
import logging

import pytest

from service.errors import StoreError, StoreUnavailable, WriteBacklogFull
from service.store.journal import Write, WriteJournal
from tests.service.client import TIMEOUT_S


class FakeDatabase:
    """Records the writes that went through; refuses them all while ``up`` is False."""

    def __init__(self) -> None:
        self.up = True
        self.stored: list[str] = []
        self.attempts: list[str] = []

    def write(self, name: str, *, refuse: bool = False) -> Write:
        async def attempt() -> None:
            self.attempts.append(name)
            if not self.up:
                raise StoreUnavailable("connection refused")
            if refuse:
                raise StoreError(f"{name} violates a constraint")
            self.stored.append(name)

        return attempt


@pytest.fixture
def db() -> FakeDatabase:
    return FakeDatabase()


@pytest.fixture
def journal() -> WriteJournal:
    return WriteJournal(backoff_initial_s=0.001, backoff_max_s=0.01, attempt_timeout_s=TIMEOUT_S)


async def drained(journal: WriteJournal) -> None:
    await asyncio.wait_for(journal.drained(), TIMEOUT_S)


async def test_a_write_with_the_database_up_is_stored_before_it_returns(
    journal: WriteJournal, db: FakeDatabase
) -> None:
    """With nothing pending, a write runs at once and ``True`` means it is stored."""
    assert await journal.write("a", db.write("a"), new_work=True) is True
    assert db.stored == ["a"]
    assert journal.pending == 0


async def test_writes_wait_while_the_database_is_down_and_land_in_order(
    journal: WriteJournal, db: FakeDatabase
) -> None:
    """A refused write is queued and retried; later writes queue behind it untried; all land in order."""
    db.up = False
    for name in ("begin", "finish", "begin2"):
        assert await journal.write(name, db.write(name), new_work=name != "finish") is False
    assert journal.pending == 3
    assert db.attempts[0] == "begin"
    assert set(db.attempts) == {"begin"}  # only the oldest is retried; the rest never overtake it
    db.up = True
    await drained(journal)
    assert db.stored == ["begin", "finish", "begin2"]
    assert journal.pending == 0
    assert journal.last_error is None


async def test_a_write_arriving_while_others_are_pending_never_runs_first(
    journal: WriteJournal, db: FakeDatabase
) -> None:
    """Even once the database is back, a new write queues behind the pending ones."""
    db.up = False
    await journal.write("first", db.write("first"), new_work=True)
    db.up = True
    assert await journal.write("second", db.write("second"), new_work=False) is False
    await drained(journal)
    assert db.stored == ["first", "second"]


async def test_a_refused_write_on_the_direct_path_reaches_the_caller(
    journal: WriteJournal, db: FakeDatabase
) -> None:
    """A write the database refuses for what it is raises to the caller and is not queued."""
    with pytest.raises(StoreError) as raised:
        await journal.write("bad", db.write("bad", refuse=True), new_work=True)
    assert not isinstance(raised.value, StoreUnavailable)
    assert journal.pending == 0


async def test_a_write_refused_on_replay_is_dropped_loudly_and_the_rest_go_on(
    journal: WriteJournal, db: FakeDatabase, caplog: pytest.LogCaptureFixture
) -> None:
    """In the background a refused write cannot reach anyone: it is logged and dropped, not retried."""
    db.up = False
    await journal.write("bad", db.write("bad", refuse=True), new_work=True)
    await journal.write("good", db.write("good"), new_work=True)
    db.up = True
    with caplog.at_level(logging.ERROR, logger="service.store.journal"):
        await drained(journal)
    assert db.stored == ["good"]
    assert journal.dropped == 1
    assert "dropping" in caplog.text
    assert "bad" in caplog.text


async def test_an_attempt_past_its_timeout_counts_as_unavailable(db: FakeDatabase) -> None:
    """A write that hangs (a database that no longer answers) is cut off and queued, not awaited forever."""
    journal = WriteJournal(backoff_initial_s=0.001, backoff_max_s=0.01, attempt_timeout_s=0.05)
    hang = asyncio.Event()
    calls = 0

    async def hanging() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            await hang.wait()
        db.stored.append("slow")

    assert await journal.write("slow", hanging, new_work=True) is False
    await drained(journal)
    assert db.stored == ["slow"]


async def test_new_work_past_the_bound_is_refused_but_finishing_work_is_not(db: FakeDatabase) -> None:
    """Past ``max_pending``, new chats and turns get WriteBacklogFull; a reply's end is still kept."""
    journal = WriteJournal(max_pending=2, backoff_initial_s=0.001, backoff_max_s=0.01)
    db.up = False
    await journal.write("begin1", db.write("begin1"), new_work=True)
    await journal.write("begin2", db.write("begin2"), new_work=True)
    with pytest.raises(WriteBacklogFull):
        await journal.write("begin3", db.write("begin3"), new_work=True)
    assert await journal.write("finish1", db.write("finish1"), new_work=False) is False
    assert journal.pending == 3
    db.up = True
    await drained(journal)
    assert db.stored == ["begin1", "begin2", "finish1"]


async def test_a_kick_retries_at_once_instead_of_waiting_out_the_backoff(db: FakeDatabase) -> None:
    """``kick`` (a reader or /readyz asking) cuts a long backoff short once the database is back."""
    journal = WriteJournal(backoff_initial_s=3600.0, backoff_max_s=3600.0)
    db.up = False
    await journal.write("w", db.write("w"), new_work=True)  # refused; the next try is an hour away
    db.up = True
    journal.kick()
    await drained(journal)
    assert db.stored == ["w"]


async def test_close_flushes_what_it_can_then_logs_every_lost_write(
    journal: WriteJournal, db: FakeDatabase, caplog: pytest.LogCaptureFixture
) -> None:
    """``close`` tries for a bounded time, returns and logs each write it could not store, and
    refuses writes from then on."""
    db.up = False
    await journal.write("reply 1", db.write("reply 1"), new_work=False)
    await journal.write("reply 2", db.write("reply 2"), new_work=False)
    with caplog.at_level(logging.ERROR, logger="service.store.journal"):
        lost = await journal.close(flush_timeout_s=0.05)
    assert lost == ["reply 1", "reply 2"]
    assert "LOST: reply 1" in caplog.text
    assert "LOST: reply 2" in caplog.text
    assert journal.pending == 0
    with pytest.raises(StoreError):
        await journal.write("late", db.write("late"), new_work=False)


async def test_close_stores_the_pending_writes_when_the_database_answers(
    journal: WriteJournal, db: FakeDatabase
) -> None:
    """A database back by shutdown gets every pending write before ``close`` returns."""
    db.up = False
    await journal.write("reply", db.write("reply"), new_work=False)
    db.up = True
    assert await journal.close(flush_timeout_s=TIMEOUT_S) == []
    assert db.stored == ["reply"]
