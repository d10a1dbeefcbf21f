"""Family 3: SIGKILL and errors at exact syscalls, every position of one save.

strace attaches to a forked child right before it saves, so its ``when=N`` counters
start with the save. A discovery run records which file-system syscalls the save makes
and how many times (per thread: the payload may be written from an I/O thread, with
``write``/``writev``/``pwrite64``, buffered or ``O_DIRECT`` -- whatever strace shows is
what gets enumerated). Then every position of every such syscall gets, in turn,
``signal=KILL`` and ``error=EIO`` (default run) and ``error=ENOSPC`` / ``error=EXDEV``
(ENOSPC on the calls that allocate, EXDEV on renames by default; every error at every
position with ``-m slow``). After each run the oracle checks "nothing lost", a failed
save must have raised a safepoint error (never a bare ``OSError``) naming its stage and
left no staging directory, and the next writer must clean up and save.

Scenarios: ``save`` (a save next to one committed checkpoint, three payload shards),
``retention`` (a save that makes ``Keep(last=1)`` delete three older checkpoints) and
``resave`` (saving a step whose name is already committed: the atomic swap path).

strace counts ``when=N`` per thread, and payload files are written from I/O threads:
one run faults the Nth call of every thread that makes N calls, so each call is
faulted in some run (possibly together with another thread's Nth call).
"""

from __future__ import annotations

import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
from faultkit import (
    FS_SYSCALLS,
    INJECTABLE,
    MiB,
    Oracle,
    Shared,
    digest,
    expected_digest,
    leftovers,
    make_state,
    metrics_for,
    strace_skip_reason,
    syscall_positions,
    traced_child,
)

import safepoint
from safepoint.ondisk.names import MARKER
from safepoint.storage import runlog
from safepoint.storage.local import LOG_NAME

pytestmark = pytest.mark.skipif(strace_skip_reason() is not None, reason=str(strace_skip_reason()))

SEED = 3
NEW_SEED = 4  # the re-saved step's new content
NBYTES = MiB
SHARD = 400 << 10  # three payload files per save

#: Syscalls that allocate space (ENOSPC is meaningful) and that rename (EXDEV is).
ALLOCATING = {"openat", "open", "creat", "mkdir", "mkdirat", "write", "writev", "pwrite64"}
ALLOCATING |= {"pwritev", "pwritev2", "fsync", "fdatasync", "fallocate", "ftruncate"}
RENAMING = {"rename", "renameat", "renameat2"}
#: Stages that can fail after the commit (the run log, the retention pass and its listing).
AFTER_COMMIT = {"log", "retention", "read", "list"}


@dataclass(frozen=True)
class Scenario:
    name: str
    committed: tuple[int, ...]  # steps committed before the traced save
    step: int  # the step the traced child saves
    keep_last: int | None

    @property
    def seed(self) -> int:
        return NEW_SEED if self.step in self.committed else SEED

    def manager(self, root: Path) -> safepoint.CheckpointManager:
        keep = safepoint.Keep(last=self.keep_last) if self.keep_last else None
        return safepoint.CheckpointManager(root, keep=keep, shard_bytes=SHARD)


SCENARIOS = {
    "save": Scenario("save", (1,), 2, None),
    "retention": Scenario("retention", (1, 2, 3), 4, 1),
    "resave": Scenario("resave", (1, 2), 2, None),
}


@pytest.fixture(scope="module")
def templates(tmp_path_factory) -> dict[str, Path]:
    out = {}
    for sc in SCENARIOS.values():
        root = tmp_path_factory.mktemp(f"template-{sc.name}") / "run"
        mgr = safepoint.CheckpointManager(root, shard_bytes=SHARD)
        for step in sc.committed:
            mgr.save(make_state(SEED, step, NBYTES), step=step, metrics=metrics_for(step))
        mgr.close()
        out[sc.name] = root
    return out


class Runner:
    """Runs one scenario's save under strace with a given fault and checks the root."""

    def __init__(self, sc: Scenario, template: Path, work: Path) -> None:
        self.sc, self.template, self.work = sc, template, work
        self.shared = Shared()
        self.runs = 0
        self.outcomes: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()

    def fresh_root(self) -> Path:
        root = self.work / "run"
        if root.exists():
            shutil.rmtree(root)
        shutil.copytree(self.template, root)
        return root

    def body(self, root: Path):
        sc = self.sc

        def save() -> str:
            sc.manager(root).save(
                make_state(sc.seed, sc.step, NBYTES), step=sc.step, metrics=metrics_for(sc.step)
            )
            return "saved"

        return save

    def trace(self, strace_args: list[str]):
        root = self.fresh_root()
        log = str(self.work / "strace.log")
        traced = traced_child(self.body(root), shared=self.shared, strace_args=strace_args, log=log)
        self.runs += 1
        return root, traced

    def discover(self) -> dict[str, int]:
        root, traced = self.trace(["-e", "trace=" + ",".join(FS_SYSCALLS)])
        assert traced.report == {"ok": True, "value": "saved"}, traced.report
        self.check(root, saved=True, raised_at=None)
        return syscall_positions(traced.log)

    def inject(self, syscall: str, n: int, fault: str) -> None:
        action = "signal=KILL" if fault == "KILL" else f"error={fault}"
        root, traced = self.trace(
            ["-e", f"trace={syscall}", "-e", f"inject={syscall}:{action}:when={n}"]
        )
        report = traced.report
        where = f"{fault} at {syscall} #{n}"
        if fault == "KILL":
            if traced.killed:
                self.outcomes["killed"] += 1
                self.check(root, saved=None, raised_at=None)
                return
            # This thread made fewer calls than the busiest one: nothing was injected.
            assert report is not None and report["ok"], (where, report, traced.status)
            self.outcomes["not reached"] += 1
            self.check(root, saved=True, raised_at=None)
            return
        assert not traced.killed and report is not None, (where, traced.status)
        if report["ok"]:
            self.outcomes["save succeeded"] += 1
            self.check(root, saved=True, raised_at=None)
            return
        assert report["module"] == "safepoint.errors", f"{where}: a non-safepoint error {report}"
        assert report["type"] in ("StorageError", "CorruptCheckpointError"), (where, report)
        if report["type"] == "StorageError":
            assert report["stage"], (where, report)
            assert f"stage {report['stage']!r}" in report["message"], report
        self.errors[f"{report['type']}:{report['stage']}"] += 1
        self.outcomes["save raised"] += 1
        self.check(root, saved=False, raised_at=report["stage"])

    def check(self, root: Path, *, saved: bool | None, raised_at: str | None) -> None:
        """The oracle after one run, then the next writer cleans up and saves again."""
        sc = self.sc
        if saved is False:
            assert [n for n in leftovers(root) if ".tmp-" in n] == [], leftovers(root)
        previous = max(sc.committed)
        if sc.name == "resave":
            mgr = safepoint.CheckpointManager(root)
            steps = [c.step for c in mgr.checkpoints()]
            assert steps == [1, 2], steps
            got = digest(mgr.restore().state)
            old = expected_digest(SEED, 2, NBYTES)
            new = expected_digest(NEW_SEED, 2, NBYTES)
            if saved:
                assert got == new
            elif saved is False and raised_at not in AFTER_COMMIT:
                assert got == old, f"a failed re-save at {raised_at!r} replaced step 2"
            else:
                assert got in (old, new)
            assert digest(mgr.restore(checkpoint=1).state) == expected_digest(SEED, 1, NBYTES)
        else:
            oracle = Oracle(SEED, NBYTES, keep_last=sc.keep_last, returned=previous)
            if saved:
                oracle.returned = sc.step
            elif saved is None or raised_at in AFTER_COMMIT:
                oracle.in_flight = sc.step
            oracle.check(root)
        # The next writer cleans whatever was left and commits a new step.
        nxt = sc.step + 10
        mgr = sc.manager(root)
        mgr.save(make_state(SEED, nxt, NBYTES), step=nxt, metrics=metrics_for(nxt))
        mgr.close()
        assert leftovers(root) == [], leftovers(root)
        got = safepoint.CheckpointManager(root).restore()
        assert got.step == nxt and digest(got.state) == expected_digest(SEED, nxt, NBYTES)


def _faults_for(syscall: str, exhaustive: bool) -> list[str]:
    faults = ["KILL", "EIO"]
    if exhaustive or syscall in ALLOCATING:
        faults.append("ENOSPC")
    if exhaustive or syscall in RENAMING:
        faults.append("EXDEV")
    return faults


def _enumerate(templates, tmp_path, name: str, *, exhaustive: bool) -> None:
    runner = Runner(SCENARIOS[name], templates[name], tmp_path)
    positions = runner.discover()
    injectable = {s: n for s, n in positions.items() if s in INJECTABLE}
    assert "fsync" in injectable and ("rename" in injectable or "renameat2" in injectable)
    total = 0
    failures = []
    for syscall, count in sorted(injectable.items()):
        for n in range(1, count + 1):
            for fault in _faults_for(syscall, exhaustive):
                try:
                    runner.inject(syscall, n, fault)
                except Exception as exc:  # gather them all: one report names every position
                    failures.append(f"{fault} at {syscall} #{n}: {type(exc).__name__}: {exc}")
                total += 1
    print(
        f"\n[{name}] syscalls seen: {dict(sorted(positions.items()))}\n"
        f"[{name}] {sum(injectable.values())} injectable positions, {total} injected runs: "
        f"{dict(runner.outcomes)}; errors raised: {dict(runner.errors)}"
    )
    assert not failures, f"{len(failures)} of {total} runs broke a guarantee:\n" + "\n".join(
        f[:600] for f in failures
    )
    assert runner.outcomes["killed"] > 0 and runner.outcomes["save raised"] > 0


@pytest.mark.e2e
@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_fault_at_every_syscall_position(templates, tmp_path, name):
    _enumerate(templates, tmp_path, name, exhaustive=False)


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_every_error_at_every_syscall_position(templates, tmp_path, name):
    _enumerate(templates, tmp_path, name, exhaustive=True)


def test_short_writes_are_caught_by_checksums(templates, tmp_path):
    """``retval=`` makes a write claim bytes it never wrote: only checksums notice.

    The save cannot know (the kernel said the bytes were written), so it commits; the
    checksums must then refuse the damaged checkpoint and ``restore('latest')`` must
    fall back to the previous one. A short write of the run log only tears a log line,
    which readers skip.
    """
    runner = Runner(SCENARIOS["save"], templates["save"], tmp_path)
    positions = runner.discover()
    writes = {s: n for s, n in positions.items() if s in ("write", "writev", "pwrite64")}
    assert writes, positions
    caught = torn_log = 0
    for syscall, count in writes.items():
        for n in range(1, count + 1):
            root, traced = runner.trace(
                ["-y", "-e", f"trace={syscall}", "-e", f"inject={syscall}:retval=1:when={n}"]
            )
            hit = [line for line in traced.log.splitlines() if "(INJECTED)" in line]
            assert hit, traced.log
            # The run log and staging markers are not payload: a torn one costs nothing.
            payload_hit = any(LOG_NAME not in line and MARKER not in line for line in hit)
            assert traced.report is not None, traced.status
            if not traced.report["ok"]:
                assert traced.report["module"] == "safepoint.errors", traced.report
                continue
            mgr = safepoint.CheckpointManager(root)
            bad = [v for v in mgr.verify() if not v.ok]
            if payload_hit:
                # The new checkpoint is either refused by its checksums or, for a torn
                # manifest, not listed at all; either way the previous one restores.
                assert [v.name for v in bad] == ["step-00000002"], (hit, bad)
                assert isinstance(bad[0].error, safepoint.SafepointError), bad
                got = mgr.restore()
                assert got.step == 1
                assert digest(got.state) == expected_digest(SEED, 1, NBYTES)
                caught += 1
            else:
                assert bad == [], bad
                assert [e["event"] for e in runlog.read(mgr.storage)] == ["save"], hit
                torn_log += 1
    print(
        f"\nshort writes (retval=1) at {sum(writes.values())} positions: {caught} damaged "
        f"payloads or manifests caught by checksums, {torn_log} torn run-log lines skipped"
    )
    assert caught > 0


def test_unreadable_manifest_fails_the_save_rather_than_reorder(tmp_path):
    """EIO on one manifest while a save lists the root: the save must fail.

    Skipping the unreadable checkpoint would hand the new save a ``seq`` that is not
    the largest, and a restart that saves a lower step than one already committed
    (step 1 after step 5) would then not be the latest.
    """
    root = tmp_path / "run"
    mgr = safepoint.CheckpointManager(root)
    mgr.save(make_state(SEED, 5, NBYTES), step=5)
    mgr.close()

    def body() -> str:
        safepoint.CheckpointManager(root).save(make_state(SEED, 1, NBYTES), step=1)
        return "saved"

    shared = Shared()
    seen = traced_child(
        body, shared=shared, strace_args=["-e", "trace=openat"], log=str(tmp_path / "a.log")
    )
    assert seen.report == {"ok": True, "value": "saved"}
    calls = seen.log.splitlines()
    n = next(i for i, line in enumerate(calls, 1) if '"manifest.json", O_RDONLY' in line)
    shutil.rmtree(root / "step-00000001")  # back to the root the save started from
    traced = traced_child(
        body,
        shared=shared,
        strace_args=["-e", "trace=openat", "-e", f"inject=openat:error=EIO:when={n}"],
        log=str(tmp_path / "b.log"),
    )
    assert "(INJECTED)" in traced.log
    report = traced.report
    if report["ok"]:
        listed = safepoint.CheckpointManager(root).checkpoints()
        assert listed[-1].step == 1, f"the save returned but is not latest: {listed}"
    else:
        assert report["type"] == "StorageError" and report["stage"] == "read", report
        assert report["errno"] == 5, report
        assert [c.step for c in safepoint.CheckpointManager(root).checkpoints()] == [5]
