"""Per-rank values in a multi-rank state: RNG states, sampler positions.

Every tensor of a multi-rank state is either a ``DTensor`` (sharded: each rank saves
its own shards) or a plain tensor that every rank holds the same copy of (DDP
parameters: saved once). Values that differ between ranks are wrapped in
:class:`PerRank`, at the top level of the state dict: each rank saves its own, and the
checkpoint holds the list of them in rank order (``safepoint.load`` shows that list).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

#: ``reshard(saved, rank, world_size)``: this rank's value from the list the old ranks
#: saved, when the world size changed; None leaves the live value as it is.
Reshard = Callable[[list[Any], int, int], Any]


@dataclass
class PerRank:
    """A value saved and restored per rank (``value`` is restored in place).

    On the same world size rank ``r`` gets back exactly what rank ``r`` saved. On a
    different world size there is no rank ``r`` to take it from: ``reshard`` computes
    the value (see :func:`safepoint.distributed.reseed` for RNG states); without one
    the live value is kept and a warning is logged.
    """

    value: Any
    reshard: Reshard | None = None


def split(state: Any) -> tuple[dict[str, Any], dict[str, PerRank]]:
    """The shared part of a top-level state dict and its :class:`PerRank` entries."""
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        from safepoint.errors import ConfigError

        raise ConfigError(
            "A multi-rank save needs a dict with str keys at the top of its state. Expected "
            f"e.g. {{'model': ..., 'optim': ...}}. Received: {type(state).__name__}. Wrap "
            "the state in a dict."
        )
    shared = {k: v for k, v in state.items() if not isinstance(v, PerRank)}
    return shared, {k: v for k, v in state.items() if isinstance(v, PerRank)}


def prefix(rank: int) -> str:
    """The key prefix of rank ``rank``'s own tensors in the manifest."""
    return f"@rank{rank}"


__all__ = ["PerRank", "Reshard", "prefix", "split"]
