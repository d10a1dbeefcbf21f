"""The reliability suite's harness: deterministic states, the oracle, forked savers, strace.

The oracle lives outside the fault. A save's content is a pure function of
``(seed, step)`` (:func:`make_state`), so the parent process only has to remember which
steps a child *returned* from and which one was in flight when the fault hit; after the
fault it checks what RELIABILITY.md calls "nothing lost":

(a) the newest committed checkpoint restores bit-exactly (its content digest equals
    :func:`make_state`'s for its step), and that step is the last returned save or the
    in-flight one (if its commit completed), never anything else;
(b) nothing partial is listed: every listed checkpoint verifies;
(c) the older checkpoints the retention policy must keep are listed and restore.

Children are ``fork()`` ed from the test process (single-threaded between saves), so a
trial costs milliseconds instead of a Python start-up; they report over a pipe (kill
tests) or through shared memory (strace tests, where any reporting syscall could be the
one that gets a fault injected).
"""

from __future__ import annotations

import contextlib
import functools
import json
import mmap
import os
import random
import re
import select
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

import safepoint
from safepoint.storage.local import TMP_MARK, TRASH_PREFIX

MiB = 1 << 20


# ------------------------------------------------------------------ states and digests
_BASE: dict[tuple[int, int], np.ndarray] = {}


def _base(seed: int, nbytes: int) -> np.ndarray:
    key = (seed, nbytes)
    if key not in _BASE:
        rng = np.random.default_rng(seed)
        _BASE[key] = rng.standard_normal(max(nbytes // 4, 16), dtype=np.float32)
    return _BASE[key]


def make_state(seed: int, step: int, nbytes: int = MiB) -> dict[str, Any]:
    """The training state of ``step``: model, optimizer, RNG, data position; ~nbytes."""
    base = _base(seed, nbytes)
    weights = base + np.float32(step)  # every element differs from every other step's
    split = max(len(weights) * 3 // 4, 1)
    return {
        "model": {
            "w": weights[:split],
            "b": np.arange(7, dtype=np.int64) * step,
        },
        "optimizer": {
            "exp_avg": weights[split:] * np.float32(0.5),
            "step": step,
            "lr": 1e-3 / (1 + step),
        },
        "rng": np.random.default_rng(seed * 100_003 + step).bit_generator.state,
        "data": {"epoch": step // 10, "position": step * 64, "order": (seed, step)},
        "step": step,
    }


def digest(tree: Any) -> str:
    """A content digest of a state tree (types, keys, dtypes, shapes, raw bytes)."""
    h = xxhash.xxh3_128()

    def walk(node: Any) -> None:
        if isinstance(node, np.ndarray | np.generic):
            arr = np.ascontiguousarray(node)
            h.update(f"A{arr.dtype.str}{arr.shape}".encode())
            h.update(arr.tobytes())
        elif isinstance(node, dict):
            h.update(f"D{len(node)}".encode())
            for k, v in node.items():
                h.update(f"K{type(k).__name__}:{k!r}".encode())
                walk(v)
        elif isinstance(node, list | tuple):
            h.update(f"{type(node).__name__}{len(node)}".encode())
            for v in node:
                walk(v)
        else:
            h.update(f"V{type(node).__name__}:{node!r}".encode())

    walk(tree)
    return h.hexdigest()


_DIGESTS: dict[tuple[int, int, int], str] = {}


def expected_digest(seed: int, step: int, nbytes: int) -> str:
    key = (seed, step, nbytes)
    if key not in _DIGESTS:
        _DIGESTS[key] = digest(make_state(seed, step, nbytes))
    return _DIGESTS[key]


def metrics_for(step: int) -> dict[str, float]:
    """A loss that goes down and up again, so 'best' is not simply the newest."""
    return {"loss": round(1.0 + ((step * 7919) % 13) / 10.0, 3)}


def leftovers(root: Path | str) -> list[str]:
    """Staging and trash entries in a root."""
    if not os.path.isdir(root):
        return []
    return sorted(n for n in os.listdir(root) if TMP_MARK in n or n.startswith(TRASH_PREFIX))


# ---------------------------------------------------------------------------- the oracle
@dataclass
class Oracle:
    """What the parent knows about a run, kept outside every fault."""

    seed: int
    nbytes: int
    keep_last: int | None = None
    returned: int | None = None  # the last step whose save() returned
    in_flight: int | None = None  # the step being saved when the fault hit
    checks: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)

    def note(self, what: str) -> None:
        self.outcomes[what] = self.outcomes.get(what, 0) + 1

    def check(self, root: Path | str) -> int | None:
        """Assert "nothing lost" for ``root``; return the step that restores as latest."""
        self.checks += 1
        mgr = safepoint.CheckpointManager(root)
        listed = mgr.checkpoints()
        names = [c.name for c in listed]
        for v in mgr.verify():  # (b): nothing partial is listed or even left in the listing
            assert v.ok, f"{v.name} is listed but does not verify: {v.error}"
        if self.returned is None and self.in_flight is None:
            assert listed == [], names
            return None
        allowed = {s for s in (self.returned, self.in_flight) if s is not None}
        if not listed:
            assert self.returned is None, f"nothing committed, yet step {self.returned} returned"
            self.note("nothing committed yet")
            return None
        latest = listed[-1]
        assert latest.step in allowed, (
            f"latest is step {latest.step}; the oracle allows {sorted(allowed)} "
            f"(returned={self.returned}, in flight={self.in_flight}); listed {names}"
        )
        if self.returned is not None:
            assert latest.step >= self.returned, (latest.step, self.returned)
        got = mgr.restore()
        assert got is not None and got.name == latest.name, (got, latest)
        assert digest(got.state) == expected_digest(self.seed, latest.step, self.nbytes), (
            f"step {latest.step} restored different bytes from the ones saved"
        )
        self.note("latest=in-flight" if latest.step != self.returned else "latest=returned")
        # The in-flight save committed: it is now what the next run resumes from.
        self.returned, self.in_flight = latest.step, None
        # (c): the checkpoints retention must keep are all there and restore.
        steps = [c.step for c in listed]
        assert steps == sorted(steps), f"seq order and step order differ: {names}"
        must = list(range(max(1, latest.step - (self.keep_last or latest.step) + 1), latest.step))
        for step in must:
            assert step in steps, f"step {step} should have been kept; listed {names}"
        for c in listed[-4:-1]:
            older = mgr.restore(checkpoint=c.name)
            assert digest(older.state) == expected_digest(self.seed, c.step, self.nbytes)
        return latest.step


# ------------------------------------------------------------------------ forked savers
def saver_loop(
    root: str, *, seed: int, nbytes: int, keep_last: int | None, report: int, steps: int
) -> None:
    """Body of a child that resumes from ``root`` and saves in a loop (never returns)."""
    try:
        keep = safepoint.Keep(last=keep_last) if keep_last else None
        mgr = safepoint.CheckpointManager(root, keep=keep, monitor="loss" if keep else None)
        ckpt = mgr.restore(missing_ok=True)
        if ckpt is not None and digest(ckpt.state) != expected_digest(seed, ckpt.step, nbytes):
            os.write(report, b"bad-resume\n")
            os._exit(3)
        first = 1 if ckpt is None else ckpt.step + 1
        os.write(report, b"ready\n")
        for step in range(first, first + steps):
            state = make_state(seed, step, nbytes)
            os.write(report, f"begin {step}\n".encode())
            mgr.save(state, step=step, metrics=metrics_for(step))
            os.write(report, f"done {step}\n".encode())
        os._exit(0)
    except BaseException:
        with contextlib.suppress(BaseException):
            os.write(report, ("error " + traceback.format_exc().replace("\n", " | ")).encode())
        os._exit(4)


def fork(fn: Callable[[], None]) -> int:
    """Run ``fn`` in a forked child that never returns into pytest; return its pid."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            fn()
        finally:
            os._exit(5)
    return pid


def read_until(fd: int, *, until: bytes | None = None, timeout: float = 30.0) -> bytes:
    """Read from ``fd`` until ``until`` has been seen (or EOF); return the raw bytes."""
    buf = b""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no {until!r} from the child: {buf!r}")
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        chunk = os.read(fd, 65536)
        buf += chunk
        if not chunk or (until is not None and until in buf):
            return buf


def kill_trial(
    root: str, oracle: Oracle, *, delay: float, steps: int = 1000
) -> tuple[int | None, str]:
    """Start a saver, SIGKILL it after ``delay`` s, update the oracle, check the root."""
    r, w = os.pipe()
    pid = fork(
        lambda: saver_loop(
            root,
            seed=oracle.seed,
            nbytes=oracle.nbytes,
            keep_last=oracle.keep_last,
            report=w,
            steps=steps,
        )
    )
    os.close(w)
    try:
        raw = read_until(r, until=b"ready\n")
        assert b"ready\n" in raw, raw
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        lines = (raw + read_until(r)).decode().splitlines()
    finally:
        os.close(r)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
    errors = [line for line in lines if line.startswith(("error", "bad-resume"))]
    assert not errors, errors
    killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    oracle.in_flight = None
    for line in lines:
        word, _, arg = line.partition(" ")
        if word == "begin":
            oracle.in_flight = int(arg)
        elif word == "done":
            oracle.returned, oracle.in_flight = int(arg), None
    where = "between saves" if oracle.in_flight is None else "during a save"
    oracle.note(f"killed {where}" if killed else "exited before the kill")
    return oracle.check(root), where


# -------------------------------------------------------------------------------- strace
STRACE = shutil.which("strace")
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0

#: The syscalls a save or a retention pass can make on the root (every spelling).
FS_SYSCALLS = (
    "openat",
    "open",
    "creat",
    "write",
    "writev",
    "pwrite64",
    "pwritev",
    "pwritev2",
    "fsync",
    "fdatasync",
    "sync_file_range",
    "rename",
    "renameat",
    "renameat2",
    "mkdir",
    "mkdirat",
    "unlink",
    "unlinkat",
    "rmdir",
    "ftruncate",
    "fallocate",
    "flock",
    "fcntl",
    "getdents64",
    "newfstatat",
    "statx",
    "lseek",
    "close",
)
#: Calls whose failure a save must survive cleanly, i.e. the ones faults are injected into
#: (fcntl/flock/close/stat errors are left out: EIO from them is not a disk fault).
INJECTABLE = tuple(
    s
    for s in FS_SYSCALLS
    if s not in ("fcntl", "flock", "close", "newfstatat", "statx", "lseek", "getdents64")
)


@functools.cache
def strace_skip_reason() -> str | None:
    if STRACE is None:
        return "strace is not installed (apt-get install strace; CI installs it)"
    if not IS_ROOT:
        return "strace fault injection into a forked child needs root (ptrace) here"
    if not _can_attach():
        return "strace cannot attach to a running process here (ptrace is restricted)"
    return None


def _can_attach() -> bool:
    """Whether strace can attach to a process (containers may forbid ptrace)."""
    sleeper = subprocess.Popen(["sleep", "30"])
    tracer = subprocess.Popen(
        [STRACE or "strace", "-qq", "-o", os.devnull, "-e", "trace=none", "-p", str(sleeper.pid)],
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and tracer.poll() is None:
            if _tracer_pid(sleeper.pid) > 0:
                return True
            time.sleep(0.01)
        return False
    finally:
        for proc in (tracer, sleeper):
            proc.kill()
            proc.wait()


@dataclass
class Shared:
    """A page of memory shared with a forked child: its report needs no syscall."""

    mem: mmap.mmap = field(default_factory=lambda: mmap.mmap(-1, 1 << 16))

    def put(self, obj: Any) -> None:
        data = json.dumps(obj).encode()[: len(self.mem) - 8]
        self.mem[8 : 8 + len(data)] = data
        self.mem[:8] = len(data).to_bytes(8, "little")

    def get(self) -> Any:
        n = int.from_bytes(self.mem[:8], "little")
        return json.loads(self.mem[8 : 8 + n]) if n else None

    def clear(self) -> None:
        self.mem[:8] = bytes(8)


@dataclass
class Traced:
    """The outcome of one traced child: its report, how it ended, strace's log."""

    report: Any
    status: int
    log: str

    @property
    def killed(self) -> bool:
        return os.WIFSIGNALED(self.status) and os.WTERMSIG(self.status) == signal.SIGKILL


def traced_child(
    body: Callable[[], Any], *, shared: Shared, strace_args: list[str], log: str
) -> Traced:
    """Fork a child, attach strace to it, then let it run ``body`` (reported via memory).

    Attaching after the fork means strace's per-syscall counters (``when=N``) start at
    the first syscall of ``body``: no position is spent on interpreter start-up.
    """
    shared.clear()
    go_r, go_w = os.pipe()

    def child() -> None:
        os.close(go_w)
        os.read(go_r, 1)  # read is never traced: wait until strace is attached
        try:
            shared.put({"ok": True, "value": body()})
        except BaseException as exc:
            shared.put(
                {
                    "ok": False,
                    "type": type(exc).__name__,
                    "module": type(exc).__module__,
                    "stage": getattr(exc, "stage", None),
                    "errno": getattr(exc, "errno", None),
                    "message": str(exc)[:400],
                }
            )
        os._exit(0)

    pid = fork(child)
    os.close(go_r)
    tracer = subprocess.Popen(
        [STRACE or "strace", "-f", "-qq", "-o", log, "-p", str(pid), *strace_args],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # strace is attached once the child shows a tracer in /proc.
        deadline = time.monotonic() + 20
        while _tracer_pid(pid) == 0:
            if time.monotonic() > deadline or tracer.poll() is not None:
                raise RuntimeError(f"strace did not attach: {tracer.stderr.read()}")
            time.sleep(0.002)
        os.write(go_w, b"g")
        _, status = os.waitpid(pid, 0)
        tracer.wait(timeout=60)
    finally:
        os.close(go_w)
        if tracer.poll() is None:
            tracer.kill()
            tracer.wait()
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        if tracer.stderr is not None:
            tracer.stderr.close()
    text = Path(log).read_text() if os.path.exists(log) else ""
    return Traced(shared.get(), status, text)


def _tracer_pid(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("TracerPid:"):
                    return int(line.split()[1])
    except FileNotFoundError:
        return -1
    return 0


_CALL = re.compile(r"^(\d+)\s+([a-z0-9_]+)\(")


def syscall_positions(log: str) -> dict[str, int]:
    """For each syscall in a strace log, the most calls any one thread made.

    strace counts ``when=N`` per thread, so enumerating N up to this number reaches
    every call of every thread (a thread with fewer calls is simply not faulted).
    """
    per: dict[tuple[str, str], int] = {}
    for line in log.splitlines():
        m = _CALL.match(line)
        if m and "resumed>" not in line:
            tid, name = m.groups()
            per[(tid, name)] = per.get((tid, name), 0) + 1
        elif "<... " in line:  # an unfinished call resumed: counted at its start
            continue
    out: dict[str, int] = {}
    for (_, name), n in per.items():
        out[name] = max(out.get(name, 0), n)
    return out


# ------------------------------------------------------------------------------- mounts
def mounted_tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "none", str(path)],
        check=True,
        capture_output=True,
    )


def unmount(path: Path) -> None:
    for _ in range(50):
        done = subprocess.run(["umount", str(path)], capture_output=True)
        if done.returncode == 0 or not os.path.ismount(path):
            return
        time.sleep(0.1)
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


def can_mount() -> str | None:
    if not IS_ROOT:
        return "mounting a tmpfs needs root"
    if shutil.which("mount") is None:
        return "no mount(8) on this machine"
    return None


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "1m") -> Iterator[Path]:
    """A real tmpfs of ``size`` at ``path``, always unmounted afterwards."""
    mounted_tmpfs(path, size)
    try:
        yield path
    finally:
        unmount(path)


def remount(path: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(path)], check=True, capture_output=True)


def rng_for(request_name: str) -> random.Random:
    """A per-test random generator, seeded from the test name (reproducible)."""
    return random.Random(xxhash.xxh32_intdigest(request_name.encode()))
