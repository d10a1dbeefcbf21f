"""Multi-rank checkpointing on ``torch.distributed``: sharded saves, one atomic commit.

Importing this package lets :class:`~safepoint.CheckpointManager` run ``save()`` and
``restore()`` collectively whenever a process group with more than one rank is active
(or ``group=`` names one). See ``docs/distributed.md``::

    import safepoint.distributed
    from safepoint.distributed import PerRank, reseed

    model_sd, optim_sd = get_state_dict(model, optim)
    state = {"model": model_sd, "optim": optim_sd, "rng": PerRank(RNGState(), reseed(0))}
    manager.save(state, step=step)
"""

from __future__ import annotations

import random
import zlib
from typing import Any

import numpy as np
import torch

from safepoint.checkpoint import Checkpoint
from safepoint.distributed import restoring, saving
from safepoint.distributed.coordinator import DEFAULT_TIMEOUT, Coordinator
from safepoint.distributed.perrank import PerRank, Reshard
from safepoint.manager import coordination


class Collective:
    """:class:`safepoint.manager.coordination.Collective` over a torch process group."""

    def __init__(self, group: Any = None, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.coordinator = Coordinator(group, timeout=timeout)
        self.rank = self.coordinator.rank
        self.world_size = self.coordinator.world_size

    def save(self, manager: Any, state: Any, *, step: Any, epoch: Any, metrics: Any) -> Checkpoint:
        manager.wait()  # at most one save in flight: the coordinator's group is not shared
        return saving.save(
            self.coordinator,
            manager,
            state,
            step=step,
            epoch=epoch,
            metrics=metrics,
            background=bool(getattr(manager, "async_save", False)),
        )

    def restore(
        self, manager: Any, state: Any, *, checkpoint: Any, strict: bool, missing_ok: bool
    ) -> Checkpoint | None:
        manager.wait()  # a save in flight uses the coordinator's group in the background
        return restoring.restore(
            self.coordinator,
            manager,
            state,
            checkpoint=checkpoint,
            strict=strict,
            missing_ok=missing_ok,
        )


def reseed(seed: int) -> Reshard:
    """A ``PerRank`` reshard for RNG states: on a new world size, seed every generator.

    Per-rank random streams cannot be mapped from N ranks onto M: rank ``r`` of the new
    world seeds Python's ``random``, numpy's global generator and torch's CPU (and CUDA)
    generators with a value derived from ``seed``, the old and new world sizes and
    ``r``: deterministic, different per rank, not the stream it would have had.
    """

    def reshard(saved: list[Any], rank: int, world_size: int) -> None:
        value = zlib.crc32(f"{seed}:{len(saved)}:{world_size}:{rank}".encode())
        random.seed(value)
        np.random.seed(value)
        torch.manual_seed(value)
        return None

    return reshard


coordination.register(Collective)

__all__ = ["DEFAULT_TIMEOUT", "Collective", "Coordinator", "PerRank", "Reshard", "reseed"]
