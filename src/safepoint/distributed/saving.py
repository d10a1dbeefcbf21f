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

A rank that dies leaves the others raising within the timeout; its partial file sits in
a staging directory that the next writer's cleanup or ``safepoint gc`` removes.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import replace
from typing import Any

from torch.distributed.tensor import DTensor

from safepoint.checkpoint import Checkpoint
from safepoint.distributed.coordinator import Coordinator
from safepoint.distributed.perrank import PerRank, prefix, split
from safepoint.errors import ConfigError
from safepoint.manager.options import int_arg, metrics_arg
from safepoint.ondisk import checksum
from safepoint.ondisk.container import CONTAINER
from safepoint.ondisk.manifest import NAME as MANIFEST_NAME
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
    coord: Coordinator, mgr: Any, state: Any, *, step: Any, epoch: Any, metrics: Any
) -> Checkpoint:
    """The collective save (see the module docstring); call it on every rank."""
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
    staged = header["staged"]
    try:
        return _write_and_commit(
            coord,
            mgr,
            header,
            tree,
            leaves,
            boxes,
            own_tree[prefix(rank)],
            own_leaves,
            per,
            metrics,
            epoch,
            started,
        )
    except BaseException:
        if rank == 0:
            mgr.storage.discard(staged)
        raise


def _write_and_commit(
    coord: Coordinator,
    mgr: Any,
    header: dict[str, Any],
    tree: dict[str, Any],
    leaves: list[TensorLeaf],
    boxes: list[Box],
    own_tree: dict[str, Any],
    own_leaves: list[TensorLeaf],
    per: dict[str, PerRank],
    metrics: dict[str, Any],
    epoch: int | None,
    started: float,
) -> Checkpoint:
    rank, world = coord.rank, coord.world_size
    plans = coord.exchange_json(
        {
            "boxes": [[k, o, int(t.numel() * t.element_size())] for k, o, _, t in boxes],
            "shapes": {leaf.key: [list(leaf.shape), leaf.dtype.name] for leaf in leaves},
        }
    )
    report: dict[str, Any] = {"error": None}
    try:
        for r, plan in enumerate(plans):
            if plan["shapes"] != plans[0]["shapes"]:
                raise ConfigError(
                    f"Rank {r} holds a state of other tensors, shapes or dtypes than rank 0. "
                    "Expected the same state structure on every rank. Received: "
                    f"{sorted(set(plan['shapes']) ^ set(plans[0]['shapes']))[:5]} differ. "
                    "Build the state the same way on every rank."
                )
        owner = owners([p["boxes"] for p in plans], world)
        mine = [b for b in boxes if owner[(b[0], tuple(b[1]))] == rank and b[3].numel()]
        mine += [
            (leaf.key, [0] * len(leaf.shape), list(leaf.shape), leaf.source) for leaf in own_leaves
        ]
        fname = f"rank-{rank:05d}.bin"
        info, records = write_boxes(mgr.storage, f"{header['staged']}/{fname}", mine)
        report.update(
            file=[fname, info],
            chunks=records,
            tree=own_tree,
            entries={leaf.key: leaf.entry() for leaf in own_leaves},
        )
    except Exception as exc:
        report = {"error": f"{type(exc).__name__}: {exc}"}
    reports = coord.exchange_json(report)
    failed = [f"rank {r}: {p['error']}" for r, p in enumerate(reports) if p["error"]]
    outcome: dict[str, Any] = {"error": "; ".join(failed) or None}
    manifest: Manifest | None = None
    if rank == 0 and not failed:
        try:
            manifest = _commit(mgr, header, tree, leaves, reports, per, metrics, epoch)
        except Exception as exc:
            outcome = {"error": f"rank 0 could not commit: {type(exc).__name__}: {exc}"}
    final = coord.exchange_json(outcome)[0]
    if final["error"]:
        coord.vote(final["error"] if rank == 0 else None)  # raises the same error everywhere
    ckpt = Checkpoint(
        name=header["name"],
        path=os.path.join(mgr.storage.root, header["name"]),
        step=header["step"],
        epoch=epoch,
        metrics=dict(metrics),
        created=header["created"],
        seq=header["seq"],
    )
    if manifest is not None:
        mgr.catalog.forget(header["name"])
        mgr._history.record(
            "save",
            name=header["name"],
            seq=header["seq"],
            step=header["step"],
            epoch=epoch,
            metrics=metrics,
            bytes=manifest.nbytes(),
            seconds=round(time.perf_counter() - started, 6),
            ranks=world,
        )
        mgr._apply_retention()
    return ckpt


def _commit(
    mgr: Any,
    header: dict[str, Any],
    tree: dict[str, Any],
    leaves: list[TensorLeaf],
    reports: list[dict[str, Any]],
    per: dict[str, PerRank],
    metrics: dict[str, Any],
    epoch: int | None,
) -> Manifest:
    """Rank 0: the manifest from every rank's report, written last, then the commit."""
    chunks: dict[str, list[dict[str, Any]]] = {}
    files: dict[str, Any] = {}
    tensors: dict[str, Any] = {}
    for report in reports:
        files[report["file"][0]] = report["file"][1]
        for rec in report["chunks"]:
            key = rec.pop("key")
            chunks.setdefault(key, []).append(rec)
        tensors.update(report["entries"])
    for leaf in leaves:
        tensors[leaf.key] = leaf.entry()
    for key, entry in tensors.items():
        entry["chunks"] = chunks.get(key, [])
    full = dict(tree)
    for k in per:
        full[k] = [report["tree"][k] for report in reports]
    draft = Manifest(
        name=header["name"],
        seq=header["seq"],
        step=header["step"],
        epoch=epoch,
        created=header["created"],
        metrics=metrics,
        tree=full,
        tensors=tensors,
        files=files,
        extra={"series": mgr.series, CONTAINER: "directory", "ranks": len(reports)},
    )
    data = draft.to_bytes()
    from safepoint.ondisk import manifest as manifest_mod

    manifest_mod.parse(data, where=f"{header['name']}/{MANIFEST_NAME}")  # refuse a bad one now
    mgr.storage.write_file(f"{header['staged']}/{MANIFEST_NAME}", data, stage="manifest")
    mgr.storage.commit(header["staged"], header["name"])
    return replace(draft)


__all__ = ["local_boxes", "owners", "save", "write_boxes"]
