"""The seam between :class:`~safepoint.CheckpointManager` and multi-rank training.

The core never imports a framework, so it cannot import :mod:`safepoint.distributed`
(which needs ``torch.distributed``). Instead that package, when imported, registers a
*provider* here with :func:`register`; the manager asks :func:`find` for a
:class:`Collective` at construction:

- ``group=`` given: a :class:`Collective` is used as it is (e.g.
  ``safepoint.distributed.Collective(timeout=60)``), a ``torch.distributed`` process
  group is wrapped by the provider;
- otherwise, only when ``sys.modules`` already holds an initialised
  ``torch.distributed`` with more than one rank: the provider wraps the default group.
  If the program has not imported :mod:`safepoint.distributed`, that is an error (a
  silent single-rank save on every rank would race on one root).

A :class:`Collective` performs the whole collective save and restore; the manager
hands it itself, and a single-process manager (``find`` returned None) never sees one.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, Protocol

from safepoint.errors import ConfigError


class Collective(Protocol):
    """A multi-rank save/restore protocol bound to one process group."""

    rank: int
    world_size: int

    def save(self, manager: Any, state: Any, *, step: Any, epoch: Any, metrics: Any) -> Any: ...

    def restore(
        self, manager: Any, state: Any, *, checkpoint: Any, strict: bool, missing_ok: bool
    ) -> Any: ...


Provider = Callable[[Any], Collective]
_PROVIDER: list[Provider] = []


def register(provider: Provider) -> None:
    """Install the provider that turns a process group (None: the default) into a Collective."""
    _PROVIDER[:] = [provider]


def _active_world() -> int:
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return int(dist.get_world_size())


def find(group: Any = None) -> Collective | None:
    """The Collective for ``group`` or the active default group; None for one process."""
    if group is None and _active_world() <= 1:
        return None
    if callable(getattr(group, "save", None)) and callable(getattr(group, "restore", None)):
        return group  # type: ignore[no-any-return]  # a Collective built by the caller
    if not _PROVIDER:
        raise ConfigError(
            "torch.distributed is initialised with more than one rank, but "
            "safepoint.distributed is not imported. Expected 'import safepoint.distributed' "
            f"before creating the CheckpointManager. Received: group={group!r}. Import it so "
            "that save() and restore() run collectively on every rank."
        )
    return _PROVIDER[0](group)


__all__ = ["Collective", "Provider", "find", "register"]
