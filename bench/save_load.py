"""Save and restore throughput and save memory: safepoint vs torch vs safetensors vs raw.

Two states: ``large`` (~1 GiB in ~50 float32 tensors) and ``small`` (~256 MiB in ~2,000
tensors). Every method saves the same torch tensors and makes them durable (fsync);
methods alternate within each repetition (the order rotates), and the table reports
medians and ratios to the raw baseline measured in the same run:

* raw write: the tensors' bytes written to one file with ``writev`` + ``fsync``
  (buffered, the page cache); raw O_DIRECT: the same bytes copied through one reused
  aligned 8 MiB buffer and written with ``O_DIRECT`` (the practical limit here);
* raw read: one ``readinto`` of the raw file into a fresh buffer.

safepoint rows: the sync save; the same with ``O_DIRECT`` refused (the fallback); an
async save (``save()`` + ``wait()``, staging memory warm; the stall of ``save()`` alone
is printed under the table); and two restore variants of the sync save's checkpoint:
``load(mmap=True)`` followed by reading one tensor (lazy restore), and ``restore()``
into tensors that already exist (how a resume loads).

Reads are cold: each file is evicted from the page cache with
``posix_fadvise(DONTNEED)`` after its fsync and before it is read, so every method
reads from the device. Extra peak memory of a save is measured in a fresh subprocess
per method: peak RSS (``VmHWM``, reset through ``/proc/self/clear_refs``) minus RSS
before the save, for the first save of that process (reused buffers included).

    python bench/save_load.py                      # full run (5 reps)
    python bench/save_load.py --reps 1 --large-mib 64 --small-mib 16 --small-count 200
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

import safepoint

ALIGN = 4096


# -- states ------------------------------------------------------------------------------
def make_state(total_mib: int, count: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """``count`` float32 tensors totalling ~``total_mib`` MiB, filled in place (no temporaries)."""
    gen = torch.Generator().manual_seed(seed)
    per = max(1, (total_mib << 20) // 4 // count)
    cols = 256 if per >= 256 else 1
    rows = max(1, per // cols)
    return {
        f"layer{i:04d}.weight": torch.empty(rows, cols).uniform_(generator=gen)
        for i in range(count)
    }


def nbytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def views(state: dict[str, torch.Tensor]) -> list[memoryview]:
    return [memoryview(t.reshape(-1).view(torch.uint8).numpy()) for t in state.values()]


# -- helpers -----------------------------------------------------------------------------
def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def evict(path: str) -> None:
    """Drop ``path`` (a file or every file below a directory) from the page cache."""
    paths = [path]
    if os.path.isdir(path):
        paths = [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def rm(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.unlink(path)


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) << 10
    raise RuntimeError("no VmHWM")


def reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


# -- methods -----------------------------------------------------------------------------
class Raw:
    name = "raw write (buffered)"

    def save(self, state: dict[str, torch.Tensor], d: str) -> str:
        path = os.path.join(d, "raw.bin")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            pending = views(state)
            while pending:
                n = os.writev(fd, pending[:1024])
                while n and pending:
                    if n >= pending[0].nbytes:
                        n -= pending[0].nbytes
                        pending.pop(0)
                    else:
                        pending[0], n = pending[0][n:], 0
            os.fsync(fd)
        finally:
            os.close(fd)
        return path

    def load(self, path: str) -> Any:
        size = os.path.getsize(path)
        out = np.empty(size, dtype=np.uint8)
        with open(path, "rb", buffering=0) as f:
            view, done = memoryview(out), 0
            while done < size:
                done += f.readinto(view[done:])
        return out


class RawDirect:
    name = "raw write (O_DIRECT)"
    chunk = 8 << 20

    def __init__(self) -> None:
        self.buf = np.frombuffer(mmap.mmap(-1, self.chunk), dtype=np.uint8)
        self.buf.fill(0)

    def save(self, state: dict[str, torch.Tensor], d: str) -> str:
        path = os.path.join(d, "raw-direct.bin")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
        try:
            fill = 0
            for v in views(state):
                src = np.frombuffer(v, dtype=np.uint8)
                done = 0
                while done < src.nbytes:
                    n = min(src.nbytes - done, self.chunk - fill)
                    self.buf[fill : fill + n] = src[done : done + n]
                    fill, done = fill + n, done + n
                    if fill == self.chunk:
                        os.write(fd, memoryview(self.buf))
                        fill = 0
            if fill:
                size = os.lseek(fd, 0, os.SEEK_CUR) + fill
                padded = -(-fill // ALIGN) * ALIGN
                self.buf[fill:padded] = 0
                os.write(fd, memoryview(self.buf[:padded]))
                os.ftruncate(fd, size)
            os.fsync(fd)
        finally:
            os.close(fd)
        return path

    def load(self, path: str) -> Any:
        """Four threads of 16 MiB ``O_DIRECT`` reads into one fresh aligned buffer."""
        size = os.path.getsize(path)
        cap = -(-size // ALIGN) * ALIGN
        out = np.frombuffer(mmap.mmap(-1, cap), dtype=np.uint8)
        view, chunk = memoryview(out), 16 << 20
        starts = list(range(0, size, chunk))
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)

        def work() -> None:
            while starts:
                try:
                    begin = starts.pop()
                except IndexError:
                    return
                os.preadv(fd, [view[begin : min(begin + chunk, cap)]], begin)

        import threading

        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        os.close(fd)
        return out[:size]


class Safepoint:
    name = "safepoint"

    def __init__(self) -> None:
        self.root = ""

    def save(self, state: dict[str, torch.Tensor], d: str) -> str:
        root = os.path.join(d, "safepoint")
        with safepoint.CheckpointManager(root) as mgr:
            ckpt = mgr.save({"model": state}, step=1)
        return ckpt.path

    def load(self, path: str) -> Any:
        return safepoint.load(path, as_numpy=False)["model"]


class SafepointBuffered(Safepoint):
    """safepoint with O_DIRECT refused, as on a file system without it (the fallback)."""

    name = "safepoint, buffered fallback"

    def save(self, state: dict[str, torch.Tensor], d: str) -> str:
        from safepoint.storage import files as localfile

        enable = localfile._enable_direct
        localfile._enable_direct = lambda fd: False
        try:
            return super().save(state, d)
        finally:
            localfile._enable_direct = enable


class SafepointAsync(Safepoint):
    """``async_save=True`` with a manager kept across reps, so its staging memory is
    warm as in training: the save column is ``save()`` + ``wait()`` (durable), and the
    time ``save()`` took to return (the training stall) is kept apart."""

    name = "safepoint async (save + wait)"

    def __init__(self) -> None:
        super().__init__()
        self.mgr: safepoint.CheckpointManager | None = None
        self.stalls: list[float] = []
        self.step = 0

    def save(self, state: dict[str, torch.Tensor], d: str) -> str:
        if self.mgr is None:
            self.root = os.path.join(os.path.dirname(d), "safepoint-async-root")
            rm(self.root)
            self.mgr = safepoint.CheckpointManager(
                self.root, keep=safepoint.Keep(last=1), async_save=True
            )
            self.mgr.save({"model": state}, step=0)  # the first save allocates: not timed
            self.mgr.wait()
        self.step += 1
        t = time.perf_counter()
        ckpt = self.mgr.save({"model": state}, step=self.step)
        self.stalls.append(time.perf_counter() - t)
        self.mgr.wait()
        return ckpt.path

    def close(self) -> None:
        if self.mgr is not None:
            self.mgr.close()
            rm(self.root)


class SafepointLazy(Safepoint):
    """Restore column: ``load(path, mmap=True)`` and then one whole tensor read."""

    name = "safepoint, load(mmap=True) + 1 tensor"

    def load(self, path: str) -> Any:
        tree = safepoint.load(path, as_numpy=False, mmap=True)["model"]
        return next(iter(tree.values())).clone()


class SafepointInto(Safepoint):
    """Restore column: ``restore(state)`` into tensors that already exist (resuming)."""

    name = "safepoint, restore into existing tensors"

    def __init__(self) -> None:
        super().__init__()
        self.dst: dict[str, torch.Tensor] = {}
        self.like: dict[str, torch.Tensor] = {}

    def save(self, state: dict[str, torch.Tensor], d: str) -> str:
        self.like = state
        return super().save(state, d)

    def load(self, path: str) -> Any:
        if set(self.dst) != set(self.like):
            # The model's tensors exist before a resume; allocated on the first load
            # (one rep of five), so that the save's memory column stays the save's.
            self.dst = {k: torch.zeros_like(v) for k, v in self.like.items()}
        with safepoint.CheckpointManager(os.path.dirname(path)) as mgr:
            mgr.restore({"model": self.dst}, checkpoint=os.path.basename(path))
        return self.dst


class TorchSave:
    name = "torch.save"

    def save(self, state: dict[str, torch.Tensor], d: str) -> str:
        path = os.path.join(d, "torch.pt")
        with open(path, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        return path

    def load(self, path: str) -> Any:
        return torch.load(path, weights_only=True)


class SaveFile:
    name = "safetensors save_file"

    def save(self, state: dict[str, torch.Tensor], d: str) -> str:
        from safetensors.torch import save_file

        path = os.path.join(d, "st.safetensors")
        save_file(state, path)
        fsync_path(path)
        return path

    def load(self, path: str) -> Any:
        from safetensors.torch import load_file

        return load_file(path)


METHODS: dict[str, Callable[[], Any]] = {
    "raw": Raw,
    "raw-direct": RawDirect,
    "safepoint": Safepoint,
    "safepoint-buffered": SafepointBuffered,
    "safepoint-async": SafepointAsync,
    "safepoint-lazy": SafepointLazy,
    "safepoint-into": SafepointInto,
    "torch": TorchSave,
    "safetensors": SaveFile,
}


def memcpy_seconds(state: dict[str, torch.Tensor], reps: int) -> float:
    """Copy the state into memory that is already touched (the machine's memcpy)."""
    dst = {k: torch.empty_like(v) for k, v in state.items()}
    for k, v in dst.items():
        v.copy_(state[k])
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        for k, v in dst.items():
            v.copy_(state[k])
        times.append(time.perf_counter() - t)
    return statistics.median(times)


# -- the runs ----------------------------------------------------------------------------
def run_case(label: str, state: dict[str, torch.Tensor], reps: int, d: str) -> dict[str, Any]:
    methods = {k: f() for k, f in METHODS.items()}
    order = list(methods)
    saves: dict[str, list[float]] = {k: [] for k in order}
    loads: dict[str, list[float]] = {k: [] for k in order if methods[k].load}
    for rep in range(reps):
        rotated = order[rep % len(order) :] + order[: rep % len(order)]
        paths = {}
        for key in rotated:
            sub = os.path.join(d, key)
            rm(sub)
            os.makedirs(sub)
            t = time.perf_counter()
            paths[key] = methods[key].save(state, sub)
            saves[key].append(time.perf_counter() - t)
            evict(paths[key])
        for key in rotated:
            if key not in loads:
                continue
            evict(paths[key])
            t = time.perf_counter()
            out = methods[key].load(paths[key])
            loads[key].append(time.perf_counter() - t)
            del out
        for key in rotated:
            rm(os.path.join(d, key))
        print(f"  {label} rep {rep + 1}/{reps} done", file=sys.stderr, flush=True)
    stalls = getattr(methods.get("safepoint-async"), "stalls", [])
    for impl in methods.values():
        if hasattr(impl, "close"):
            impl.close()
    return {
        "stall": statistics.median(stalls) if stalls else None,
        "bytes": nbytes(state),
        "tensors": len(state),
        "memcpy": memcpy_seconds(state, max(3, reps)),
        "save": {k: statistics.median(v) for k, v in saves.items()},
        "load": {k: statistics.median(v) for k, v in loads.items()},
        "save_all": saves,
        "load_all": loads,
    }


def child_memory(method: str, mib: int, count: int, d: str) -> None:
    """In a fresh process: extra peak RSS of one save of ``method``; printed as JSON."""
    state = make_state(mib, count)
    impl = METHODS[method]()
    sub = os.path.join(d, f"mem-{method}")
    rm(sub)
    os.makedirs(sub)
    # Warm up with a one-tensor state so that lazily imported modules do not count,
    # while the buffers sized for the real state are still allocated in the save.
    impl.save({"x": torch.zeros(16)}, sub)
    rm(sub)
    os.makedirs(sub)
    before = rss()
    reset_hwm()
    impl.save(state, sub)
    peak = hwm()
    rm(sub)
    print(json.dumps({"method": method, "extra": peak - before, "state": nbytes(state)}))


def memory(mib: int, count: int, d: str) -> dict[str, int]:
    out = {}
    for method in METHODS:
        proc = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child-memory",
                method,
                "--dir",
                d,
                "--child-mib",
                str(mib),
                "--child-count",
                str(count),
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        out[method] = json.loads(proc.stdout.strip().splitlines()[-1])["extra"]
    return out


def table(label: str, res: dict[str, Any], mem: dict[str, int]) -> str:
    size = res["bytes"]
    gib = size / (1 << 30)
    raw_save, raw_load = res["save"]["raw"], res["load"]["raw"]
    lines = [
        f"### {label}: {size / (1 << 20):.0f} MiB in {res['tensors']} float32 tensors",
        "",
        f"memcpy of the state into touched memory: {res['memcpy'] * 1e3:.0f} ms "
        f"({gib / res['memcpy']:.1f} GiB/s)",
        "",
        "| method | save (fsync) | GiB/s | vs raw write | restore (cold) | vs raw read "
        "| extra peak RSS in save |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for key, impl in METHODS.items():
        s = res["save"][key]
        load = res["load"].get(key)
        load_s = f"{load * 1e3:.0f} ms" if load is not None else "-"
        load_r = f"{load / raw_load:.2f}x" if load is not None else "-"
        extra = mem.get(key)
        mem_s = (
            f"{extra / (1 << 20):.1f} MiB ({100 * extra / size:.1f}%)" if extra is not None else "-"
        )
        name = {
            "raw": "raw write (buffered) / raw read (readinto)",
            "raw-direct": "raw write / read (O_DIRECT)",
        }.get(key, impl.name)
        lines.append(
            f"| {name} | {s * 1e3:.0f} ms | {gib / s:.2f} | {s / raw_save:.2f}x | {load_s} "
            f"| {load_r} | {mem_s} |"
        )
    lines.append("")
    if res.get("stall") is not None:
        lines.append(
            f"safepoint async: `save()` returned after {res['stall'] * 1e3:.0f} ms (median; "
            f"{res['stall'] / res['memcpy']:.2f}x the memcpy), the rest was written in the "
            "background."
        )
        lines.append("")
    lines.append(
        "Raw samples (s): "
        + "; ".join(
            f"{k} save {[round(x, 3) for x in res['save_all'][k]]}" for k in res["save_all"]
        )
    )
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--large-mib", type=int, default=1024)
    ap.add_argument("--large-count", type=int, default=50)
    ap.add_argument("--small-mib", type=int, default=256)
    ap.add_argument("--small-count", type=int, default=2000)
    ap.add_argument("--dir", default="/tmp/safepoint-bench", help="on the disk to measure")
    ap.add_argument("--cases", default="large,small")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--methods", default=",".join(METHODS), help="a subset, raw first")
    ap.add_argument("--child-memory", help=argparse.SUPPRESS)
    ap.add_argument("--child-mib", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--child-count", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(2)
    if args.child_memory:
        child_memory(args.child_memory, args.child_mib, args.child_count, args.dir)
        return
    os.makedirs(args.dir, exist_ok=True)
    for key in [k for k in METHODS if k not in args.methods.split(",")]:
        del METHODS[key]
    cases = {
        "large": (args.large_mib, args.large_count),
        "small": (args.small_mib, args.small_count),
    }
    print(
        f"# save_load: {os.cpu_count()} CPUs, dir {args.dir}, reps {args.reps}, "
        f"torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n"
    )
    for label in args.cases.split(","):
        mib, count = cases[label]
        state = make_state(mib, count)
        res = run_case(label, state, args.reps, args.dir)
        del state
        mem = {} if args.no_memory else memory(mib, count, args.dir)
        print(table(label, res, mem), flush=True)


if __name__ == "__main__":
    main()
