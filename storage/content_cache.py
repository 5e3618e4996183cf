"""Small blob content (manifests, mostly) kept in memory by digest.

Content never changes under its digest, so an entry is never stale; whether a repository still
holds the manifest is asked of the store on every request, never answered from here."""

from __future__ import annotations

import collections

from ocispec.digest import Digest


class ContentCache:
    """Blob content by digest, least recently used first out, within a byte budget. An item
    larger than a sixteenth of the budget is not kept (one large manifest must not flush the
    many small ones)."""

    def __init__(self, budget: int):
        self.budget = budget
        self.used = 0
        self._items: collections.OrderedDict[Digest, bytes] = collections.OrderedDict()

    def get(self, digest: Digest) -> bytes | None:
        data = self._items.get(digest)
        if data is not None:
            self._items.move_to_end(digest)
        return data

    def put(self, digest: Digest, data: bytes) -> None:
        if len(data) > self.budget // 16:
            return
        self.drop(digest)
        self._items[digest] = data
        self.used += len(data)
        while self.used > self.budget:
            _, evicted = self._items.popitem(last=False)
            self.used -= len(evicted)

    def drop(self, digest: Digest) -> None:
        data = self._items.pop(digest, None)
        if data is not None:
            self.used -= len(data)
