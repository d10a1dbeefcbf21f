"""What a background save takes from a training step: CPU time and training time lost.

On a machine with few cores, a background persist competes with the training step's
threads. This measures, for 1 GiB, each part of a persist alone (its wall and CPU time)
and the training time it costs when run in a thread beside a fixed-cost 2-thread
training loop (the loop's time with the job minus without it, same rep):

* ``hash``: xxh3-64 over the bytes (the checksum every payload file carries);
* ``copy into 2 MiB chunks``: the second copy sync saves make for ``O_DIRECT``;
* ``O_DIRECT pass-through``: 32 MiB direct writes straight from an aligned buffer;
* ``safepoint async save``: ``save()`` + ``wait()`` of a warm async manager, run in
  the thread (so its snapshot copy competes too, unlike in training, where the loop
  waits for it).

    python bench/persist_cpu.py [--reps 3] [--dir /tmp/safepoint-bench]
"""

from __future__ import annotations

import argparse
import mmap
import os
import resource
import shutil
import statistics
import sys
import threading
import time
from collections.abc import Callable

import numpy as np
import torch
import xxhash

import safepoint
from async_stall import Step, make_state  # this directory, on sys.path when run as a script


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--dir", default="/tmp/safepoint-bench")
    args = ap.parse_args()
    torch.set_num_threads(2)
    os.makedirs(args.dir, exist_ok=True)
    size = args.mib << 20
    state = make_state(args.mib, 50)
    step = Step(100.0)
    arena = np.frombuffer(mmap.mmap(-1, size), dtype=np.uint8)
    arena.fill(1)
    chunk = np.zeros(2 << 20, dtype=np.uint8)
    path = os.path.join(args.dir, "persist.bin")
    root = os.path.join(args.dir, "persist-run")
    shutil.rmtree(root, ignore_errors=True)
    mgr = safepoint.CheckpointManager(root, keep=safepoint.Keep(last=1), async_save=True)
    mgr.save({"model": state}, step=0)  # allocate the staging memory once
    mgr.wait()
    seq = [0]

    def hash_job() -> None:
        h, view = xxhash.xxh3_64(), arena.data
        for off in range(0, size, 2 << 20):
            h.update(view[off : off + (2 << 20)])

    def copy_job() -> None:
        for off in range(0, size, 2 << 20):
            np.copyto(chunk[: min(2 << 20, size - off)], arena[off : off + (2 << 20)])

    def direct_job() -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
        view = arena.data
        for off in range(0, size, 32 << 20):
            os.pwrite(fd, view[off : off + (32 << 20)], off)
        os.fsync(fd)
        os.close(fd)

    def save_job() -> None:
        seq[0] += 1
        mgr.save({"model": state}, step=seq[0])
        mgr.wait()

    jobs: dict[str, Callable[[], None]] = {
        "hash": hash_job,
        "copy into 2 MiB chunks": copy_job,
        "O_DIRECT pass-through (32 MiB writes)": direct_job,
        "safepoint async save (save + wait)": save_job,
    }

    def loop(job: Callable[[], None] | None) -> float:
        thread = threading.Thread(target=job) if job else None
        t = time.perf_counter()
        if thread:
            thread.start()
        for i in range(args.steps):
            step(state, i)
        took = time.perf_counter() - t
        if thread:
            thread.join()
        return took

    wall: dict[str, list[float]] = {k: [] for k in jobs}
    cpu: dict[str, list[float]] = {k: [] for k in jobs}
    lost: dict[str, list[float]] = {k: [] for k in jobs}
    for rep in range(args.reps):
        keys = list(jobs)
        keys = keys[rep % len(keys) :] + keys[: rep % len(keys)]
        for key in keys:
            c, t = cpu_seconds(), time.perf_counter()
            jobs[key]()
            wall[key].append(time.perf_counter() - t)
            cpu[key].append(cpu_seconds() - c)
            base = loop(None)
            lost[key].append(loop(jobs[key]) - base)
        print(f"  rep {rep + 1}/{args.reps}", file=sys.stderr, flush=True)
    mgr.close()
    shutil.rmtree(root, ignore_errors=True)
    os.unlink(path)
    print(
        f"# persist_cpu: {args.mib} MiB, {args.reps} reps, {os.cpu_count()} CPUs, "
        f"a {args.steps}-step 2-thread loop of ~100 ms steps beside each job\n"
    )
    print("| job | wall alone | CPU time alone | training time lost beside it |")
    print("| --- | --- | --- | --- |")
    for key in jobs:
        print(
            f"| {key} | {statistics.median(wall[key]) * 1e3:.0f} ms "
            f"| {statistics.median(cpu[key]) * 1e3:.0f} ms "
            f"| {statistics.median(lost[key]) * 1e3:.0f} ms |"
        )


if __name__ == "__main__":
    main()
