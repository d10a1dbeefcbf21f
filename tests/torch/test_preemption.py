"""save_on_signal: a signal becomes a checkpoint at the next safe point, then an exit.

These run in-process (no torch needed): the test sends the signal to itself, so the
handler runs at once, and the safe point then raises ``SystemExit``.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Iterator

import pytest

import safepoint
from safepoint import preemption


@pytest.fixture
def mgr(tmp_path) -> Iterator[safepoint.CheckpointManager]:
    manager = safepoint.CheckpointManager(tmp_path / "run")
    yield manager
    guard = preemption.active()
    if guard is not None:
        guard.remove()
    manager.close()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT])
def test_signal_saves_at_the_next_batch_end_and_exits(mgr, sig, capfd):
    state = {"x": 0}
    callback = safepoint.ModelCheckpoint(mgr, state=state, save_freq=100)
    previous = signal.getsignal(sig)
    mgr.save_on_signal(state)
    callback.on_batch_end(0, {"loss": 1.0})
    state["x"] = 1
    os.kill(os.getpid(), sig)  # arrives mid-step: nothing is saved yet
    assert mgr.latest() is None
    state["x"] = 2  # the step finishes
    with pytest.raises(SystemExit) as info:
        callback.on_batch_end(1, {"loss": 0.5})
    assert info.value.code == 128 + sig
    ckpt = mgr.restore()
    assert ckpt is not None and ckpt.step == 2 and ckpt.state["x"] == 2
    assert ckpt.metrics == {"loss": 0.5}
    err = capfd.readouterr().err
    assert f"received {sig.name}; saving a checkpoint at the next safe point" in err
    assert f"checkpoint {ckpt.name} committed" in err and f"status {128 + sig}" in err
    assert signal.getsignal(sig) is previous and preemption.active() is None


def test_a_scheduled_save_at_the_safe_point_is_not_repeated(mgr):
    state = {"x": 0}
    callback = safepoint.ModelCheckpoint(mgr, state=state, save_freq=2)
    mgr.save_on_signal(state)
    callback.on_batch_end(0)
    os.kill(os.getpid(), signal.SIGTERM)
    with pytest.raises(SystemExit):
        callback.on_batch_end(1)  # save_freq=2 saves here anyway
    assert [c.step for c in mgr.checkpoints()] == [2]


def test_check_is_a_safe_point_for_loops_without_a_callback(mgr):
    state = {"w": 1.5}
    with mgr.save_on_signal(lambda: state, exit_code=0) as guard:
        guard.check(step=7)
        assert mgr.latest() is None
        os.kill(os.getpid(), signal.SIGUSR1)
        with pytest.raises(SystemExit) as info:
            guard.check(step=8, epoch=1)
    assert info.value.code == 0
    latest = mgr.latest()
    assert latest is not None and (latest.step, latest.epoch) == (8, 1)


def test_epoch_end_is_a_safe_point(mgr):
    state = {"x": 0}
    callback = safepoint.ModelCheckpoint(mgr, state=state, monitor="val_loss")
    mgr.save_on_signal(state)
    os.kill(os.getpid(), signal.SIGTERM)
    with pytest.raises(SystemExit):
        callback.on_epoch_end(0, {"val_loss": 0.3})
    assert [(c.step, c.epoch) for c in mgr.checkpoints()] == [(1, 1)]


def test_a_second_ctrl_c_interrupts_at_once(mgr):
    mgr.save_on_signal({"x": 0})
    os.kill(os.getpid(), signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
    assert mgr.latest() is None


def test_grace_period_shorter_than_recent_saves_warns(tmp_path, caplog):
    root = tmp_path / "run"
    with safepoint.CheckpointManager(root) as first:
        first.save({"x": 1}, step=1)  # recorded in the run log with its duration
    manager = safepoint.CheckpointManager(root)
    with caplog.at_level(logging.WARNING, logger="safepoint"):
        guard = manager.save_on_signal({"x": 1}, grace_period=1e-9)
    guard.remove()
    assert "the grace period is too short" in caplog.text
    assert "grace_period=1e-09 s" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="safepoint"):
        manager.save_on_signal({"x": 1}, grace_period=3600).remove()
    assert caplog.text == ""
    manager.close()


def test_grace_period_learns_from_the_callbacks_saves(mgr, caplog):
    state = {"x": 0}
    callback = safepoint.ModelCheckpoint(mgr, state=state, save_freq=1)
    with caplog.at_level(logging.WARNING, logger="safepoint"):
        mgr.save_on_signal(state, grace_period=1e-9)
        assert caplog.text == ""  # nothing known about saves yet
        callback.on_batch_end(0)
    assert "the grace period is too short" in caplog.text


def test_bad_arguments_are_config_errors(mgr):
    with pytest.raises(safepoint.ConfigError, match="SIGKILL cannot be caught"):
        mgr.save_on_signal({}, signals=(signal.SIGKILL,))
    with pytest.raises(safepoint.ConfigError, match="grace_period"):
        mgr.save_on_signal({}, grace_period=0)
    with pytest.raises(safepoint.ConfigError, match="state"):
        mgr.save_on_signal(None)
    guard = mgr.save_on_signal({})
    with pytest.raises(safepoint.ConfigError, match="already installed"):
        mgr.save_on_signal({})
    guard.remove()
