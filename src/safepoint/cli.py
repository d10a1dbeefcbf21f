"""The ``safepoint`` command line: inspect, verify and clean checkpoint roots; run the demo.

Exit codes come from the error classes (``SafepointError.exit_code``): 0 success,
2 bad arguments or config, 3 not found, 4 incomplete, 5 corrupt, 6 incompatible,
7 state mismatch, 8 storage error. ``--json`` prints machine-readable output.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from . import pathkind, reader, report, runlog, singlefile
from .checkpoint import Checkpoint
from .errors import (
    CheckpointNotFoundError,
    ConfigError,
    CorruptCheckpointError,
    SafepointError,
    StorageError,
)
from .manager import CheckpointManager
from .retention import rank_best
from .storage import LocalStorage


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
        return mgr.catalog.manifest(ckpt.name).nbytes()
    except (FileNotFoundError, CheckpointNotFoundError):
        return None


def cmd_ls(args: argparse.Namespace) -> int:
    root = pathkind.need_root(args.root, "ls").path
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
    if args.json:
        items = [
            {
                **{k: getattr(c, k) for k in ("name", "seq", "step", "epoch", "created")},
                "metrics": c.metrics,
                "bytes": n,
                "best": c.name == best_name,
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
            str(c.epoch),
            _fmt_size(n),
            _dt.datetime.fromtimestamp(c.created).strftime("%Y-%m-%d %H:%M:%S"),
            _fmt_metrics(c.metrics) + ("  (best)" if c.name == best_name else ""),
        ]
        for c, n in sized
    ]
    header = ["name", "seq", "step", "epoch", "size", "created", "metrics"]
    for line in _table(header, rows, align="lrrrrll"):
        print(line)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    storage, name, _ = pathkind.need_checkpoint(args.checkpoint, "show")
    found = reader.read_manifest(storage, name)
    record = found.extra.get(singlefile.KEY)
    if isinstance(record, dict):
        # A single file lists no tensors in its manifest: read (and verify) its weights.
        arrays = report.weights(storage, name, found)
        tensors = {k: (str(v.dtype), list(v.shape), "numpy") for k, v in arrays.items()}
        kind = "Keras .keras zip" if record.get("container") == "zip" else "HDF5 file"
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
    print(
        f"  seq {found.seq}, step {found.step}, epoch {found.epoch}; {form} "
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


Result = tuple[str, Exception | None]


def cmd_verify(args: argparse.Namespace) -> int:
    found = pathkind.classify(args.path)
    gone = 0
    single = found.kind in ("checkpoint", "foreign", "pickle", "uncommitted")
    if single:
        # One checkpoint: a directory, or a single file (a Keras weights.best.hdf5)
        # checked against the manifest embedded in it.
        storage, name, _ = pathkind.need_checkpoint(found.path, "verify")
        error: Exception | None = None
        try:
            reader.verify(storage, name)
        except SafepointError as exc:
            error = exc
        results: list[Result] = [(name, error)]
        mgr = CheckpointManager(storage)
    else:
        root = pathkind.need_root(args.path, "verify").path
        mgr = CheckpointManager(root)
        results, gone = _verify_root(mgr, deep=args.deep)
        if not results:
            raise CheckpointNotFoundError(
                f"No checkpoints in {root} to verify. Expected a run root with at least one "
                f"checkpoint. Received: path={args.path!r}. Check the path (a backup that "
                "never ran looks like this)."
            )
    if args.deep and single:
        results = [(n, e if e is not None else _read_whole(mgr, n)) for n, e in results]
    bad = [(n, e) for n, e in results if e is not None]
    if args.json:
        print(
            json.dumps(
                [{"name": n, "ok": e is None, "error": str(e) if e else None} for n, e in results],
                indent=1,
            )
        )
    else:
        for n, e in results:
            print(f"{'ok     ' if e is None else 'FAILED '} {n}" + (f": {e}" if e else ""))
        note = f" ({gone} deleted by the writer's retention meanwhile)" if gone else ""
        print(f"{len(results) - len(bad)} of {len(results)} checkpoints verified.{note}")
    if bad:
        first = bad[0][1]
        return (
            first.exit_code
            if isinstance(first, SafepointError)
            else CorruptCheckpointError.exit_code
        )
    return 0


def _verify_root(mgr: CheckpointManager, *, deep: bool) -> tuple[list[Result], int]:
    """Verify every checkpoint of a root; return the results and how many were gone.

    A writer's retention may delete a checkpoint between listing and reading: it is
    gone, not an error (the catalog already skips those). When everything listed went
    (``Keep(last=1)``), list again rather than report an empty root.
    """
    gone = 0
    for _ in range(5):
        results: list[Result] = [(v.name, v.error) for v in mgr.verify()]
        if deep:
            read = [(n, e if e is not None else _read_whole(mgr, n)) for n, e in results]
            results = [(n, e) for n, e in read if e is not _GONE]
            gone += len(read) - len(results)
        if results or not mgr.catalog.entries():
            break
    return results, gone


#: ``_read_whole``'s answer for a checkpoint deleted while it was being read.
_GONE = CheckpointNotFoundError("deleted while verifying")


def _read_whole(mgr: CheckpointManager, name: str) -> Exception | None:
    """``verify --deep``: read every tensor and rebuild the whole state tree.

    Checksums prove the bytes are the ones written; this also proves they still make
    a checkpoint (manifest tree, tensor references, dtypes and shapes against the
    payload headers), exactly as a restore would rebuild it.
    """
    try:
        mgr.restore(checkpoint=name)
    except CheckpointNotFoundError as exc:
        return _GONE if not os.path.lexists(os.path.join(mgr.storage.root, name)) else exc
    except SafepointError as exc:
        return exc
    return None


def cmd_gc(args: argparse.Namespace) -> int:
    storage = LocalStorage(pathkind.need_root(args.root, "gc").path)
    storage.lock()
    try:
        removed = storage.cleanup_stale()
    finally:
        storage.unlock()
    for name in removed:
        print(f"removed {name}")
    print(f"{len(removed)} leftover staging/trash entries removed from {storage.root}.")
    return 0


def cmd_log(args: argparse.Namespace) -> int:
    from .logview import describe, need_log

    storage = LocalStorage(need_log(pathkind.need_root(args.root, "log").path))
    for item in runlog.read(storage):
        print(json.dumps(item, sort_keys=True) if args.json else describe(item))
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    sa, na, _ = pathkind.need_checkpoint(args.a, "diff")
    sb, nb, _ = pathkind.need_checkpoint(args.b, "diff")
    changes = report.diff(sa, na, sb, nb)
    if args.json:
        body = {
            "a": os.path.join(sa.root, na),
            "b": os.path.join(sb.root, nb),
            "identical": not changes,
            "changes": [c.to_json() for c in changes],
        }
        print(json.dumps(body, indent=1, default=str))
    else:
        for change in changes:
            print(change.line(na, nb))
        if not changes:
            print("identical: same tensors, state, metrics and step")
    return 1 if changes else 0


def cmd_convert(args: argparse.Namespace) -> int:
    from .conversion import convert

    storage, name, _ = pathkind.need_checkpoint(args.checkpoint, "convert")
    src = os.path.join(storage.root, name)
    # By default the copy goes to the current directory, not into the run's root, where
    # it would become one more (and the newest) checkpoint of the run.
    out = args.out or os.path.join(os.getcwd(), f"{name}-{args.to}")
    print(f"converted {src} -> {convert(src, out, to=args.to)} ({args.to})")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from .logview import need_log
    from .plot import plot

    root = need_log(pathkind.need_root(args.root, "plot").path)
    out = args.out or f"{os.path.basename(root)}-metrics.svg"
    points, series, renderer = plot(root, out, metrics=args.metric or None)
    print(f"wrote {out} ({points} points, {series} series; {renderer})")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from . import demo

    return demo.run(args)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="safepoint",
        description="Inspect, verify and clean safepoint checkpoint roots; run the demo.",
        epilog="Exit codes: 0 ok, 2 config, 3 not found, 4 incomplete, 5 corrupt, "
        "6 incompatible, 7 state mismatch, 8 storage error.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    s = sub.add_parser("ls", help="list the committed checkpoints of a root")
    s.add_argument("root")
    s.add_argument("--monitor", default=None, help="metric that defines the best checkpoint")
    s.add_argument("--mode", default="auto", choices=("auto", "min", "max"))
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(fn=cmd_ls)
    s = sub.add_parser("show", help="describe one checkpoint: metrics, files, tensors")
    s.add_argument("checkpoint", help="checkpoint directory or single file (.keras, .h5)")
    s.add_argument("--json", action="store_true", help="print the whole manifest")
    s.set_defaults(fn=cmd_show)
    s = sub.add_parser(
        "verify",
        help="check sizes and checksums of every checkpoint in a root, or of one checkpoint "
        "(exit 3 when there is none to check)",
    )
    s.add_argument("path")
    s.add_argument("--json", action="store_true")
    s.add_argument(
        "--deep",
        action="store_true",
        help="also read every tensor and rebuild each checkpoint's state, as a restore does",
    )
    s.set_defaults(fn=cmd_verify)
    s = sub.add_parser(
        "gc", help="remove staging and trash entries left by crashed writers (takes the lock)"
    )
    s.add_argument("root")
    s.set_defaults(fn=cmd_gc)
    s = sub.add_parser(
        "log", help="print the run log (saves, skips with epoch and reason, deletions)"
    )
    s.add_argument("root")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_log)
    s = sub.add_parser(
        "diff", help="compare two checkpoints: tensors, state, metrics (exit 1 when they differ)"
    )
    s.add_argument("a", help="checkpoint directory or single file (.keras, .h5, .weights.h5)")
    s.add_argument("b", help="the checkpoint to compare with A")
    s.add_argument("--json", action="store_true", help="machine-readable list of changes")
    s.set_defaults(fn=cmd_diff)
    s = sub.add_parser(
        "convert", help="rewrite a checkpoint (or a Keras file's weights) in a payload format"
    )
    s.add_argument("checkpoint", help="checkpoint directory or single file (.keras, .h5)")
    s.add_argument("--to", required=True, choices=("safetensors", "hdf5"))
    s.add_argument(
        "--out",
        default=None,
        help="new checkpoint directory (default: ./NAME-FORMAT in the current directory)",
    )
    s.set_defaults(fn=cmd_convert)
    s = sub.add_parser(
        "plot",
        help="draw the run's metrics (from its log), one series per name template, into an "
        "image (matplotlib when installed, else a built-in SVG)",
    )
    s.add_argument("root")
    s.add_argument("--metric", action="append", help="metric to draw (repeatable; default all)")
    s.add_argument(
        "--out",
        default=None,
        help="output file; .svg always works, .png/.pdf need matplotlib "
        "(default ./ROOTNAME-metrics.svg)",
    )
    s.set_defaults(fn=cmd_plot)
    s = sub.add_parser(
        "demo",
        help="train, crash with SIGKILL, resume and check exactness (needs torch and scikit-learn)",
    )
    from .demo import add_arguments

    add_arguments(s)
    s.set_defaults(fn=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.fn(args))
    except SafepointError as exc:
        print(f"safepoint {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:
        # `safepoint log ROOT | head`: the reader left; that is not an error to report.
        # Point stdout at /dev/null so the interpreter's final flush does not fail too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a pipe writer
    except OSError as exc:  # the file system refused (EACCES, EIO...): no traceback
        print(
            f"safepoint {args.command}: StorageError: {exc}. Check the path and its permissions.",
            file=sys.stderr,
        )
        return StorageError.exit_code


if __name__ == "__main__":
    sys.exit(main())
