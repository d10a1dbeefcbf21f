"""Skipped saves in the run log: summarised, in order, readable (issue 10, "Also").

A per-batch save policy used to append one line per skipped batch (about 177 bytes:
169 MiB over a million steps). Consecutive skips of one kind are now one record with a
count and the first and last step; a crash loses at most the summary not yet written,
never a save record.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import safepoint
from safepoint.cli import main
from safepoint.storage import runlog
from safepoint.storage.local import LOG_NAME, LocalStorage


def records(root) -> list[dict]:
    return runlog.read(LocalStorage(root))


def test_a_run_of_skips_is_two_records_before_the_save(tmp_path):
    mgr = safepoint.CheckpointManager(tmp_path, monitor="loss")
    for step in range(1, 2001):
        mgr.log_skip(step=step, epoch=1, metrics={"loss": 0.5 + step * 1e-4},
                     reason=f"loss={0.5 + step * 1e-4:.4f} not better than 0.40000")  # fmt: skip
    mgr.save({"w": np.zeros(2)}, step=2001, epoch=1, metrics={"loss": 0.3})
    mgr.close()
    items = records(tmp_path)
    assert [i["event"] for i in items] == ["skip", "skip", "save"]
    first, skip = items[0], items[1]  # the first at once, then the summary of the rest
    assert (first["count"], first["step"], first["epoch"]) == (1, 1, 1)
    assert skip["count"] == 1999 and skip["epoch"] == 1
    assert (skip["first_step"], skip["last_step"], skip["step"]) == (2, 2000, 2000)
    assert skip["reason"] == "loss=0.7000 not better than 0.40000"  # the last one's
    assert skip["series"] == "step-{step:08d}"
    assert os.path.getsize(tmp_path / LOG_NAME) < 1024


def test_skips_of_another_kind_or_epoch_start_a_new_record(tmp_path):
    with safepoint.CheckpointManager(tmp_path, monitor="loss") as mgr:
        for epoch in (1, 2):  # per-epoch skips keep one record each (and their metrics)
            mgr.log_skip(step=epoch, epoch=epoch, metrics={"loss": 1.0}, reason="loss=1 not better")
        mgr.log_skip(step=3, epoch=2, reason="not due")
        mgr.log_skip(step=4, epoch=2, reason="not due")
    items = records(tmp_path)
    assert [(i["epoch"], i["count"], i["reason"]) for i in items] == [
        (1, 1, "loss=1 not better"),
        (2, 1, "loss=1 not better"),
        (2, 1, "not due"),
        (2, 1, "not due"),
    ]


def test_skips_before_the_root_exists_go_with_the_first_save(tmp_path):
    mgr = safepoint.CheckpointManager(tmp_path / "new")
    for step in range(3):
        mgr.log_skip(step=step, epoch=0, reason="warming up")
    mgr.save({"w": np.zeros(2)}, step=3, epoch=0)
    mgr.close()
    got = [(i["event"], i.get("count"), i.get("first_step")) for i in records(tmp_path / "new")]
    assert got == [("skip", 3, 0), ("save", None, None)]


def test_a_summary_is_written_after_max_count_skips(tmp_path):
    summary = runlog.SkipSummary(LocalStorage(tmp_path), max_count=10)
    for step in range(25):
        summary.add(step=step, epoch=0, metrics={}, reason="r", series="s")
    assert [i["count"] for i in records(tmp_path)] == [1, 10, 10]
    summary.flush()
    assert [i["count"] for i in records(tmp_path)] == [1, 10, 10, 4]


SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, numpy as np, safepoint
    mgr = safepoint.CheckpointManager(sys.argv[1])
    for step in range(100):
        mgr.log_skip(step=step, epoch=1, reason="not due")
    mgr.save({"w": np.zeros(2)}, step=100, epoch=1)
    for step in range(101, 151):
        mgr.log_skip(step=step, epoch=1, reason="not due")
    if sys.argv[2] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    # exits without close(): the pending summary is written at exit
    """
)


@pytest.mark.e2e
def test_exit_without_close_writes_the_summary_and_a_kill_loses_only_it(tmp_path):
    for how in ("exit", "kill"):
        root = tmp_path / how
        root.mkdir()
        proc = subprocess.run([sys.executable, "-c", SCRIPT, str(root), how], check=False)
        assert proc.returncode == (-signal.SIGKILL if how == "kill" else 0)
        got = [(i["event"], i.get("count")) for i in records(root)]
        tail = [] if how == "kill" else [("skip", 49)]
        assert got == [("skip", 1), ("skip", 99), ("save", None), ("skip", 1), *tail]


def test_log_prints_epoch_reason_and_summaries(tmp_path, capsys):
    with safepoint.CheckpointManager(tmp_path, keep=safepoint.Keep(last=1)) as mgr:
        mgr.save({"w": np.zeros(2)}, step=1, epoch=1, metrics={"loss": 0.5})
        mgr.log_skip(step=2, epoch=2, metrics={"loss": 0.7}, reason="loss=0.7 not better than 0.5")
        for step in range(3, 13):
            mgr.log_skip(step=step, epoch=3, reason="not due")
        mgr.save({"w": np.zeros(2)}, step=13, epoch=3, metrics={"loss": 0.2})
    assert main(["log", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["save", "step-00000001"] and "epoch 1" in lines[0]
    assert lines[1] == "skip       step 2, epoch 2: loss=0.7 not better than 0.5  (loss=0.7)"
    assert lines[2] == "skip       step 3, epoch 3: not due"
    assert lines[3] == "skip x9    steps 4..12, epoch 3: last not due"
    assert lines[4].startswith("save       step-00000013 [step 13, epoch 3]")
    assert lines[5].startswith("delete     step-00000001") and "(retention)" in lines[5]
    assert main(["log", "--json", str(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[3])["count"] == 9


def test_a_per_batch_best_only_loop_logs_a_few_records_not_one_per_batch(tmp_path, capsys):
    state = {"w": np.zeros(4)}
    cb = safepoint.ModelCheckpoint(tmp_path, state=state, monitor="loss", save_best_only=True,
                                   save_freq=1)  # fmt: skip
    cb.on_epoch_begin(0)
    for batch in range(5000):  # improves once, then never again
        cb.on_batch_end(batch, {"loss": 1.0 if batch == 0 else 1.0 + batch * 1e-3})
    cb.manager.close()
    items = records(tmp_path)
    assert [(i["event"], i.get("count")) for i in items] == [("save", None), ("skip", 1),
                                                             ("skip", 4998)]  # fmt: skip
    assert os.path.getsize(tmp_path / LOG_NAME) < 2048  # one line per batch: ~900 KB
    assert main(["log", str(tmp_path)]) == 0
    assert "skip x4998" in capsys.readouterr().out


def test_a_forked_child_does_not_write_the_parents_pending_summary(tmp_path):
    script = textwrap.dedent(
        """
        import os, sys, safepoint
        mgr = safepoint.CheckpointManager(sys.argv[1])
        for step in range(5):
            mgr.log_skip(step=step, epoch=1, reason="not due")
        pid = os.fork()
        if pid == 0:
            sys.exit(0)  # a helper that exits normally, running the exit hooks
        os.waitpid(pid, 0)
        mgr.close()
        """
    )
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True)
    assert [i["count"] for i in records(tmp_path)] == [1, 4]


def test_a_summary_is_written_once_max_seconds_have_passed(tmp_path):
    summary = runlog.SkipSummary(LocalStorage(tmp_path), max_seconds=0.0)
    for step in range(3):
        summary.add(step=step, epoch=0, metrics={}, reason="r", series="s")
    assert [(i["count"], i["first_step"]) for i in records(tmp_path)] == [(1, 0), (1, 1), (1, 2)]
