"""``safepoint ls`` and ``safepoint show``: what a root and one checkpoint hold.

Columns are as wide as their content (long names, wide step numbers). A checkpoint
that a live writer's retention deletes between listing and reading is gone, not an
error: it is left out. A single-file checkpoint (Keras) lists the weights it holds
and names its container.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
from typing import Any

from safepoint.catalog import reader, singlefile
from safepoint.checkpoint import Checkpoint
from safepoint.cli import pathkind, report
from safepoint.errors import CheckpointNotFoundError, ConfigError
from safepoint.manager import CheckpointManager
from safepoint.monitor import resolve_mode
from safepoint.ondisk import embedded
from safepoint.retention import rank_best

__all__ = ["cmd_ls", "cmd_show"]


def _fmt_metrics(metrics: dict[str, Any]) -> str:
    parts = []
    for k, v in sorted(metrics.items()):
        parts.append(f"{k}={v:.5g}" if isinstance(v, float) else f"{k}={v}")
    return " ".join(parts)


def _fmt_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _table(header: list[str], rows: list[list[str]], *, align: str) -> list[str]:
    """Lines of a table whose columns are as wide as their content.

    ``align`` has one letter per column, ``l`` or ``r``; the last column (free text
    such as metrics) is never padded.
    """
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    out = []
    for row in [header, *rows]:
        cells = [
            cell if i == len(row) - 1 else cell.ljust(w) if align[i] == "l" else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ]
        out.append("  ".join(cells).rstrip())
    return out


def _size(mgr: CheckpointManager, ckpt: Checkpoint) -> int | None:
    """Bytes of a checkpoint; None when it was deleted (by retention) since listing."""
    try:
        if os.path.isfile(ckpt.path):  # a single file is its own payload
            return os.path.getsize(ckpt.path)
        found = mgr.catalog.manifest(ckpt.name)
        if not found.files and embedded.KEY in found.extra:  # a file on a bucket
            return mgr.storage.size(f"{ckpt.name}/{ckpt.name}")
        return found.nbytes()
    except (FileNotFoundError, CheckpointNotFoundError):
        return None


def _sharing(mgr: CheckpointManager, names: list[str]) -> dict[str, tuple[int, int]]:
    """``name -> (own, shared)`` bytes of dedup checkpoints: a blob that another listed
    checkpoint also references is shared (deleting this one would not free it)."""
    per: dict[str, dict[str, int]] = {}
    for name in names:
        try:
            found = mgr.catalog.manifest(name)
        except (FileNotFoundError, CheckpointNotFoundError):
            continue
        if found.extra.get("dedup"):
            keys: dict[str, int] = {}
            for fname, info in found.files.items():
                keys[str(info.get("blob", f"own:{name}/{fname}"))] = int(info["size"])
            per[name] = keys
    users: dict[str, int] = {}
    for keys in per.values():
        for key in keys:
            users[key] = users.get(key, 0) + 1
    out = {}
    for name, keys in per.items():
        own = sum(size for key, size in keys.items() if users[key] == 1)
        out[name] = (own, sum(keys.values()) - own)
    return out


def cmd_ls(args: argparse.Namespace) -> int:
    root = pathkind.need_root(args.root, "ls").path
    try:
        resolve_mode(args.monitor, args.mode)
    except ConfigError:  # its message names the Python argument: say the CLI flag
        raise ConfigError(
            f"Cannot tell whether --monitor {args.monitor} should be minimised or maximised. "
            "Expected a loss-like or accuracy-like name with --mode auto. Received: "
            f"--monitor {args.monitor} --mode {args.mode}. Pass --mode min or --mode max."
        ) from None
    mgr = CheckpointManager(root, monitor=args.monitor, mode=args.mode)
    listed = mgr.checkpoints()
    best = rank_best(listed, monitor=mgr.monitor, mode=mgr.mode) if args.monitor else []
    best_name = best[0].name if best else None
    known = sorted({k for c in listed for k in c.metrics})
    if args.monitor and listed and args.monitor not in known:
        raise ConfigError(
            f"No checkpoint in {root} has the metric {args.monitor!r}, so none can be "
            f"marked best. Expected one of {known}. Received: --monitor {args.monitor}. "
            "Pick one of those names."
        )
    # A writer's retention may delete a checkpoint after it was listed: it is gone,
    # not an error, and is left out.
    sized = [(c, n) for c in listed if (n := _size(mgr, c)) is not None]
    sharing = _sharing(mgr, [c.name for c in listed])
    if args.json:
        items = [
            {
                **{k: getattr(c, k) for k in ("name", "seq", "step", "epoch", "created")},
                "metrics": c.metrics,
                "bytes": n,
                "best": c.name == best_name,
                **(
                    {"own_bytes": sharing[c.name][0], "shared_bytes": sharing[c.name][1]}
                    if c.name in sharing
                    else {}
                ),
            }
            for c, n in sized
        ]
        print(json.dumps(items, default=str, indent=1))
        return 0
    if not sized:
        print(f"No committed checkpoints in {root}.")
        return 0
    rows = [
        [
            c.name,
            str(c.seq),
            str(c.step),
            "-" if c.epoch is None else str(c.epoch),
            _fmt_size(n),
            *(
                [_fmt_size(sharing[c.name][0]), _fmt_size(sharing[c.name][1])]
                if c.name in sharing
                else (["-", "-"] if sharing else [])
            ),
            _dt.datetime.fromtimestamp(c.created).strftime("%Y-%m-%d %H:%M:%S"),
            _fmt_metrics(c.metrics) + ("  (best)" if c.name == best_name else ""),
        ]
        for c, n in sized
    ]
    header = ["name", "seq", "step", "epoch", "size", "created", "metrics"]
    if sharing:  # a dedup root: what deleting each one would free, and what it shares
        header[5:5] = ["own", "shared"]
    for line in _table(header, rows, align="lrrrrrrll" if sharing else "lrrrrll"):
        print(line)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    storage, name, _ = pathkind.need_checkpoint(args.checkpoint, "show")
    if singlefile.is_single_file(storage, name):
        # A single file lists no tensors in its manifest: read (and verify) its weights,
        # with the manifest, through one descriptor (a writer may replace the file).
        found, tree = report.read_weights(storage, name)
        arrays = report.flatten_arrays(tree)
    else:
        found, arrays = reader.read_manifest(storage, name), {}
    record = found.extra.get(singlefile.KEY)
    if isinstance(record, dict):
        tensors = {k: (str(v.dtype), list(v.shape), "numpy") for k, v in arrays.items()}
        kind = (
            "state tree zip"
            if record.get("layout") == "tree-zip"
            else "Keras .keras zip"
            if record.get("container") == "zip"
            else "HDF5 file"
        )
        form = f"{kind}, layout {record.get('layout')}"
    else:
        tensors = {k: (e["dtype"], e["shape"], e["lib"]) for k, e in found.tensors.items()}
        form = f"directory, format {found.payload}"
    if args.json:
        body = found.to_json()
        if isinstance(record, dict):
            body["weights"] = {k: {"dtype": d, "shape": s} for k, (d, s, _) in tensors.items()}
        print(json.dumps(body, indent=1, sort_keys=True))
        return 0
    print(f"checkpoint {os.path.join(storage.root, name)}")
    epoch = "-" if found.epoch is None else found.epoch
    print(
        f"  seq {found.seq}, step {found.step}, epoch {epoch}; {form} "
        f"(v{found.format_version}, safepoint {found.library_version})"
    )
    created = _dt.datetime.fromtimestamp(found.created).isoformat(timespec="seconds")
    print(f"  created {created}; metrics: {_fmt_metrics(found.metrics) or '-'}")
    for fname, info in sorted(found.files.items()):
        print(f"  file {fname}: {_fmt_size(int(info['size']))}, xxh3_64 {info['xxh3_64']}")
    print(f"  {len(tensors)} tensors:")
    width = max((len(k) for k in tensors), default=0)
    for key, (dtype, shape, lib) in tensors.items():
        print(f"    {key:<{width}}  {dtype:<10} {shape} ({lib})")
    return 0
