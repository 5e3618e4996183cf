"""The paths one layer made, as a tree of names: what whiteouts in that same layer must spare,
and where its directories' metadata waits until the layer is done.

A path costs one node for each name it adds: a path of any depth in a layer of any size costs
memory in proportion to what it creates on disk (remembering every parent of each path as a
tuple of names would cost the square of its depth)."""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence


class _Node:
    __slots__ = ("children", "value")

    def __init__(self):
        self.children: dict[str, _Node] | None = None
        self.value = None


class PathTree:
    def __init__(self):
        self._root = _Node()

    def add(self, parts: Sequence[str], value=None) -> None:
        """Remember `parts` (and so its parents), with `value` (None forgets an earlier one)."""
        node = self._root
        for name in parts:
            if node.children is None:
                node.children = {}
            child = node.children.get(name)
            if child is None:
                child = node.children[name] = _Node()
            node = child
        node.value = value

    def _find(self, parts: Sequence[str]) -> _Node | None:
        node = self._root
        for name in parts:
            node = node.children.get(name) if node.children else None
            if node is None:
                return None
        return node

    def __contains__(self, parts: Sequence[str]) -> bool:
        return self._find(parts) is not None

    def names_under(self, parts: Sequence[str]) -> Collection[str]:
        """The names remembered directly under `parts`."""
        node = self._find(parts)
        return node.children.keys() if node is not None and node.children else ()

    def values_deepest_first(self) -> Iterator[tuple[list[str], object]]:
        """(path, value) of every path with a value, each after all those below it."""
        path: list[str] = []
        stack = [(self._root, iter(self._root.children.items() if self._root.children else ()))]
        while stack:
            node, children = stack[-1]
            for name, child in children:
                path.append(name)
                stack.append((child, iter(child.children.items() if child.children else ())))
                break
            else:
                stack.pop()
                if node.value is not None:
                    yield list(path), node.value
                if stack:
                    path.pop()
