"""Which way of writing and reading 1 GiB is fastest on this machine (the design's evidence).

Writes (each followed by fsync): buffered ``write`` from the source; buffered with
``posix_fadvise(DONTNEED)`` after the fsync; ``O_DIRECT`` through reused aligned
chunks of 2/8/32 MiB with 1 writer thread, and with 2 and 4 writer threads at
different offsets (the "parallel shard writes" question); ``O_DIRECT`` straight from a
page-aligned buffer without a copy ("pass-through", what async saves do with their
staged file images) in 2 and 32 MiB writes, with 1 and 2 writers. Reads (cold, evicted with
``posix_fadvise(DONTNEED)``): ``readinto`` a fresh buffer; ``O_DIRECT`` with 1 and 4
threads; a private ``mmap`` faulted in by 4 threads with ``MADV_POPULATE_READ``. Modes
alternate in rotating order; medians of ``--reps``.

    python bench/write_modes.py [--mib 1024] [--reps 5] [--dir /tmp/safepoint-bench]
"""

from __future__ import annotations

import argparse
import mmap
import os
import queue
import statistics
import sys
import threading
import time
from collections.abc import Callable

import numpy as np

ALIGN = 4096


def buffered(src: np.ndarray, path: str, dontneed: bool = False) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    view, done = memoryview(src), 0
    while done < src.nbytes:
        done += os.write(fd, view[done:])
    os.fsync(fd)
    if dontneed:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)


def direct(src: np.ndarray, path: str, chunk: int, writers: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    free: queue.Queue[np.ndarray] = queue.Queue()
    for _ in range(writers + 1):
        free.put(np.frombuffer(mmap.mmap(-1, chunk), dtype=np.uint8))
    work: queue.Queue[tuple[np.ndarray, int] | None] = queue.Queue()

    def io() -> None:
        while (item := work.get()) is not None:
            buf, offset = item
            os.pwrite(fd, memoryview(buf), offset)
            free.put(buf.base if buf.base is not None else buf)

    threads = [threading.Thread(target=io, daemon=True) for _ in range(writers)]
    for t in threads:
        t.start()
    try:
        for offset in range(0, src.nbytes, chunk):
            part = src[offset : offset + chunk]  # sizes are whole MiB: always aligned
            buf = free.get()
            np.copyto(buf[: part.nbytes], part)
            work.put((buf[: part.nbytes], offset))
    finally:
        for _ in threads:
            work.put(None)
        for t in threads:
            t.join()
    os.fsync(fd)
    os.close(fd)


def passthrough(src: np.ndarray, path: str, piece: int, writers: int) -> None:
    """``O_DIRECT`` writes of slices of an already aligned buffer: no copy at all."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    view = memoryview(src)
    starts = list(range(0, src.nbytes, piece))

    def io(mine: list[int]) -> None:
        for offset in mine:
            os.pwrite(fd, view[offset : offset + piece], offset)

    threads = [
        threading.Thread(target=io, args=(starts[i::writers],), daemon=True) for i in range(writers)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    os.fsync(fd)
    os.close(fd)


def evict(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)


def read_into(path: str) -> None:
    size = os.path.getsize(path)
    out = np.empty(size, dtype=np.uint8)
    with open(path, "rb", buffering=0) as f:
        view, done = memoryview(out), 0
        while done < size:
            done += f.readinto(view[done:])


def read_direct(path: str, threads: int, chunk: int = 16 << 20) -> None:
    size = os.path.getsize(path)
    out = mmap.mmap(-1, size)
    view = memoryview(out)
    starts = list(range(0, size, chunk))
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)

    def work() -> None:
        while True:
            try:
                begin = starts.pop()
            except IndexError:
                return
            os.preadv(fd, [view[begin : begin + chunk]], begin)

    pool = [threading.Thread(target=work) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    os.close(fd)
    view.release()


def read_mapped(path: str, threads: int = 4, chunk: int = 16 << 20) -> None:
    size = os.path.getsize(path)
    fd = os.open(path, os.O_RDONLY)
    mapping = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
    os.close(fd)
    starts = list(range(0, size, chunk))

    def work() -> None:
        while True:
            try:
                begin = starts.pop()
            except IndexError:
                return
            mapping.madvise(22, begin, min(chunk, size - begin))  # MADV_POPULATE_READ

    pool = [threading.Thread(target=work) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    mapping.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dir", default="/tmp/safepoint-bench")
    args = ap.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    path = os.path.join(args.dir, "modes.bin")
    src = np.random.default_rng(0).integers(0, 255, size=args.mib << 20, dtype=np.uint8)
    image = np.frombuffer(mmap.mmap(-1, src.nbytes), dtype=np.uint8)  # page-aligned copy
    image[:] = src
    writes: dict[str, Callable[[], None]] = {
        "buffered write": lambda: buffered(src, path),
        "buffered + fadvise(DONTNEED)": lambda: buffered(src, path, True),
        "O_DIRECT 2 MiB x1": lambda: direct(src, path, 2 << 20, 1),
        "O_DIRECT 8 MiB x1": lambda: direct(src, path, 8 << 20, 1),
        "O_DIRECT 32 MiB x1": lambda: direct(src, path, 32 << 20, 1),
        "O_DIRECT 8 MiB x2 writers": lambda: direct(src, path, 8 << 20, 2),
        "O_DIRECT 8 MiB x4 writers": lambda: direct(src, path, 8 << 20, 4),
        "pass-through O_DIRECT 2 MiB x1": lambda: passthrough(image, path, 2 << 20, 1),
        "pass-through O_DIRECT 32 MiB x1": lambda: passthrough(image, path, 32 << 20, 1),
        "pass-through O_DIRECT 32 MiB x2 writers": lambda: passthrough(image, path, 32 << 20, 2),
    }
    reads: dict[str, Callable[[], None]] = {
        "readinto (buffered)": lambda: read_into(path),
        "O_DIRECT 16 MiB x1": lambda: read_direct(path, 1),
        "O_DIRECT 16 MiB x4": lambda: read_direct(path, 4),
        "mmap + MADV_POPULATE_READ x4": lambda: read_mapped(path),
    }
    times: dict[str, list[float]] = {k: [] for k in [*writes, *reads]}
    cpus: dict[str, list[float]] = {k: [] for k in [*writes, *reads]}
    direct(src, path, 8 << 20, 1)
    for rep in range(args.reps):
        for group in (writes, reads):
            keys = list(group)
            keys = keys[rep % len(keys) :] + keys[: rep % len(keys)]
            for key in keys:
                if group is reads:
                    evict(path)
                c, t = time.process_time(), time.perf_counter()
                group[key]()
                times[key].append(time.perf_counter() - t)
                cpus[key].append(time.process_time() - c)
        print(f"  rep {rep + 1}/{args.reps}", file=sys.stderr, flush=True)
    os.unlink(path)
    gib = args.mib / 1024
    print(f"# write_modes: {args.mib} MiB, {args.reps} reps, {os.cpu_count()} CPUs\n")
    for title, group in (("write + fsync", writes), ("cold read", reads)):
        first = statistics.median(times[next(iter(group))])
        print(f"| {title} | median | GiB/s | vs first row | CPU time (median) | samples (s) |")
        print("| --- | --- | --- | --- | --- | --- |")
        for key in group:
            med = statistics.median(times[key])
            cpu = statistics.median(cpus[key])
            samples = ", ".join(f"{x:.2f}" for x in times[key])
            print(
                f"| {key} | {med * 1e3:.0f} ms | {gib / med:.2f} | {med / first:.2f}x "
                f"| {cpu * 1e3:.0f} ms | {samples} |"
            )
        print()


if __name__ == "__main__":
    main()
