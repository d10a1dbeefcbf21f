"""The collective save: every rank writes its own chunks, a vote, rank 0 commits.

Steps (each rank; every exchange is bounded by the coordinator's timeout):

1. validate the arguments and the state; rank 0 takes the root's writer lock, picks the
   sequence number and name and creates the staging directory; it sends the header
   (name, seq, staging entry) to everyone, or its error;
2. *plan*: every rank sends the boxes it holds (its DTensor shards, its copy of each
   replicated tensor); every rank computes the same owners: a box one rank holds is
   written by that rank, a box several hold (DDP) by the least-loaded of them, the
   largest boxes first, so the bytes are spread over the ranks;
3. every rank writes the boxes it owns and its :class:`PerRank` values into its own
   file ``rank-NNNNN.bin`` of the staging directory (``fsync``-ed) and reports its
   chunk records and per-rank tree; that report is the vote;
4. all ok: rank 0 writes the one manifest and commits (the ordinary commit transaction),
   then applies retention; any failure: rank 0 discards the staging directory. Rank 0
   sends the outcome and every rank returns the checkpoint or raises the same error.

Async saves (``CheckpointManager(..., async_save=True)``): steps 1 and 2 run in
``save()``, then every rank copies the boxes it writes (and its per-rank tensors) into
the manager's reused staging memory and returns: the training stall is that copy plus
two small exchanges. Steps 3 and 4 run in the manager's save worker thread. Their
exchanges use the coordinator's own gloo group, never the training's group, and only
one thread uses it at a time: ``save()``, ``restore()`` and ``close()`` first wait for
the save in flight, and re-raise its error (the same on every rank, from the vote).

A rank that dies leaves the others raising within the timeout; its partial file sits in
a staging directory that the next writer's cleanup or ``safepoint gc`` removes.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from torch.distributed.tensor import DTensor

from safepoint.checkpoint import Checkpoint
from safepoint.distributed.committing import commit
from safepoint.distributed.coordinator import Coordinator
from safepoint.distributed.perrank import PerRank, prefix, split
from safepoint.errors import ConfigError
from safepoint.manager.options import int_arg, metrics_arg
from safepoint.ondisk import checksum
from safepoint.ondisk.manifest import Manifest, now
from safepoint.ondisk.template import bounded
from safepoint.state.tree import TensorLeaf, as_bytes, flatten
from safepoint.storage.payload_write import PayloadStream

log = logging.getLogger("safepoint")

#: (key, offsets, sizes, tensor holding exactly that box)
Box = tuple[str, list[int], list[int], Any]


def local_boxes(leaves: list[TensorLeaf]) -> list[Box]:
    """The boxes of the global tensors this rank holds."""
    out: list[Box] = []
    for leaf in leaves:
        src = leaf.source
        if isinstance(src, DTensor):
            if any(p.is_partial() for p in src.placements):
                raise ConfigError(
                    f"Cannot save the DTensor {leaf.key!r}: it holds partial sums. Expected "
                    f"Shard or Replicate placements. Received: {src.placements}. Call "
                    ".redistribute() or .full_tensor() first."
                )
            local = src.to_local()
            for meta in src.__create_chunk_list__():
                sl = tuple(
                    slice(0, int(s)) for s in meta.sizes
                )  # one chunk per rank: the whole local tensor
                out.append(
                    (leaf.key, list(map(int, meta.offsets)), list(map(int, meta.sizes)), local[sl])
                )
        else:
            out.append((leaf.key, [0] * len(leaf.shape), list(leaf.shape), src))
    return out


def owners(plans: list[list[list[Any]]], world: int) -> dict[tuple[str, tuple[int, ...]], int]:
    """Which rank writes each box: its holder, or the least-loaded of its holders."""
    holders: dict[tuple[str, tuple[int, ...]], tuple[int, list[int]]] = {}
    for rank, plan in enumerate(plans):
        for key, offsets, nbytes in plan:
            slot = holders.setdefault((key, tuple(offsets)), (int(nbytes), []))
            slot[1].append(rank)
    load = [0] * world
    out: dict[tuple[str, tuple[int, ...]], int] = {}
    for box, (nbytes, ranks) in sorted(holders.items(), key=lambda kv: (-kv[1][0], kv[0])):
        best = min(ranks, key=lambda r: (load[r], r))
        load[best] += nbytes
        out[box] = best
    return out


def write_boxes(
    storage: Any, relpath: str, boxes: list[Box]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Write ``boxes`` into one durable file; its files entry and chunk records."""
    fname = os.path.basename(relpath)
    bufs = [as_bytes(t) for _, _, _, t in boxes]
    stream = PayloadStream(storage.open_write(relpath), size_hint=sum(b.nbytes for b in bufs))
    records: list[dict[str, Any]] = []
    pos = 0
    try:
        for (key, offsets, sizes, _), buf in zip(boxes, bufs, strict=True):
            stream.write(buf)
            records.append(
                {
                    "key": key,
                    "offsets": offsets,
                    "sizes": sizes,
                    "file": fname,
                    "begin": pos,
                    "end": pos + buf.nbytes,
                    checksum.ALGORITHM: checksum.digest_bytes(buf),  # type: ignore[arg-type]
                }
            )
            pos += buf.nbytes
    except BaseException:
        stream.abort()
        raise
    size, digest = stream.close()
    return {"size": size, checksum.ALGORITHM: digest}, records


def _header(
    mgr: Any, step: int | None, epoch: int | None, metrics: dict[str, Any]
) -> dict[str, Any]:
    """Rank 0: lock, name and staging directory of the new checkpoint."""
    mgr.check_monitor(metrics)
    mgr._lock.keep()
    seq = mgr.next_seq()
    step = seq if step is None else step
    name = mgr.template.format(step=step, epoch=epoch, metrics=metrics)
    staged = mgr.storage.stage(name)
    return {"name": name, "seq": seq, "step": step, "staged": staged, "created": now()}


def save(
    coord: Coordinator,
    mgr: Any,
    state: Any,
    *,
    step: Any,
    epoch: Any,
    metrics: Any,
    background: bool = False,
) -> Checkpoint:
    """The collective save (see the module docstring); call it on every rank.

    ``background``: return after the plan and the snapshot of this rank's boxes into
    the manager's staging memory; write, vote and commit in the manager's save worker
    (the next ``wait()``, ``save()`` or ``close()`` raises its error, the same on every
    rank).
    """
    rank = coord.rank
    started = time.perf_counter()
    problem: str | None = None
    header: dict[str, Any] | None = None
    try:
        step = bounded("step", int_arg("step", step))
        epoch = bounded("epoch", int_arg("epoch", epoch))
        metrics = metrics_arg(metrics)
        shared, per = split(state)
        tree, leaves = flatten(shared)
        own_tree, own_leaves = flatten({prefix(rank): {k: v.value for k, v in per.items()}})
        if not isinstance(tree, dict) or any(k.startswith(("$", "@")) for k in state):
            raise ConfigError(
                "A multi-rank state's top-level keys must not start with '$' or '@'. "
                f"Expected plain names. Received: keys={list(state)!r}. Rename them."
            )
        boxes = local_boxes(leaves)
        if rank == 0:
            header = _header(mgr, step, epoch, metrics)
    except Exception as exc:  # every rank must hear of it, or the others would wait
        problem = f"{type(exc).__name__}: {exc}"
    try:
        got = coord.exchange_json({"error": problem, "header": header})
    except BaseException:
        if header is not None:  # rank 0: a rank died before the header reached it
            mgr.storage.discard(header["staged"])
        raise
    errors = [f"rank {r}: {g['error']}" for r, g in enumerate(got) if g["error"]]
    header = got[0]["header"]
    if errors:
        if rank == 0 and header is not None:
            mgr.storage.discard(header["staged"])
        raise ConfigError(
            f"The multi-rank save was refused before writing. Expected valid arguments and "
            f"state on every rank. Received: {'; '.join(errors)}. Fix the cause named above."
        )
    assert header is not None
    job = _Job(coord, mgr, header, tree, leaves, own_tree[prefix(rank)], own_leaves, per)
    job.metrics, job.epoch, job.started = metrics, epoch, started
    try:
        mine, refused = _plan(job, boxes)
        if background and refused is None:
            staged_boxes = _snapshot(mgr, leaves + own_leaves, mine)
            if staged_boxes is not None:
                mgr._worker.submit(header["name"], lambda: _finish_or_discard(job, staged_boxes))
                return job.checkpoint()
        return _finish(job, mine, refused)
    except BaseException:
        if rank == 0:
            mgr.storage.discard(header["staged"])
        raise


@dataclass
class _Job:
    """One collective save after its header: what every later step needs."""

    coord: Coordinator
    mgr: Any
    header: dict[str, Any]
    tree: dict[str, Any]
    leaves: list[TensorLeaf]
    own_tree: dict[str, Any]
    own_leaves: list[TensorLeaf]
    per: dict[str, PerRank]
    metrics: dict[str, Any] = field(default_factory=dict)
    epoch: int | None = None
    started: float = 0.0

    def checkpoint(self) -> Checkpoint:
        h = self.header
        return Checkpoint(
            name=h["name"],
            path=os.path.join(self.mgr.storage.root, h["name"]),
            step=h["step"],
            epoch=self.epoch,
            metrics=dict(self.metrics),
            created=h["created"],
            seq=h["seq"],
        )


def _nbytes(t: Any) -> int:
    """Bytes of a box's tensor: a torch tensor or a numpy array (a plain replicated leaf)."""
    if isinstance(t, np.ndarray):
        return int(t.nbytes)
    return int(t.numel() * t.element_size())


def _plan(job: _Job, boxes: list[Box]) -> tuple[list[Box], str | None]:
    """Exchange every rank's boxes; the ones this rank writes, or why the save is refused."""
    coord, rank = job.coord, job.coord.rank
    plans = coord.exchange_json(
        {
            "boxes": [[k, o, _nbytes(t)] for k, o, _, t in boxes],
            "shapes": {leaf.key: [list(leaf.shape), leaf.dtype.name] for leaf in job.leaves},
        }
    )
    for r, plan in enumerate(plans):
        if plan["shapes"] != plans[0]["shapes"]:
            return [], (
                f"ConfigError: Rank {r} holds a state of other tensors, shapes or dtypes than "
                "rank 0. Expected the same state structure on every rank. Received: "
                f"{sorted(set(plan['shapes']) ^ set(plans[0]['shapes']))[:5]} differ. "
                "Build the state the same way on every rank."
            )
    owner = owners([p["boxes"] for p in plans], coord.world_size)
    mine = [b for b in boxes if owner[(b[0], tuple(b[1]))] == rank and _nbytes(b[3])]
    mine += [
        (leaf.key, [0] * len(leaf.shape), list(leaf.shape), leaf.source) for leaf in job.own_leaves
    ]
    return mine, None


def _snapshot(mgr: Any, leaves: list[TensorLeaf], mine: list[Box]) -> list[Box] | None:
    """``mine`` copied into the manager's staging memory (None: over its cap)."""
    by_key = {leaf.key: leaf for leaf in leaves}
    group = [replace(by_key[k], shape=tuple(s), source=t) for k, _, s, t in mine]
    snap = mgr._staging.capture([group])
    if snap is None:
        if "staging" not in mgr._warned:
            mgr._warned.add("staging")
            log.warning(
                "safepoint: this rank's share of the state needs more than "
                "max_staging_bytes=%d; saving synchronously. Raise max_staging_bytes to "
                "save in the background.",
                mgr._staging.max_bytes,
            )
        return None
    return [(k, o, s, leaf.source) for (k, o, s, _), leaf in zip(mine, snap.leaves, strict=True)]


def _finish_or_discard(job: _Job, mine: list[Box]) -> Checkpoint:
    """The background half of an async save (its own thread; the coordinator's group)."""
    try:
        return _finish(job, mine, None)
    except BaseException:
        if job.coord.rank == 0:
            job.mgr.storage.discard(job.header["staged"])
        raise


def _finish(job: _Job, mine: list[Box], refused: str | None) -> Checkpoint:
    """Write this rank's file, vote, commit on rank 0, and agree on the outcome."""
    coord, mgr, header = job.coord, job.mgr, job.header
    rank, world = coord.rank, coord.world_size
    report: dict[str, Any] = {"error": refused}
    if refused is None:
        try:
            fname = f"rank-{rank:05d}.bin"
            info, records = write_boxes(mgr.storage, f"{header['staged']}/{fname}", mine)
            report.update(
                file=[fname, info],
                chunks=records,
                tree=job.own_tree,
                entries={leaf.key: leaf.entry() for leaf in job.own_leaves},
            )
        except Exception as exc:
            report = {"error": f"{type(exc).__name__}: {exc}"}
    reports = coord.exchange_json(report)
    failed = [f"rank {r}: {p['error']}" for r, p in enumerate(reports) if p["error"]]
    outcome: dict[str, Any] = {"error": "; ".join(failed) or None}
    manifest: Manifest | None = None
    if rank == 0 and not failed:
        try:
            manifest = commit(
                mgr, header, job.tree, job.leaves, reports, job.per, job.metrics, job.epoch
            )
        except Exception as exc:
            outcome = {"error": f"rank 0 could not commit: {type(exc).__name__}: {exc}"}
    final = coord.exchange_json(outcome)[0]
    if final["error"]:
        coord.vote(final["error"] if rank == 0 else None)  # raises the same error everywhere
    if manifest is not None:
        mgr.catalog.forget(header["name"])
        mgr._history.record(
            "save",
            name=header["name"],
            seq=header["seq"],
            step=header["step"],
            epoch=job.epoch,
            metrics=job.metrics,
            bytes=manifest.nbytes(),
            seconds=round(time.perf_counter() - job.started, 6),
            ranks=world,
        )
        mgr._apply_retention()
    return job.checkpoint()


__all__ = ["local_boxes", "owners", "save", "write_boxes"]
