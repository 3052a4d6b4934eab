"""The keys and values of recent sequences, kept so that a follow-up turn of a conversation (whose
prompt starts with the previous prompt and reply) prefills only its new tokens.

Bounded by bytes, least recently used first out; a sequence larger than the bound is not kept. A
taken entry leaves the store (generation extends it in place) and is put back, longer, when its
generation ends. Knows nothing of HTTP or tokens' meaning: ids in, caches out.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from .state import KVCache


@dataclass
class Conversation:
    ids: tuple[int, ...]  # the tokens whose keys and values `cache` holds, in order
    cache: KVCache

    @property
    def nbytes(self) -> int:
        return self.cache.nbytes


def common_prefix(a: tuple[int, ...], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class ConversationCache:
    def __init__(self, limit_bytes: int):
        self.limit_bytes = limit_bytes
        self._entries: OrderedDict[int, Conversation] = OrderedDict()
        self._next = 0
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(c.nbytes for c in self._entries.values())

    def take(self, prompt_ids: list[int]) -> KVCache | None:
        """The cache of the kept sequence sharing the longest prefix with `prompt_ids`, cut to that
        prefix (at most all but the prompt's last token, which must be run to sample from), or None.
        A cache with fixed-size state (a hybrid model's) cannot be cut: it serves only a prompt
        that extends its whole sequence."""
        with self._lock:
            best, best_len = None, 0
            for key, conversation in self._entries.items():
                cache = conversation.cache
                shared = min(common_prefix(conversation.ids, prompt_ids), len(prompt_ids) - 1, cache.length)
                if shared < cache.length and not cache.rewindable:
                    continue
                if shared > best_len:
                    best, best_len = key, shared
            if best is None:
                return None
            conversation = self._entries.pop(best)
        return conversation.cache.prefix(best_len)

    def put(self, ids: list[int], cache: KVCache) -> None:
        """Keep a finished sequence: `ids` the tokens the cache holds (prompt, then the reply's tokens
        that were run)."""
        conversation = Conversation(tuple(ids[: cache.length]), cache)
        if cache.length == 0 or conversation.nbytes > self.limit_bytes:
            return
        with self._lock:
            self._entries[self._next] = conversation
            self._next += 1
            total = sum(c.nbytes for c in self._entries.values())
            while total > self.limit_bytes:
                _, oldest = self._entries.popitem(last=False)
                total -= oldest.nbytes
