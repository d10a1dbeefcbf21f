"""Rank 0's half of a collective save: the one manifest from every rank's report, the commit.

Runs after the vote (every rank reported success): the manifest lists every rank's
files and chunk records and every rank's per-rank tree, is parsed back (a manifest the
reader would refuse is refused here, before the commit), written last into the staging
directory, and the directory is committed by the ordinary transaction (rename, fsync).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from safepoint.distributed.perrank import PerRank
from safepoint.ondisk import manifest as manifest_mod
from safepoint.ondisk.container import CONTAINER
from safepoint.ondisk.manifest import NAME as MANIFEST_NAME
from safepoint.ondisk.manifest import Manifest
from safepoint.state.tree import TensorLeaf


def commit(
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
    manifest_mod.parse(data, where=f"{header['name']}/{MANIFEST_NAME}")  # refuse a bad one now
    mgr.storage.write_file(f"{header['staged']}/{MANIFEST_NAME}", data, stage="manifest")
    mgr.storage.commit(header["staged"], header["name"])
    return replace(draft)


__all__ = ["commit"]
