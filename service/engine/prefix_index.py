"""Find, among one owner's resident KV caches, the one sharing the longest exact prefix with a prompt.

Keys are chained hashes of token-id blocks: block k's key hashes its ``BLOCK`` ids together
with block k-1's key, so one dict lookup answers "does a cache of this owner hold exactly
these first k blocks?". Only a cache's exact prefix (computed in prompt mode, see
``kv_cache``) is indexed. If some cache holds k blocks it holds every shorter block prefix
too, so the longest shared block prefix is a binary search: O(log blocks) lookups, after
hashing the prompt once (at submit, outside the worker's step). The winner is then checked
token by token (a hash collision costs a lookup, never exactness) and extended past its
last whole block.

Each owner has its own table: a lookup for one owner cannot see another owner's caches.

Pure bookkeeping: no onnxruntime, no threads.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import islice
from typing import TYPE_CHECKING

from service.engine.types import ChatKey

if TYPE_CHECKING:
    from service.engine.kv_cache import CacheEntry

BLOCK = 16  # tokens per indexed block
CANDIDATES = 4  # caches checked token by token per lookup, at most


def owner_of(key: ChatKey) -> str:
    """The owner of a chat key ``"<owner>/<anything>"``: the part before the first "/"."""
    return key.split("/", 1)[0]


def block_hashes(ids: Sequence[int], blocks: int, known: Sequence[int] = ()) -> list[int]:
    """Chained hashes of the first ``blocks`` whole blocks of ``ids``, continuing ``known``."""
    out = list(known[:blocks])
    h = out[-1] if out else 0
    for k in range(len(out), blocks):
        h = hash((h, *ids[k * BLOCK : (k + 1) * BLOCK]))
        out.append(h)
    return out


def prompt_hashes(prompt: Sequence[int]) -> list[int]:
    return block_hashes(prompt, len(prompt) // BLOCK)


def common_prefix(a: Sequence[int], b: Sequence[int], limit: int | None = None) -> int:
    """Length of the common prefix of ``a`` and ``b`` (at most ``limit``), by slice comparisons
    (C loops) rather than a Python loop per token."""
    limit = min(len(a), len(b)) if limit is None else min(limit, len(a), len(b))
    if a[:limit] == b[:limit]:
        return limit
    lo, hi = 0, limit  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


class PrefixIndex:
    def __init__(self) -> None:
        self._owners: dict[str, dict[int, dict[CacheEntry, None]]] = {}
        self._chains: dict[CacheEntry, list[int]] = {}

    def __len__(self) -> int:
        return len(self._chains)

    def sync(self, entry: CacheEntry) -> None:
        """Index ``entry``'s exact whole blocks. Call after every change of its exact prefix; a
        shrink must be synced before the prefix grows again, so kept hashes describe its ids."""
        old = self._chains.get(entry, [])
        blocks = entry.exact // BLOCK
        if blocks == len(old):
            return
        table = self._owners.setdefault(entry.owner, {})
        if blocks < len(old):
            for h in old[blocks:]:
                self._unlink(table, h, entry)
            chain = old[:blocks]
        else:
            chain = block_hashes(entry.ids, blocks, old)
            for h in chain[len(old) :]:
                table.setdefault(h, {})[entry] = None
        if chain:
            self._chains[entry] = chain
        else:
            self._chains.pop(entry, None)
            if not table:
                del self._owners[entry.owner]

    def remove(self, entry: CacheEntry) -> None:
        chain = self._chains.pop(entry, None)
        if chain is None:
            return
        table = self._owners[entry.owner]
        for h in chain:
            self._unlink(table, h, entry)
        if not table:
            del self._owners[entry.owner]

    @staticmethod
    def _unlink(table: dict[int, dict[CacheEntry, None]], h: int, entry: CacheEntry) -> None:
        holders = table.get(h)
        if holders is not None:
            holders.pop(entry, None)
            if not holders:
                del table[h]

    def longest(
        self, owner: str, prompt: Sequence[int], hashes: Sequence[int], exclude: CacheEntry | None = None
    ) -> tuple[CacheEntry | None, int]:
        """The cache of ``owner`` (other than ``exclude``) whose exact prefix shares the most
        leading tokens with ``prompt``, and how many; ``hashes`` is ``prompt_hashes(prompt)``."""
        table = self._owners.get(owner)
        if not table:
            return None, 0
        lo, hi = 0, len(hashes)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if hashes[mid - 1] in table:
                lo = mid
            else:
                hi = mid - 1
        checked = 0
        for k in range(lo, 0, -1):  # usually one round; more only past ``exclude`` or a collision
            best: CacheEntry | None = None
            best_n = 0
            for entry in islice(reversed(table.get(hashes[k - 1], {})), CANDIDATES):
                if entry is exclude:
                    continue
                checked += 1
                n = common_prefix(entry.ids, prompt, entry.exact)
                if n >= k * BLOCK and n > best_n:
                    best, best_n = entry, n
            if best is not None or checked >= CANDIDATES:
                return best, best_n
        return None, 0
