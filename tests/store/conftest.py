"""Store fixtures: a migrated store on a fresh database, and ways to reach past it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from service.store import Store, User


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[Store]:
    """A store opened (and so migrated) on this test's fresh database."""
    opened = await Store.open(database_url, max_size=2)
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture
async def user(store: Store) -> User:
    """The local user."""
    return await store.local_user()
