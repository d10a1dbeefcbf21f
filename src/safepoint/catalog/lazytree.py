"""A state tree whose tensors are read when first accessed (object-store lazy loads).

``safepoint.load(url, mmap=True)`` on an object store returns this instead of nested
dicts: each dict of the saved state is a read-only :class:`LazyDict` (a
``collections.abc.Mapping``) that decodes an entry only when it is looked up, so
``state["model"]["embed.weight"]`` fetches that one tensor's bytes and nothing else.
Lists, tuples and the other encoded nodes are decoded whole when their entry is
accessed. Values are decoded once and kept.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from safepoint.state.tree import unflatten


def lazy_unflatten(tree: Any, tensor: Callable[[str], Any]) -> Any:
    """:func:`safepoint.state.tree.unflatten`, except that plain dicts decode lazily."""
    if _plain(tree):
        return LazyDict(tree, tensor)
    return unflatten(tree, tensor)


def _plain(node: Any) -> bool:
    return isinstance(node, dict) and bool(node) and not any(k.startswith("$") for k in node)


class LazyDict(Mapping[str, Any]):
    """One dict of a saved state; an entry's tensors are read when it is looked up."""

    def __init__(self, node: dict[str, Any], tensor: Callable[[str], Any]) -> None:
        self._node = node
        self._tensor = tensor
        self._values: dict[str, Any] = {}
        self._lock = threading.Lock()

    def __getitem__(self, key: str) -> Any:
        with self._lock:
            if key not in self._values:
                self._values[key] = lazy_unflatten(self._node[key], self._tensor)
            return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._node)

    def __len__(self) -> int:
        return len(self._node)

    def __reduce__(self) -> tuple[Any, tuple[dict[str, Any]]]:
        """Copied or pickled as a plain dict, every entry read (``copy.deepcopy`` works)."""
        return dict, ({key: self[key] for key in self._node},)

    def __repr__(self) -> str:
        keys = list(self._node)
        shown = ", ".join(repr(k) for k in keys[:8]) + (", ..." if len(keys) > 8 else "")
        return f"LazyDict({shown}; {len(self._values)} of {len(keys)} read)"


__all__ = ["LazyDict", "lazy_unflatten"]
