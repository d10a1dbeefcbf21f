"""``ResumableSampler``: a shuffling sampler whose data position survives a checkpoint.

Part of the PyTorch adapter (imported through ``safepoint.torch``).
"""

from __future__ import annotations

import logging
import sys
import weakref
from collections.abc import Iterator, Sized
from types import FrameType
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

from safepoint.errors import ConfigError, StateMismatchError

try:  # private: used only to see how many batches the loop consumed (see ResumableSampler)
    from torch.utils.data.dataloader import _BaseDataLoaderIter
except ImportError:  # pragma: no cover - torch moved it; fall back to counting indices
    _BaseDataLoaderIter = None  # type: ignore[assignment,misc]

log = logging.getLogger("safepoint")


def _as_byte_tensor(value: Any) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(np.ascontiguousarray(value))
    return value


def _find_loader_iterator() -> Any:
    """The ``DataLoader`` iterator whose ``next()`` is running us, if any.

    The DataLoader calls its (batch) sampler from ``_next_index`` with ``self`` being
    its iterator. Holding it (weakly) tells the sampler how many batches the loop has
    really consumed, which with worker processes is fewer than the indices the
    sampler has handed out (they prefetch ``prefetch_factor * num_workers`` batches).
    """
    if _BaseDataLoaderIter is None:
        return None
    frame: FrameType | None = sys._getframe(2)
    for _ in range(8):
        if frame is None:
            return None
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, _BaseDataLoaderIter):
            return candidate
        frame = frame.f_back
    return None


class _Pass:
    """One iteration over the sampler: its epoch, where it started, what it handed out."""

    __slots__ = ("epoch", "exhausted", "iterator", "per_batch", "start", "yielded")

    def __init__(self, epoch: int, start: int) -> None:
        self.epoch = epoch
        self.start = start
        self.yielded = 0
        self.exhausted = False
        self.iterator: weakref.ref[Any] | None = None
        self.per_batch = 0  # samples per DataLoader batch; 0 = count yielded indices


class ResumableSampler(Sampler[int]):
    """A shuffling sampler whose position survives a checkpoint, exactly.

    Each full pass is one epoch: a permutation drawn from ``seed`` and the epoch number
    alone (not from torch's global generator), so any epoch's order can be rebuilt
    without replaying the ones before it. ``state_dict()`` records the epoch and the
    number of samples the training loop has consumed; after ``load_state_dict`` the
    next pass yields exactly the rest of that epoch, and the skipped samples are never
    read through the dataset. The pass after that starts the next epoch.

    Exactness inside an ordinary loop (``DataLoader(ds, batch_size=32,
    sampler=sampler)``) needs two things this class takes care of:

    * With ``num_workers > 0`` the loader prefetches, so the sampler runs ahead of the
      loop. The position saved is what the loop consumed (read from the live
      DataLoader iterator), never what was prefetched; resuming with a different
      ``num_workers`` is therefore exact as well.
    * Creating a DataLoader iterator draws a worker seed from torch's global
      generator. An uninterrupted run drew it at the start of the epoch; a resumed run
      draws it again mid-epoch. When a pass resumes an interrupted epoch, the sampler
      puts torch's global generator back to the state saved with its position, so the
      dropout masks that follow are the uninterrupted run's. (Random transforms inside
      worker processes are seeded from that worker seed and are not reproduced; derive
      them from the sample index to make them exact.)

    ``num_replicas``/``rank`` split each epoch between data-parallel ranks like
    ``DistributedSampler``: ``drop_last`` then drops the tail that does not divide
    evenly instead of padding with repeated samples. ``set_epoch(epoch)`` is accepted
    like ``DistributedSampler.set_epoch``: calling it with the epoch already in
    progress keeps the position, so loops written for that sampler resume correctly.
    A loop that stops consuming a pass early (``break``) ends that epoch.
    """

    def __init__(
        self,
        data_source: Sized,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        *,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        if not hasattr(data_source, "__len__"):
            raise ConfigError(
                "ResumableSampler needs a sized data source. Expected a map-style dataset "
                f"with __len__. Received: data_source={type(data_source).__name__}. Use a "
                "Dataset with __len__ (iterable datasets carry their own position)."
            )
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ConfigError(
                f"Invalid seed. Expected a non-negative int. Received: seed={seed!r}. "
                "Pass seed=0 or another non-negative int."
            )
        if not (isinstance(num_replicas, int) and num_replicas >= 1):
            raise ConfigError(
                f"Invalid num_replicas. Expected a positive int. Received: num_replicas="
                f"{num_replicas!r}."
            )
        if not (isinstance(rank, int) and 0 <= rank < num_replicas):
            raise ConfigError(
                f"Invalid rank. Expected 0 <= rank < num_replicas={num_replicas}. Received: "
                f"rank={rank!r}."
            )
        self.data_source = data_source
        self.shuffle = bool(shuffle)
        self.seed = seed
        self.drop_last = bool(drop_last)
        self.num_replicas = num_replicas
        self.rank = rank
        self._epoch = 0
        self._position = 0
        self._rewind: torch.Tensor | None = None
        self._pass: _Pass | None = None

    # -- sizes and order ---------------------------------------------------------------
    def _sizes(self) -> tuple[int, int]:
        """(samples per rank per epoch, total samples per epoch over all ranks)."""
        n = len(self.data_source)
        if self.num_replicas == 1:
            return n, n
        per_rank = n // self.num_replicas if self.drop_last else -(-n // self.num_replicas)
        return per_rank, per_rank * self.num_replicas

    def __len__(self) -> int:
        return self._sizes()[0]

    def _order(self, epoch: int) -> np.ndarray:
        """This rank's indices of ``epoch``: a function of (seed, epoch) only."""
        n = len(self.data_source)
        total = self._sizes()[1]
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(n)
        else:
            order = np.arange(n)
        if total > n:  # pad by repeating from the start, like DistributedSampler
            order = np.concatenate([order, np.resize(order, total - n)])
        return order[self.rank : total : self.num_replicas]

    # -- position ----------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        """The epoch in progress, or the next one when no pass is in progress."""
        return self._progress()[0]

    def _progress(self) -> tuple[int, int, bool]:
        """(epoch, samples consumed in it, whether a pass over it is in progress)."""
        p = self._pass
        if p is None:
            return self._epoch, self._position, False
        if p.iterator is not None:
            it = p.iterator()
            if it is None:  # the loop let go of its DataLoader iterator: the pass is over
                return self._end_pass(p)
            consumed = self._consumed(p, it)
        elif p.exhausted:
            return self._end_pass(p)
        else:
            consumed = p.yielded
        return p.epoch, min(p.start + consumed, len(self)), True

    @staticmethod
    def _consumed(p: _Pass, it: Any) -> int:
        if p.per_batch == 0:
            return p.yielded
        return int(it._num_yielded) * p.per_batch

    def _end_pass(self, p: _Pass) -> tuple[int, int, bool]:
        self._pass = None
        self._epoch, self._position = p.epoch + 1, 0
        return self._epoch, 0, False

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning, unless it is the epoch in progress."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ConfigError(f"Invalid epoch. Expected a non-negative int. Received: {epoch!r}.")
        if epoch != self._progress()[0]:
            self._pass = None
            self._epoch, self._position, self._rewind = epoch, 0, None

    def __iter__(self) -> Iterator[int]:
        # A generator: nothing runs until the first next(), which the DataLoader makes
        # after drawing its worker seed (and, with workers, after a discarded first
        # iter() of its sampler), so the pass begins at the right moment.
        epoch, start, in_progress = self._progress()
        if in_progress:  # a new pass over a pass still held open ends that epoch
            epoch, start, _ = self._end_pass(self._pass)  # type: ignore[arg-type]
        p = _Pass(epoch, start)
        it = _find_loader_iterator()
        if it is not None:
            p.iterator = weakref.ref(it)
            index_sampler = it._index_sampler
            if index_sampler is self:
                p.per_batch = 1
            elif getattr(index_sampler, "sampler", None) is self and hasattr(
                index_sampler, "batch_size"
            ):
                p.per_batch = int(index_sampler.batch_size)
            elif it._num_workers > 0:
                log.warning(
                    "safepoint: ResumableSampler is wrapped by a custom batch sampler and "
                    "the DataLoader has workers; saved positions count prefetched samples. "
                    "Use DataLoader(..., batch_size=N, sampler=sampler) for exact resumes."
                )
            del it  # this frame lives as long as the pass: never keep the iterator alive
        self._pass = p
        if self._rewind is not None:
            # Undo the DataLoader's worker-seed draw of this resumed pass (see class doc).
            torch.set_rng_state(self._rewind)
            self._rewind = None
        for index in self._order(epoch)[start:].tolist():
            p.yielded += 1
            yield index
        p.exhausted = True

    # -- state -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Epoch and consumed position, and torch's generator when mid-pass.

        The generator state lets a resumed pass undo the DataLoader's seed draw; it is
        saved only while a pass is in progress, the only time a resume needs it.
        """
        epoch, position, in_progress = self._progress()
        out: dict[str, Any] = {
            "epoch": epoch,
            "position": position,
            "size": len(self.data_source),
            "seed": self.seed,
            "shuffle": self.shuffle,
            "num_replicas": self.num_replicas,
            "rank": self.rank,
            "drop_last": self.drop_last,
        }
        if in_progress:
            out["torch_rng"] = torch.get_rng_state()
        return out

    @staticmethod
    def resplit(saved: list[dict[str, Any]], rank: int, num_replicas: int) -> dict[str, Any]:
        """Rank ``rank`` of ``num_replicas``'s state from the states all old ranks saved.

        For a restore on another world size (``PerRank(sampler, reshard=
        ResumableSampler.resplit)``): rank ``r`` of ``R`` reads ``order[r::R]`` of the
        epoch's global order, so after ``p`` samples each the first ``p * R`` of it are
        consumed. The new ranks continue from there (``order[p*R + r'::R']``), which is
        the same global sample order when the global batch is unchanged, i.e. when
        ``p * R`` divides by the new world size. The torch generator rewind of a resumed
        pass does not carry over (there is no old rank ``r'`` to take it from).
        """
        if not saved or not all(isinstance(s, dict) for s in saved):
            raise StateMismatchError(
                "Re-splitting a ResumableSampler failed. Expected the list of every old "
                f"rank's state. Received: {saved!r:.200}. Pass what PerRank saved."
            )
        first = saved[0]
        keys = ("epoch", "position", "size", "seed", "shuffle", "drop_last")
        if any(s.get(k) != first.get(k) for s in saved for k in keys):
            raise StateMismatchError(
                "Re-splitting a ResumableSampler failed: the old ranks were at different "
                "positions. Expected ranks in lockstep. Received: "
                f"{[(s.get('epoch'), s.get('position')) for s in saved]}. Restore on the "
                "old world size instead."
            )
        consumed = int(first["position"]) * len(saved)
        if consumed % num_replicas:
            raise StateMismatchError(
                f"Re-splitting a ResumableSampler failed: {consumed} samples of the epoch "
                f"were consumed, which {num_replicas} ranks cannot continue evenly. "
                "Expected the same global batch size. Received: "
                f"num_replicas={num_replicas}. Resume on a world size that divides it."
            )
        out = {k: first[k] for k in keys}
        out.update(position=consumed // num_replicas, num_replicas=num_replicas, rank=rank)
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or not {"epoch", "position"} <= set(state):
            raise StateMismatchError(
                "Restoring a ResumableSampler failed. Expected a dict with 'epoch' and "
                f"'position'. Received: {state!r:.200}. Restore the state a ResumableSampler "
                "saved."
            )
        mine = {
            "size": len(self.data_source),
            "seed": self.seed,
            "shuffle": self.shuffle,
            "num_replicas": self.num_replicas,
            "rank": self.rank,
            "drop_last": self.drop_last,
        }
        differ = [
            f"{k}: saved {state[k]!r}, now {v!r}"
            for k, v in mine.items()
            if k in state and state[k] != v
        ]
        if differ:
            raise StateMismatchError(
                "Restoring a ResumableSampler failed: the saved position belongs to another "
                f"order of the data. Expected the saved configuration. Received: {differ}. "
                "Build the sampler on the same dataset with the same seed, shuffle, "
                "num_replicas, rank and drop_last to resume exactly.",
                mismatched=[d.split(":")[0] for d in differ],
            )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= len(self):
            raise StateMismatchError(
                f"Restoring a ResumableSampler failed. Expected 0 <= position <= {len(self)} "
                f"and epoch >= 0. Received: epoch={epoch}, position={position}. The state is "
                "not from this dataset; restore the matching checkpoint."
            )
        self._pass = None
        self._epoch, self._position = epoch, position
        rewind = state.get("torch_rng")
        self._rewind = None if rewind is None else _as_byte_tensor(rewind).clone()


__all__ = ["ResumableSampler"]
