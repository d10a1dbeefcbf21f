"""The collective restore: every rank reads only the chunks its own shards overlap.

Rank 0 lists the candidates (``"latest"``: every committed checkpoint, newest first)
and sends the names. For each candidate every rank reads and verifies the boxes of its
live ``DTensor`` shards (on the *current* mesh, whatever the world size was at save
time), the whole of each plain tensor and the per-rank values; then the ranks vote.

Where a live tensor can take its box in place (a CPU tensor, contiguous, of the saved
dtype: see :mod:`safepoint.distributed.destinations`) the chunks that lie whole inside
the box are read straight into its memory, several files at a time, and hashed block
by block as they land: no intermediate buffer, no second pass (``dcp.load`` reads in
place too). Everything else is read into fresh memory and copied into the state after
the vote. The state is checked to fit the checkpoint before the first in-place read.

All ok: each rank copies what it read into fresh memory into the state. Any rank
failed: for ``"latest"`` everyone moves to the next candidate (the damaged file is named
in the log), otherwise every rank raises the same error. A failed candidate may have
been read partly into the live tensors; the next one read overwrites them, and the
error raised when none is left says so. With ``strict=False`` nothing is read in place.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import numpy as np
from torch.distributed.tensor import DTensor

from safepoint import formats
from safepoint.catalog import chunked
from safepoint.catalog.index import UNREADABLE
from safepoint.catalog.reader import read_manifest
from safepoint.checkpoint import Checkpoint
from safepoint.distributed.coordinator import Coordinator
from safepoint.distributed.destinations import fits, live_bytes
from safepoint.distributed.perrank import PerRank, split
from safepoint.errors import (
    CheckpointNotFoundError,
    ConfigError,
    CorruptCheckpointError,
    SafepointError,
    StateMismatchError,
)
from safepoint.ondisk import chunks
from safepoint.state.loading import restore_into
from safepoint.state.tree import flatten, unflatten

log = logging.getLogger("safepoint")
_PARTLY = (
    " The live tensors were read into in place and may hold parts of the checkpoints "
    "tried: restore a good checkpoint (or rebuild the state) before training on."
)
_ERRORS: dict[str, type[SafepointError]] = {
    "CheckpointNotFoundError": CheckpointNotFoundError,
    "ConfigError": ConfigError,
}


def _candidates(coord: Coordinator, mgr: Any, checkpoint: str | int) -> list[str]:
    names: list[str] | None = None
    problem: list[str] | None = None
    if coord.rank == 0:
        try:
            if checkpoint == "best" and mgr.monitor is None:
                raise ConfigError(
                    "restore(checkpoint='best') needs a monitor. Received: monitor=None. "
                    "Create the manager with monitor='val_loss' (or the metric you track)."
                )
            recover = getattr(mgr.storage, "recover", None)
            if recover is not None:
                recover()
            names = mgr.catalog.resolve(checkpoint, best=mgr.best)
        except Exception as exc:
            problem = [type(exc).__name__, str(exc)]
    got = coord.exchange_json({"names": names, "error": problem})[0]
    if got["error"]:
        kind, text = got["error"]
        raise _ERRORS.get(kind, ConfigError)(text)
    return list(got["names"])


def _read(
    mgr: Any, name: str, state: Any, *, strict: bool
) -> tuple[Checkpoint, Any, list[chunked.Read]]:
    """Read and verify this rank's part of checkpoint ``name`` that goes to fresh memory;
    the state tree it rebuilds and the reads left to run into the live tensors (checked
    to fit the state first: running them writes the state)."""
    found = read_manifest(mgr.storage, name)
    shared, per = split(state) if state is not None else ({}, {})
    targets = {leaf.key: leaf.source for leaf in flatten(shared)[1]}
    cache: dict[str, Any] = {}
    reads: list[chunked.Read] = []
    # strict=False may skip parts of the state: those must not be written in place.
    in_place = strict and state is not None

    def box(entry: dict[str, Any], target: Any, offsets: list[int], sizes: list[int]) -> Any:
        """The box's bytes in fresh memory, or None when its reads go into ``target``."""
        dest = live_bytes(target, entry, sizes) if in_place else None
        if dest is None:
            return chunked.read_box(mgr.storage, name, entry, offsets, sizes)
        reads.extend(chunked.box_reads(mgr.storage, name, entry, offsets, sizes, dest))
        return None

    def tensor(key: str) -> Any:
        if key in cache:
            return cache[key]
        entry = found.tensors[key]
        target = targets.get(key)
        if not chunks.is_chunked(entry):
            raise CorruptCheckpointError(
                f"{name}: tensor {key!r} is not chunked. Expected a multi-rank checkpoint. "
                "Received: a single-process one. Restore it without a process group, or "
                "save it again from a multi-rank run.",
                file=name,
            )
        value: Any = target
        if isinstance(target, DTensor) and list(target.shape) == entry["shape"]:
            metas = target.__create_chunk_list__()
            local = target.to_local()
            if len(metas) != 1:
                raise ConfigError(
                    f"Cannot restore {key!r}: its DTensor has {len(metas)} local chunks. "
                    "Expected one. Received: placements={target.placements}. Use one "
                    "Shard per tensor dimension."
                )
            offsets, sizes = list(map(int, metas[0].offsets)), list(map(int, metas[0].sizes))
            raw = box(entry, local, offsets, sizes)
            if raw is not None:
                part = formats.materialize({**entry, "shape": sizes}, raw)
                value = DTensor.from_local(
                    part.to(local.device),
                    target.device_mesh,
                    target.placements,
                    run_check=False,
                    shape=target.shape,
                    stride=target.stride(),
                )
        else:
            shape = entry["shape"]
            raw = box(entry, target, [0] * len(shape), shape)
            if raw is not None:
                value = formats.materialize(entry, raw, as_numpy=isinstance(target, np.ndarray))
        cache[key] = value
        return value

    loaded = unflatten(found.tree, tensor)
    ckpt = mgr.catalog.to_checkpoint(found, name)
    if reads:  # a mismatch is refused before the first live tensor is written
        fits(shared, {k: v for k, v in loaded.items() if k not in per})
    return ckpt, loaded, reads


def _apply(coord: Coordinator, state: Any, loaded: Any, *, strict: bool) -> None:
    shared, per = split(state)
    holder = dict(shared)
    restore_into(holder, {k: v for k, v in loaded.items() if k not in per}, strict=strict)
    state.update(holder)
    for key, slot in per.items():
        _apply_per_rank(coord, key, slot, loaded.get(key), strict=strict)


def _apply_per_rank(
    coord: Coordinator, key: str, slot: PerRank, saved: Any, *, strict: bool
) -> None:
    if not isinstance(saved, list):
        if strict:
            raise ConfigError(
                f"The checkpoint holds no per-rank values under {key!r}. Expected the list "
                f"a PerRank entry saves. Received: {type(saved).__name__}. Restore with "
                "strict=False to keep the live values."
            )
        return
    if len(saved) == coord.world_size:
        value = saved[coord.rank]
    elif slot.reshard is not None:
        value = slot.reshard(saved, coord.rank, coord.world_size)
    else:
        log.warning(
            "safepoint: %r was saved by %d ranks and is restored on %d: no per-rank value "
            "maps across world sizes, so the live one is kept (give PerRank a reshard=).",
            key,
            len(saved),
            coord.world_size,
        )
        return
    if value is not None:
        slot.value = restore_into(slot.value, value, strict=strict)


def restore(
    coord: Coordinator,
    mgr: Any,
    state: Any,
    *,
    checkpoint: str | int,
    strict: bool,
    missing_ok: bool,
) -> Checkpoint | None:
    """The collective restore (see the module docstring); call it on every rank."""
    names = _candidates(coord, mgr, checkpoint)
    if not names:
        if missing_ok:
            return None
        raise CheckpointNotFoundError(
            f"No committed checkpoint in {mgr.storage.root} to restore "
            f"(checkpoint={checkpoint!r}). Expected at least one save before restoring. "
            "Pass missing_ok=True to start fresh when there is none."
        )
    skipped: list[str] = []
    touched, partly = False, ""
    for name in names:
        problem: list[Any] | None = None
        try:
            ckpt, loaded, reads = _read(mgr, name, state, strict=strict)
            touched = touched or bool(reads)
            chunked.run_reads(reads)
        except UNREADABLE as exc:
            problem = [False, f"{type(exc).__name__}: {exc}"]
        except Exception as exc:  # a mismatch with the state: never a reason to fall back
            problem = [True, f"{type(exc).__name__}: {exc}"]
        got = coord.exchange_json(problem)
        bad = [(r, p) for r, p in enumerate(got) if p is not None]
        if not bad:
            if state is not None:
                _apply(coord, state, loaded, strict=strict)
            return replace(ckpt, state=loaded)
        text = "; ".join(f"rank {r}: {p[1]}" for r, p in bad)
        touched = any(coord.exchange_json(touched))
        partly = _PARTLY if touched else ""
        if any(p[0] for _, p in bad):
            raise StateMismatchError(
                f"Restoring {name!r} into the given state failed. Expected a state that "
                f"fits the checkpoint on every rank. Received: {text}. Build the state as "
                "it was saved (same keys, shapes, dtypes)."
            )
        if checkpoint != "latest":
            raise CorruptCheckpointError(
                f"Restoring {name!r} failed. Expected every rank to read its part. "
                f"Received: {text}. Restore another checkpoint.{partly}",
                file=name,
            )
        log.warning("safepoint: skipping %s while restoring latest: %s", name, text)
        skipped.append(f"{name} ({text})")
    raise CorruptCheckpointError(
        f"No checkpoint in {mgr.storage.root} could be restored. Expected one that every "
        f"rank reads. Received: {'; '.join(skipped)}. Check the storage; run "
        f"'safepoint verify ROOT'.{partly}",
        file=str(mgr.storage.root),
    )


__all__ = ["restore"]
