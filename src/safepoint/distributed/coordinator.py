"""Plain-bytes coordination over ``torch.distributed``: exchange, vote, barrier.

Nothing here pickles: every message is bytes (JSON written by safepoint) carried in
``uint8`` tensors by ``all_gather`` on a dedicated gloo group. The dedicated group
has two jobs: its timeout bounds every wait (a rank that died makes the others raise
within ``timeout`` seconds instead of hanging), and its collectives never interleave
with the training's own (NCCL) collectives on the default group.
"""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from safepoint.errors import StorageError

#: Seconds a rank waits for the others at each step of a save or restore.
DEFAULT_TIMEOUT = 300.0


class Coordinator:
    """Rank, world size and byte exchange of one process group (collective calls only)."""

    def __init__(self, group: Any = None, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise StorageError(
                "safepoint.distributed needs an initialised process group. Expected "
                "torch.distributed.init_process_group() to have run. Received: none. Call it "
                "on every rank before creating the CheckpointManager."
            )
        self.timeout = float(timeout)
        ranks = None if group is None else dist.get_process_group_ranks(group)
        # Every rank creates it, in the same order: new_group is itself collective.
        self.group = dist.new_group(ranks=ranks, backend="gloo", timeout=timedelta(seconds=timeout))
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)

    def exchange(self, data: bytes) -> list[bytes]:
        """Every rank's ``data``, in rank order (an all-gather of bytes)."""
        try:
            size = torch.tensor([len(data)], dtype=torch.int64)
            sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world_size)]
            dist.all_gather(sizes, size, group=self.group)
            longest = max(int(s.item()) for s in sizes)
            mine = torch.zeros(longest, dtype=torch.uint8)
            if data:
                mine[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            bufs = [torch.zeros(longest, dtype=torch.uint8) for _ in range(self.world_size)]
            dist.all_gather(bufs, mine, group=self.group)
        except RuntimeError as exc:
            raise StorageError(
                f"Rank {self.rank} got no answer from the other ranks within {self.timeout:g} s "
                f"(a rank died or is stuck). Expected all {self.world_size} ranks to take "
                f"part. Received: {exc}. Nothing was committed; restart the job."
            ) from exc
        return [bytes(b[: int(s.item())].numpy()) for b, s in zip(bufs, sizes, strict=True)]

    def exchange_json(self, value: Any) -> list[Any]:
        """Every rank's JSON ``value``, in rank order."""
        return [json.loads(b) for b in self.exchange(json.dumps(value).encode())]

    def vote(self, error: str | None) -> None:
        """Return when every rank passed None; otherwise raise the same error on every rank."""
        errors = self.exchange_json(error)
        failed = [(r, e) for r, e in enumerate(errors) if e is not None]
        if failed:
            text = "; ".join(f"rank {r}: {e}" for r, e in failed)
            raise StorageError(
                f"A collective checkpoint operation failed on {len(failed)} of "
                f"{self.world_size} ranks. Expected success on every rank. Received: {text}. "
                "Nothing was committed by this save; fix the cause named above."
            )

    def barrier(self) -> None:
        """Wait for every rank (bounded by the timeout)."""
        self.exchange(b"")


__all__ = ["DEFAULT_TIMEOUT", "Coordinator"]
