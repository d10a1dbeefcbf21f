"""Retention: which checkpoints Keep deletes, and deleting them crash-safely.

Retention: what ``Keep(last=, best=, every=)`` leaves on disk after every save.

The expected set is computed by an independent model of the policy, so the property
test checks the manager against the documented rules, not against itself: the newest
and the best (finite metric) checkpoints always survive, NaN and missing metrics never
count as best, and order comes from ``seq`` — not names, not mtimes.

Family 8: retention never loses the run.

Whatever the policy, the metrics (worsening, NaN, missing) or the history of the root
(a restarted run, reset mtimes, a ``cp -r``), the newest committed checkpoint and the
best one are never deleted, the ``last=N`` newest stay, and a kill in the middle of a
deletion leaves no half-deleted checkpoint listed. (strace kills and errors at every
syscall of a retention pass are in ``test_f03_syscall_faults.py``.)
"""

from __future__ import annotations

import itertools
import math
import os
import random
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from faultkit import Oracle, digest, expected_digest, fork, leftovers, make_state
from hypothesis import given, settings
from hypothesis import strategies as st

import safepoint
from safepoint_testing import examples, fail_at, faulty_manager

_counter = itertools.count()


@dataclass
class Saved:
    seq: int
    step: int
    metric: float | None  # None: missing from the metrics

    @property
    def name(self) -> str:
        return f"step-{self.step:08d}"


def expected_keep(saved: list[Saved], keep: safepoint.Keep, mode: str) -> set[str]:
    """The documented policy, spelled out independently of safepoint.retention."""
    newest = max(saved, key=lambda s: s.seq)
    names = {newest.name}
    by_seq = sorted(saved, key=lambda s: s.seq)
    if keep.last:
        names |= {s.name for s in by_seq[-keep.last :]}
    if keep.every:
        names |= {s.name for s in saved if s.step % keep.every == 0}
    finite = [s for s in by_seq if s.metric is not None and math.isfinite(s.metric)]
    sign = 1 if mode == "min" else -1
    finite.sort(key=lambda s: (sign * s.metric, s.seq))  # type: ignore[operator]
    names |= {s.name for s in finite[: max(keep.best or 0, 1)]}
    return names


def best_finite(saved: list[Saved], mode: str) -> Saved | None:
    finite = [s for s in saved if s.metric is not None and math.isfinite(s.metric)]
    if not finite:
        return None
    pick = min if mode == "min" else max
    value = pick(s.metric for s in finite)  # type: ignore[type-var]
    return min((s for s in finite if s.metric == value), key=lambda s: s.seq)


metric_values = st.one_of(
    st.none(),
    st.just(math.nan),
    st.sampled_from([math.inf, -math.inf]),
    st.floats(min_value=-10, max_value=10, allow_nan=False),
    st.sampled_from([0.5, 0.25]),  # ties
)
# Keep() needs at least one field: draw from the three shapes that guarantee one.
keeps = st.one_of(
    st.builds(safepoint.Keep, last=st.integers(1, 3), best=st.none(), every=st.none()),
    st.builds(
        safepoint.Keep,
        last=st.one_of(st.none(), st.integers(1, 3)),
        best=st.integers(1, 3),
        every=st.one_of(st.none(), st.integers(1, 4)),
    ),
    st.builds(
        safepoint.Keep,
        last=st.one_of(st.none(), st.integers(1, 3)),
        best=st.none(),
        every=st.integers(1, 4),
    ),
)


@settings(max_examples=examples(100))
@given(
    keep=keeps,
    mode=st.sampled_from(["min", "max"]),
    metrics=st.lists(metric_values, min_size=1, max_size=9),
    gaps=st.lists(st.integers(1, 3), min_size=9, max_size=9),
)
def test_retention_keeps_exactly_the_policy_set(
    tmp_path: Path,
    keep: safepoint.Keep,
    mode: str,
    metrics: list[float | None],
    gaps: list[int],
) -> None:
    root = tmp_path / f"r{next(_counter)}"
    mgr = safepoint.CheckpointManager(root, monitor="score", mode=mode, keep=keep)
    saved: list[Saved] = []
    step = 0
    for i, metric in enumerate(metrics):
        step += gaps[i]
        values = {} if metric is None else {"score": metric}
        ckpt = mgr.save({"w": np.full(4, step, dtype=np.int32)}, step=step, metrics=values)
        saved.append(Saved(ckpt.seq, step, metric))
        expected = expected_keep(saved, keep, mode)
        on_disk = {c.name for c in mgr.checkpoints()}
        assert on_disk == expected
        assert {p.name for p in root.iterdir() if p.is_dir()} == expected  # nothing hidden
        saved = [s for s in saved if s.name in expected]
        # the newest and the best finite one are always there
        assert ckpt.name in on_disk
        latest = mgr.latest()
        assert latest is not None and latest.name == ckpt.name
        best = best_finite(saved, mode)
        mgr_best = mgr.best()
        if best is None:
            assert mgr_best is None  # NaN / inf / missing never count as best
        else:
            assert mgr_best is not None and mgr_best.name == best.name
    mgr.close()


def test_nan_and_missing_never_become_best(tmp_path: Path) -> None:
    with safepoint.CheckpointManager(
        tmp_path / "run", monitor="val_loss", keep=safepoint.Keep(last=1, best=1)
    ) as mgr:
        mgr.save({"x": 1}, step=1, metrics={"val_loss": 0.9})
        mgr.save({"x": 2}, step=2, metrics={"val_loss": math.nan})
        mgr.save({"x": 3}, step=3, metrics={})
        mgr.save({"x": 4}, step=4, metrics={"val_loss": -math.inf})
        mgr.save({"x": 5}, step=5, metrics={"val_loss": math.nan})
        assert [c.step for c in mgr.checkpoints()] == [1, 5]
        best = mgr.restore(checkpoint="best")
    assert best is not None and best.step == 1 and best.state == {"x": 1}


def test_keep_last_one_with_worsening_metric_keeps_best(tmp_path: Path) -> None:
    with safepoint.CheckpointManager(
        tmp_path / "run", monitor="val_acc", keep=safepoint.Keep(last=1)
    ) as mgr:
        for step, acc in enumerate([0.9, 0.8, 0.7, 0.6], start=1):
            mgr.save({"x": step}, step=step, metrics={"val_acc": acc})
            assert [c.step for c in mgr.checkpoints()] == sorted({1, step})


def test_order_comes_from_seq_not_names_or_mtimes(tmp_path: Path) -> None:
    root = tmp_path / "run"
    keep = safepoint.Keep(last=2)
    with safepoint.CheckpointManager(root, keep=keep, name="ckpt-{step}") as mgr:
        for step in (9, 10, 8):  # a resumed run: lexical and numeric order disagree
            mgr.save({"x": step}, step=step)
        assert [c.step for c in mgr.checkpoints()] == [10, 8]
    # shuffle mtimes: the oldest checkpoint looks newest, the newest looks ancient
    for i, name in enumerate(["ckpt-10", "ckpt-8"]):
        stamp = 2_000_000_000 - i * 1_000_000
        for dirpath, _, files in os.walk(root / name):
            for f in files:
                os.utime(os.path.join(dirpath, f), (stamp, stamp))
            os.utime(dirpath, (stamp, stamp))
    # and rename the directories so names sort the other way (cp -r, manual tidy-up)
    os.rename(root / "ckpt-10", root / "zz-old")
    os.rename(root / "ckpt-8", root / "aa-new")
    with safepoint.CheckpointManager(root, keep=keep, name="ckpt-{step}") as mgr:
        assert [c.name for c in mgr.checkpoints()] == ["zz-old", "aa-new"]
        latest = mgr.restore()
        assert latest is not None and latest.name == "aa-new" and latest.state == {"x": 8}
        mgr.save({"x": 1}, step=1)  # retention must drop the oldest by seq: zz-old
        assert [c.name for c in mgr.checkpoints()] == ["aa-new", "ckpt-1"]


def test_every_keeps_multiples(tmp_path: Path) -> None:
    with safepoint.CheckpointManager(tmp_path / "run", keep=safepoint.Keep(last=1, every=3)) as mgr:
        for step in range(1, 11):
            mgr.save({"x": step}, step=step)
        assert [c.step for c in mgr.checkpoints()] == [3, 6, 9, 10]


def test_random_mtimes_do_not_change_retention(tmp_path: Path) -> None:
    """Touching files between saves (backup tools do) never changes what is kept."""
    rng = random.Random(7)
    root = tmp_path / "run"
    keep = safepoint.Keep(last=2, best=1)
    saved: list[Saved] = []
    with safepoint.CheckpointManager(root, monitor="loss", keep=keep) as mgr:
        for step in range(1, 9):
            loss = rng.random()
            ckpt = mgr.save({"x": step}, step=step, metrics={"loss": loss})
            saved.append(Saved(ckpt.seq, step, loss))
            expected = expected_keep(saved, keep, "min")
            saved = [s for s in saved if s.name in expected]
            assert {c.name for c in mgr.checkpoints()} == expected
            for p in root.iterdir():
                stamp = rng.randint(1, 2_000_000_000)
                os.utime(p, (stamp, stamp))


SEED = 23
NBYTES = 8 << 10

metric = st.one_of(
    st.floats(min_value=-10, max_value=10, allow_nan=False),
    st.just(math.nan),
    st.just(math.inf),
    st.none(),  # the metric is missing from this save's logs
)
policy = (
    st.tuples(
        st.sampled_from([None, 1, 2, 3]),
        st.sampled_from([None, 1, 2]),
        st.sampled_from([None, 2, 3]),
    )
    .filter(any)
    .map(lambda t: safepoint.Keep(last=t[0], best=t[1], every=t[2]))
)


def _tiny(step: int) -> dict:
    return {"w": np.full(4, step, dtype=np.float32), "step": step}


@given(
    values=st.lists(metric, min_size=1, max_size=12),
    keep=policy,
    mode=st.sampled_from(["min", "max"]),
)
def test_newest_best_and_last_n_are_never_deleted(tmp_path_factory, values, keep, mode):
    root = tmp_path_factory.mktemp("keep") / "run"
    mgr = safepoint.CheckpointManager(root, keep=keep, monitor="m", mode=mode)
    scored: list[tuple[float, int]] = []
    for step, value in enumerate(values, 1):
        metrics = {} if value is None else {"m": value}
        mgr.save(_tiny(step), step=step, metrics=metrics)
        if value is not None and math.isfinite(value):
            scored.append((value if mode == "min" else -value, step))
        steps = {c.step for c in mgr.checkpoints()}
        assert step in steps, "the newest was deleted"
        if scored:
            best_value = min(v for v, _ in scored)
            assert any(s in steps for v, s in scored if v == best_value), "the best was deleted"
        for s in range(max(1, step - (keep.last or 0) + 1), step + 1):
            assert s in steps, f"last={keep.last} but step {s} is gone"
        if keep.every:
            assert all(s in steps for s in range(keep.every, step + 1, keep.every))
    mgr.close()
    assert leftovers(root) == []


def test_keep_last_one_with_worsening_and_nan_metrics(tmp_path):
    root = tmp_path / "run"
    mgr = safepoint.CheckpointManager(root, keep=safepoint.Keep(last=1, best=1), monitor="val_loss")
    losses = [0.5, 0.7, float("nan"), 0.9, None, 1.2]
    for step, loss in enumerate(losses, 1):
        mgr.save(_tiny(step), step=step, metrics={} if loss is None else {"val_loss": loss})
    assert [c.step for c in mgr.checkpoints()] == [1, 6]  # the best (first) and the newest
    assert mgr.best().step == 1
    assert mgr.restore(checkpoint="best").state["step"] == 1
    only_nan = safepoint.CheckpointManager(
        tmp_path / "nan", keep=safepoint.Keep(last=1, best=1), monitor="val_loss"
    )
    for step in (1, 2, 3):
        only_nan.save(_tiny(step), step=step, metrics={"val_loss": float("nan")})
    assert [c.step for c in only_nan.checkpoints()] == [3]
    assert only_nan.best() is None


def test_restart_with_older_higher_numbered_checkpoints(tmp_path):
    root = tmp_path / "run"
    old = safepoint.CheckpointManager(root)
    for step in (100, 200):
        old.save(make_state(SEED, step, NBYTES), step=step)
    old.close()
    new = safepoint.CheckpointManager(root, keep=safepoint.Keep(last=2))
    for step in (1, 2, 3):
        new.save(make_state(SEED, step, NBYTES), step=step)
        assert new.latest().step == step  # order is the manifest's seq, not the name
    assert [c.step for c in new.checkpoints()] == [2, 3]
    new.close()
    Oracle(SEED, NBYTES, keep_last=2, returned=3).check(root)


@pytest.mark.parametrize("how", ["reset-mtimes", "shuffle-mtimes", "cp-r"])
def test_order_ignores_mtimes(tmp_path, how):
    root = tmp_path / "run"
    mgr = safepoint.CheckpointManager(root)
    for step in (1, 2, 3, 4):
        mgr.save(make_state(SEED, step, NBYTES), step=step)
    mgr.close()
    rng = random.Random(how)
    if how == "cp-r":
        copy = tmp_path / "copy"
        shutil.copytree(root, copy)  # new mtimes, in listing order
        root = copy
    for here, dirs, files in os.walk(root):
        for name in dirs + files:
            t = 0 if how == "reset-mtimes" else rng.randrange(1, 2_000_000_000)
            os.utime(os.path.join(here, name), (t, t))
    mgr = safepoint.CheckpointManager(root, keep=safepoint.Keep(last=2))
    assert [c.step for c in mgr.checkpoints()] == [1, 2, 3, 4]
    mgr.save(make_state(SEED, 5, NBYTES), step=5)
    assert [c.step for c in mgr.checkpoints()] == [4, 5]
    mgr.close()
    Oracle(SEED, NBYTES, keep_last=2, returned=5).check(root)


def kill_self(stage: str, target: str) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.e2e
@pytest.mark.parametrize("at", [1, 2, 3, 4])
def test_kill_during_deletion(tmp_path, at):
    root = tmp_path / "run"
    mgr = safepoint.CheckpointManager(root)
    for step in (1, 2, 3):
        mgr.save(make_state(SEED, step, NBYTES), step=step)
    mgr.close()

    def child() -> None:
        # SIGKILL at the ``at``-th retention stage (before or after the rename to trash,
        # or before the root fsync that makes the removal durable)
        kill = fail_at("retention", kill_self, nth=at)
        m = faulty_manager(root, kill, keep=safepoint.Keep(last=1))
        m.save(make_state(SEED, 4, NBYTES), step=4)
        os._exit(0)

    pid = fork(child)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    oracle = Oracle(SEED, NBYTES, keep_last=1, returned=4)
    oracle.check(root)  # the newest is there; whatever is listed verifies
    mgr = safepoint.CheckpointManager(root, keep=safepoint.Keep(last=1))
    mgr.save(make_state(SEED, 5, NBYTES), step=5)
    mgr.close()
    assert leftovers(root) == []
    assert [c.step for c in safepoint.CheckpointManager(root).checkpoints()] == [5]
    got = safepoint.CheckpointManager(root).restore()
    assert digest(got.state) == expected_digest(SEED, 5, NBYTES)
