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

from . import reader, runlog, singlefile
from .errors import CorruptCheckpointError, SafepointError
from .manager import CheckpointManager
from .storage import LocalStorage, check_name


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


def _split_ckpt(path: str) -> tuple[LocalStorage, str]:
    full = os.path.abspath(path).rstrip(os.sep)
    parent, name = os.path.split(full)
    return LocalStorage(parent), check_name(name, what="checkpoint directory name")


def cmd_ls(args: argparse.Namespace) -> int:
    mgr = CheckpointManager(args.root, monitor=args.monitor, mode=args.mode)
    ckpts = mgr.checkpoints()
    best = mgr.best() if args.monitor else None
    # A Keras single-file checkpoint is its own payload; a directory's payload is the
    # sum of the files its manifest lists.
    sizes = {
        c.name: os.path.getsize(c.path)
        if os.path.isfile(c.path)
        else mgr.catalog.manifest(c.name).nbytes()
        for c in ckpts
    }
    if args.json:
        print(
            json.dumps(
                [
                    {
                        **{k: getattr(c, k) for k in ("name", "seq", "step", "epoch", "created")},
                        "metrics": c.metrics,
                        "bytes": sizes[c.name],
                        "best": best is not None and c.name == best.name,
                    }
                    for c in ckpts
                ],
                default=str,
                indent=1,
            )
        )
        return 0
    if not ckpts:
        print(f"No committed checkpoints in {mgr.storage.root}.")
        return 0
    print(
        f"{'name':<28} {'seq':>5} {'step':>9} {'epoch':>6} {'size':>10}  created              "
        "metrics"
    )
    for c in ckpts:
        when = _dt.datetime.fromtimestamp(c.created).strftime("%Y-%m-%d %H:%M:%S")
        mark = "  (best)" if best is not None and c.name == best.name else ""
        print(
            f"{c.name:<28} {c.seq:>5} {c.step!s:>9} {c.epoch!s:>6} "
            f"{_fmt_size(sizes[c.name]):>10}  {when}  {_fmt_metrics(c.metrics)}{mark}"
        )
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    storage, name = _split_ckpt(args.checkpoint)
    found = reader.read_manifest(storage, name)
    if args.json:
        print(json.dumps(found.to_json(), indent=1, sort_keys=True))
        return 0
    print(f"checkpoint {os.path.join(storage.root, name)}")
    print(
        f"  seq {found.seq}, step {found.step}, epoch {found.epoch}, format "
        f"{found.payload} (v{found.format_version}, safepoint {found.library_version})"
    )
    created = _dt.datetime.fromtimestamp(found.created).isoformat(timespec="seconds")
    print(f"  created {created}; metrics: {_fmt_metrics(found.metrics) or '-'}")
    for fname, info in sorted(found.files.items()):
        print(f"  file {fname}: {_fmt_size(int(info['size']))}, xxh3_64 {info['xxh3_64']}")
    print(f"  {len(found.tensors)} tensors:")
    for key, entry in found.tensors.items():
        print(f"    {key:<48} {entry['dtype']:<10} {entry['shape']} ({entry['lib']})")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    target = os.path.abspath(args.path)
    is_file = os.path.isfile(target)
    if is_file or os.path.isfile(os.path.join(target, "manifest.json")):
        # One checkpoint: a directory, or a single file (a Keras weights.best.hdf5)
        # checked against the manifest embedded in it.
        storage, name = _split_ckpt(target)
        error: Exception | None = None
        try:
            if is_file and singlefile.container(name) is None:
                raise reader.refuse_pickle(target)
            (singlefile.verify if is_file else reader.verify)(storage, name)
        except SafepointError as exc:
            error = exc
        results: list[tuple[str, Exception | None]] = [(name, error)]
        mgr = CheckpointManager(storage)
    else:
        mgr = CheckpointManager(target)
        results = [(v.name, v.error) for v in mgr.verify()]
    if args.deep:
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
        print(f"{len(results) - len(bad)} of {len(results)} checkpoints verified.")
    if bad:
        first = bad[0][1]
        return (
            first.exit_code
            if isinstance(first, SafepointError)
            else CorruptCheckpointError.exit_code
        )
    return 0


def _read_whole(mgr: CheckpointManager, name: str) -> Exception | None:
    """``verify --deep``: read every tensor and rebuild the whole state tree.

    Checksums prove the bytes are the ones written; this also proves they still make
    a checkpoint (manifest tree, tensor references, dtypes and shapes against the
    payload headers), exactly as a restore would rebuild it.
    """
    try:
        mgr.restore(checkpoint=name)
    except SafepointError as exc:
        return exc
    return None


def cmd_gc(args: argparse.Namespace) -> int:
    storage = LocalStorage(args.root)
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
    for item in runlog.read(LocalStorage(args.root)):
        print(
            json.dumps(item, sort_keys=True)
            if args.json
            else f"{item.get('event', '?'):<7} {item.get('name', '')} "
            f"{_fmt_metrics(item.get('metrics') or {})}".rstrip()
        )
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    from .report import diff

    lines = diff(args.a, args.b)
    for line in lines:
        print(line)
    if not lines:
        print("identical: same tensors, state, metrics and step")
    return 1 if lines else 0


def cmd_convert(args: argparse.Namespace) -> int:
    from .conversion import convert

    src = os.path.abspath(args.checkpoint).rstrip(os.sep)
    # By default the copy goes to the current directory, not into the run's root, where
    # it would become one more (and the newest) checkpoint of the run.
    out = args.out or os.path.join(os.getcwd(), f"{os.path.basename(src)}-{args.to}")
    print(f"converted {src} -> {convert(src, out, to=args.to)} ({args.to})")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from .report import plot

    name = os.path.basename(os.path.abspath(args.root).rstrip(os.sep))
    out = args.out or f"{name}-metrics.svg"
    points = plot(args.root, out, metrics=args.metric or None)
    print(f"wrote {out} ({points} points)")
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
    s.add_argument("checkpoint", help="path of a checkpoint directory")
    s.add_argument("--json", action="store_true", help="print the whole manifest")
    s.set_defaults(fn=cmd_show)
    s = sub.add_parser(
        "verify",
        help="check sizes and checksums of every checkpoint in a root "
        "(or of one checkpoint directory)",
    )
    s.add_argument("path")
    s.add_argument("--json", action="store_true")
    s.add_argument(
        "--deep",
        action="store_true",
        help="also read every tensor and rebuild each checkpoint's state, as a restore does",
    )
    s.set_defaults(fn=cmd_verify)
    s = sub.add_parser("gc", help="remove staging and trash directories left by crashed writers")
    s.add_argument("root")
    s.set_defaults(fn=cmd_gc)
    s = sub.add_parser("log", help="print the run log (saves, skips, deletions)")
    s.add_argument("root")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_log)
    s = sub.add_parser(
        "diff", help="compare two checkpoints: tensors, state, metrics (exit 1 when they differ)"
    )
    s.add_argument("a")
    s.add_argument("b")
    s.set_defaults(fn=cmd_diff)
    s = sub.add_parser("convert", help="rewrite a checkpoint in another payload format")
    s.add_argument("checkpoint", help="path of a checkpoint directory")
    s.add_argument("--to", required=True, choices=("safetensors", "hdf5"))
    s.add_argument(
        "--out",
        default=None,
        help="new checkpoint directory (default: ./NAME-FORMAT in the current directory)",
    )
    s.set_defaults(fn=cmd_convert)
    s = sub.add_parser("plot", help="draw the run's metrics (from its log) into an SVG file")
    s.add_argument("root")
    s.add_argument("--metric", action="append", help="metric to draw (repeatable; default all)")
    s.add_argument("--out", default=None, help="SVG path (default ./ROOTNAME-metrics.svg)")
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


if __name__ == "__main__":
    sys.exit(main())
