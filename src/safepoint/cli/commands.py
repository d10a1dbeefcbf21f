"""The ``safepoint`` command line: inspect, verify and clean checkpoint roots; run the demo.

Exit codes come from the error classes (``SafepointError.exit_code``): 0 success,
2 bad arguments or config, 3 not found, 4 incomplete, 5 corrupt, 6 incompatible,
7 state mismatch, 8 storage error. ``--json`` prints machine-readable output.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence

from safepoint.catalog import reader
from safepoint.cli import pathkind, report
from safepoint.cli.listing import cmd_ls, cmd_show
from safepoint.cli.remote import storage_at
from safepoint.errors import (
    CheckpointNotFoundError,
    ConfigError,
    CorruptCheckpointError,
    SafepointError,
    StorageError,
)
from safepoint.manager import CheckpointManager
from safepoint.storage import runlog
from safepoint.storage.protocol import SharedBlobs
from safepoint.storage.urls import is_url

Result = tuple[str, Exception | None]


def cmd_verify(args: argparse.Namespace) -> int:
    found = pathkind.classify(args.path, listing=False)
    gone = 0
    single = found.kind in ("checkpoint", "foreign", "pickle", "uncommitted")
    if single:
        # One checkpoint: a directory, or a single file (a Keras weights.best.hdf5)
        # checked against the manifest embedded in it.
        # Someone else's .h5 or a pickle is a verification failure like a bad checksum:
        # one FAILED line (and JSON record) naming what the file is, exit 6.
        name = os.path.basename(found.path)
        storage = storage_at(found.parent)
        error: Exception | None = None
        try:
            storage, name, _ = pathkind.need_checkpoint(found.path, "verify")
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
        return _GONE if not _still_there(mgr, name) else exc
    except SafepointError as exc:
        return exc
    return None


def _still_there(mgr: CheckpointManager, name: str) -> bool:
    root = str(mgr.storage.root)
    if is_url(root):
        return mgr.storage.is_dir(name)
    return os.path.lexists(os.path.join(root, name))


def cmd_gc(args: argparse.Namespace) -> int:
    if args.grace is not None and not (math.isfinite(args.grace) and args.grace >= 0):
        raise ConfigError(
            "gc --grace must be a finite number of seconds, 0 or more. Expected e.g. 900. "
            f"Received: --grace {args.grace}. Pass the age below which leftovers are kept."
        )
    storage = storage_at(pathkind.need_root(args.root, "gc").path)
    abort = getattr(storage, "abort_stale_uploads", None)  # an S3 root
    if abort is not None and args.grace is not None:
        storage.stale_after = args.grace  # type: ignore[attr-defined]
    storage.lock()
    try:
        removed = storage.cleanup_stale()
        if abort is not None:
            removed += abort()
        # Under the writer lock no save is in flight: a blob no checkpoint references is
        # garbage (--grace keeps recently unreferenced ones anyway; docs/dedup.md).
        freed = (0, 0)
        if isinstance(storage, SharedBlobs):
            freed = storage.blob_store().collect(grace_s=args.grace or 0.0)
    finally:
        storage.unlock()
    for name in removed:
        print(f"removed {name}")
    print(f"{len(removed)} leftover staging/trash entries removed from {storage.root}.")
    if freed[0]:
        print(f"{freed[0]} unreferenced blobs removed ({freed[1]} bytes freed).")
    return 0


def cmd_log(args: argparse.Namespace) -> int:
    from safepoint.cli.logview import describe, need_log

    storage = storage_at(need_log(pathkind.need_root(args.root, "log").path))
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
    from safepoint.cli.conversion import convert_from

    if args.out is not None and is_url(args.out):
        raise ConfigError(
            "convert writes a new checkpoint on a local disk. Expected a local --out path. "
            f"Received: --out {args.out}. Convert to a local directory, then save it into "
            "a CheckpointManager on the bucket if it must live there."
        )
    storage, name, _ = pathkind.need_checkpoint(args.checkpoint, "convert")
    src = f"{str(storage.root).rstrip('/')}/{name}"
    # By default the copy goes to the current directory, not into the run's root, where
    # it would become one more (and the newest) checkpoint of the run.
    # A converted checkpoint is always written whole (its own files, no shared
    # blobs): --standalone alone exports a dedup checkpoint self-contained.
    to = args.to or "safetensors"
    if args.to is None and not args.standalone:
        raise ConfigError(
            "convert needs a target. Expected --to safetensors|hdf5 or --standalone. "
            "Received: neither. Pass --to FORMAT, or --standalone to export a dedup "
            "checkpoint self-contained."
        )
    out = args.out or os.path.join(os.getcwd(), f"{name}-{to}")
    print(f"converted {src} -> {convert_from(storage, name, out, to=to)} ({to})")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from safepoint.cli.logview import need_log
    from safepoint.cli.plot import plot

    root = need_log(pathkind.need_root(args.root, "plot").path)
    out = args.out or f"{os.path.basename(root)}-metrics.svg"
    points, series, renderer = plot(root, out, metrics=args.metric or None)
    print(f"wrote {out} ({points} points, {series} series; {renderer})")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from safepoint.cli import demo

    return demo.run(args)


_ROOT = (
    "run root: the directory a CheckpointManager (or safepoint.keras) saves into, or "
    "s3://BUCKET/PREFIX (endpoint and credentials from the AWS_* variables)"
)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="safepoint",
        description="Inspect, verify and clean safepoint checkpoint roots; run the demo.",
        epilog="Exit codes: 0 ok, 2 config, 3 not found, 4 incomplete, 5 corrupt, "
        "6 incompatible, 7 state mismatch, 8 storage error.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    s = sub.add_parser("ls", help="list the committed checkpoints of a root")
    s.add_argument("root", help=_ROOT)
    s.add_argument("--monitor", default=None, help="metric that defines the best checkpoint")
    s.add_argument(
        "--mode",
        default="auto",
        choices=("auto", "min", "max"),
        help="min: lower is better; max: higher; auto: from the metric's name",
    )
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(fn=cmd_ls)
    s = sub.add_parser("show", help="describe one checkpoint: metrics, files, tensors")
    s.add_argument(
        "checkpoint",
        help="checkpoint directory or single file (.keras, .h5), or s3://BUCKET/PREFIX/NAME",
    )
    s.add_argument(
        "--json", action="store_true", help="print the whole manifest (and a single file's weights)"
    )
    s.set_defaults(fn=cmd_show)
    s = sub.add_parser(
        "verify",
        help="check sizes and checksums of every checkpoint in a root, or of one checkpoint "
        "(exit 3 when there is none to check)",
    )
    s.add_argument(
        "path", help="a run root, or one checkpoint (directory or single file); local or s3://"
    )
    s.add_argument("--json", action="store_true", help="one record per checkpoint")
    s.add_argument(
        "--deep",
        action="store_true",
        help="also read every tensor and rebuild each checkpoint's state, as a restore does",
    )
    s.set_defaults(fn=cmd_verify)
    s = sub.add_parser(
        "gc",
        help="remove staging and trash entries left by crashed writers (refused while "
        "a writer holds the root)",
    )
    s.add_argument("root", help=_ROOT)
    s.add_argument(
        "--grace",
        type=float,
        default=None,
        help="keep unreferenced dedup blobs unlinked less than this many seconds ago "
        "(default 0); on an s3:// root, keep unreferenced payload and multipart uploads "
        "younger than this (default 900: a stalled writer's upload may still be live)",
    )
    s.set_defaults(fn=cmd_gc)
    s = sub.add_parser(
        "log", help="print the run log (saves, skips with epoch and reason, deletions)"
    )
    s.add_argument("root", help=_ROOT)
    s.add_argument("--json", action="store_true", help="the records as JSON lines")
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
    s.add_argument(
        "checkpoint",
        help="checkpoint directory or single file (.keras, .h5), local or s3://BUCKET/PREFIX/NAME",
    )
    s.add_argument(
        "--to", default=None, choices=("safetensors", "hdf5"), help="payload format to write"
    )
    s.add_argument(
        "--standalone",
        action="store_true",
        help="export with its own copy of every blob (default format: safetensors)",
    )
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
    s.add_argument("root", help=_ROOT)
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
    from safepoint.cli.demo import add_arguments

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

__all__ = [
    "Result",
    "cmd_convert",
    "cmd_demo",
    "cmd_diff",
    "cmd_gc",
    "cmd_log",
    "cmd_plot",
    "cmd_verify",
    "main",
    "parser",
]
