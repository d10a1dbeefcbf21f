"""Family 8: retention never loses the run.

Whatever the policy, the metrics (worsening, NaN, missing) or the history of the root
(a restarted run, reset mtimes, a ``cp -r``), the newest committed checkpoint and the
best one are never deleted, the ``last=N`` newest stay, and a kill in the middle of a
deletion leaves no half-deleted checkpoint listed. (strace kills and errors at every
syscall of a retention pass are in ``test_f03_syscall_faults.py``.)
"""

from __future__ import annotations

import math
import os
import random
import shutil
import signal

import numpy as np
import pytest
from faultkit import Oracle, digest, expected_digest, fork, leftovers, make_state
from hypothesis import given
from hypothesis import strategies as st

import safepoint
from safepoint_testing import fail_at, faulty_manager

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
