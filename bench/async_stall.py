"""How long checkpointing blocks a training loop: safepoint sync/async vs DCP vs torch.save.

A loop of fixed-cost steps (float32 matrix multiplies on 2 threads, plus an in-place
update of a slice of the state so that snapshots are really needed) checkpoints a
~1 GiB state every ``--every`` steps. Modes, alternating in rotating order each rep:

* ``none``: no checkpoint (the reference time);
* ``safepoint-sync``: ``CheckpointManager.save`` (fsync'd, committed on return);
* ``safepoint-async``: ``CheckpointManager(async_save=True).save`` (snapshot, return);
* ``dcp-async``: ``torch.distributed.checkpoint.async_save`` (thread mode, one process,
  no process group: ``no_dist=True``), waiting for the previous future first;
* ``torch-thread``: clone the state, ``torch.save`` + fsync it in a thread.

Reported per mode: the stall per checkpoint (time the loop spent inside the save call,
waiting for the previous save included; the first save of each rep is left out of the
median because it allocates the reused buffers), and two end-to-end overheads against
``none``:

* *steady state*: the median time from one checkpoint call's return to the next one's,
  from the second checkpoint on. This is the cost a long run pays per checkpoint
  interval: it leaves out the one-time allocation of the first save and the wait for
  the last save at the end, which a run of thousands of steps pays once;
* *whole loop*: the loop's total time, first allocation and final wait included (the
  last save is durable before the loop counts as done).

The machine's memcpy (copying the state into already-touched memory) is measured in
the same run, right before each checkpoint.

    python bench/async_stall.py                  # ~1 GiB, 5 reps
    python bench/async_stall.py --every 40       # saves twice as far apart
    python bench/async_stall.py --mib 128 --reps 1 --steps 20 --every 5   # quick
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import statistics
import sys
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

import safepoint


def make_state(mib: int, count: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    per = max(256, (mib << 20) // 4 // count)
    return {
        f"layer{i:03d}": torch.empty(per // 256, 256).uniform_(generator=gen) for i in range(count)
    }


class Step:
    """A fixed-cost training step: matmuls sized to ``ms`` milliseconds on 2 threads."""

    def __init__(self, ms: float) -> None:
        self.a = torch.randn(512, 512)
        self.b = torch.randn(512, 512)
        rounds = []
        for _ in range(7):  # the fastest of several rounds: calibrate on a quiet moment
            t = time.perf_counter()
            for _ in range(10):
                self.a @ self.b
            rounds.append((time.perf_counter() - t) / 10)
        self.reps = max(1, round(ms / 1e3 / min(rounds)))

    def __call__(self, state: dict[str, torch.Tensor], i: int) -> None:
        for _ in range(self.reps):
            self.a @ self.b
        layer = list(state.values())[i % len(state)]
        layer[:1].add_(1.0)  # training mutates the state between checkpoints


class Mode:
    name = ""

    def start(self, root: str) -> None: ...

    def save(self, state: dict[str, torch.Tensor], step: int) -> None: ...

    def finish(self) -> None: ...


class NoCheckpoint(Mode):
    name = "no checkpointing"


class SafepointSync(Mode):
    name = "safepoint sync"

    def start(self, root: str) -> None:
        self.mgr = safepoint.CheckpointManager(root, keep=safepoint.Keep(last=1))

    def save(self, state: dict[str, torch.Tensor], step: int) -> None:
        self.mgr.save({"model": state}, step=step)

    def finish(self) -> None:
        self.mgr.close()


class SafepointAsync(SafepointSync):
    name = "safepoint async"

    def start(self, root: str) -> None:
        self.mgr = safepoint.CheckpointManager(root, keep=safepoint.Keep(last=1), async_save=True)


class DCPAsync(Mode):
    name = "DCP async_save (thread)"

    def start(self, root: str) -> None:
        self.root = root
        self.future: Any = None

    def save(self, state: dict[str, torch.Tensor], step: int) -> None:
        import torch.distributed.checkpoint as dcp

        if self.future is not None:
            self.future.result()
        self.future = dcp.async_save(
            dict(state), checkpoint_id=os.path.join(self.root, f"step-{step}"), no_dist=True
        )

    def finish(self) -> None:
        if self.future is not None:
            self.future.result()


class TorchThread(Mode):
    name = "torch.save in a thread (clone first)"

    def start(self, root: str) -> None:
        self.root = root
        self.thread: threading.Thread | None = None

    def save(self, state: dict[str, torch.Tensor], step: int) -> None:
        if self.thread is not None:
            self.thread.join()
        copy = {k: v.clone() for k, v in state.items()}
        path = os.path.join(self.root, f"step-{step}.pt")

        def write() -> None:
            with open(path, "wb") as f:
                torch.save(copy, f)
                f.flush()
                os.fsync(f.fileno())

        self.thread = threading.Thread(target=write)
        self.thread.start()

    def finish(self) -> None:
        if self.thread is not None:
            self.thread.join()


MODES: dict[str, Callable[[], Mode]] = {
    "none": NoCheckpoint,
    "safepoint-sync": SafepointSync,
    "safepoint-async": SafepointAsync,
    "dcp-async": DCPAsync,
    "torch-thread": TorchThread,
}


def run(
    mode: Mode,
    state: dict[str, torch.Tensor],
    step: Step,
    args: argparse.Namespace,
    scratch: dict[str, torch.Tensor],
) -> tuple[float, list[float], list[float], list[float]]:
    root = os.path.join(args.dir, "run")
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    mode.start(root)
    stalls, copies, marks = [], [], []
    started = time.perf_counter()
    for i in range(1, args.steps + 1):
        step(state, i)
        if i % args.every:
            continue
        # The machine's memcpy at this very moment (every mode, "none" included, pays
        # it): the load of other users swings it several-fold between minutes.
        copies.append(copy_into(scratch, state))
        if not isinstance(mode, NoCheckpoint):
            t = time.perf_counter()
            mode.save(state, i)
            stalls.append(time.perf_counter() - t)
        marks.append(time.perf_counter())
    mode.finish()  # the last save is durable before the loop counts as done
    total = time.perf_counter() - started
    shutil.rmtree(root, ignore_errors=True)
    # Modes that write through the page cache (DCP, torch.save) leave dirty pages whose
    # writeback would otherwise run, and take CPU, during the next mode's loop.
    os.sync()
    # From the return of the 2nd checkpoint on: steady-state intervals.
    intervals = [b - a for a, b in itertools.pairwise(marks[1:])]
    return total, stalls, copies, intervals


def copy_into(dst: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> float:
    """Seconds to copy the state into already-touched memory (the machine's memcpy)."""
    t = time.perf_counter()
    for k, v in dst.items():
        v.copy_(state[k])
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--count", type=int, default=50)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--every", type=int, default=20)
    ap.add_argument("--step-ms", type=float, default=100.0)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--dir", default="/tmp/safepoint-bench")
    args = ap.parse_args()
    torch.set_num_threads(2)
    warnings.filterwarnings("ignore")  # DCP's notes about single-process use
    os.makedirs(args.dir, exist_ok=True)
    state = make_state(args.mib, args.count)
    size = sum(v.numel() * v.element_size() for v in state.values())
    step = Step(args.step_ms)
    keys = args.modes.split(",")
    totals: dict[str, list[float]] = {k: [] for k in keys}
    stalls: dict[str, list[float]] = {k: [] for k in keys}
    firsts: dict[str, list[float]] = {k: [] for k in keys}
    ratios: dict[str, list[float]] = {k: [] for k in keys}
    gaps: dict[str, list[float]] = {k: [] for k in keys}
    all_copies: list[float] = []
    scratch = {k: v.clone() for k, v in state.items()}
    for rep in range(args.reps):
        order = keys[rep % len(keys) :] + keys[: rep % len(keys)]
        for key in order:
            total, s, copies, intervals = run(MODES[key](), state, step, args, scratch)
            totals[key].append(total)
            gaps[key].extend(intervals)
            all_copies.extend(copies)
            if s:
                firsts[key].append(s[0])
                stalls[key].extend(s[1:])
                ratios[key].extend(x / c for x, c in zip(s[1:], copies[1:], strict=True))
            print(
                f"  rep {rep + 1} {key}: {total:.2f} s, stalls {[round(x, 3) for x in s]}, "
                f"intervals {[round(x, 3) for x in intervals]}",
                file=sys.stderr,
                flush=True,
            )
    copy_s = statistics.median(all_copies)
    base = statistics.median(totals["none"]) if "none" in totals else None
    base_gap = statistics.median(gaps["none"]) if gaps.get("none") else None
    sync = statistics.median(stalls["safepoint-sync"]) if stalls.get("safepoint-sync") else None
    print(
        f"# async_stall: {size / (1 << 20):.0f} MiB in {len(state)} tensors, "
        f"{args.steps} steps of ~{args.step_ms:.0f} ms, a checkpoint every {args.every} steps, "
        f"{args.reps} reps, {os.cpu_count()} CPUs, torch {torch.__version__}\n"
    )
    print(
        f"memcpy of the state into touched memory: {copy_s * 1e3:.0f} ms (median of the "
        f"copies taken right before each checkpoint; range {min(all_copies) * 1e3:.0f}-"
        f"{max(all_copies) * 1e3:.0f} ms)"
    )
    if base:
        print(f"measured step time without checkpoints: {base / args.steps * 1e3:.0f} ms\n")
    print(
        "| mode | stall per checkpoint (median) | first save | stall / memcpy just before "
        "| vs sync save | checkpoint interval (steady) | steady-state overhead "
        "| loop total | whole-loop overhead |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for key in keys:
        total = statistics.median(totals[key])
        over = f"{100 * (total - base) / base:+.1f}%" if base else "-"
        gap = statistics.median(gaps[key]) if gaps[key] else None
        steady = f"{gap:.3f} s" if gap else "-"
        steady_over = f"{100 * (gap - base_gap) / base_gap:+.1f}%" if gap and base_gap else "-"
        if stalls[key]:
            st = statistics.median(stalls[key])
            first = statistics.median(firsts[key])
            vs_sync = f"{100 * st / sync:.1f}%" if sync else "-"
            ratio = statistics.median(ratios[key])
            cols = f"{st * 1e3:.0f} ms | {first * 1e3:.0f} ms | {ratio:.2f}x | {vs_sync}"
        else:
            cols = "- | - | - | -"
        print(f"| {MODES[key].name} | {cols} | {steady} | {steady_over} | {total:.2f} s | {over} |")


if __name__ == "__main__":
    main()
