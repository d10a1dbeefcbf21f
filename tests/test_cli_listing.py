"""`safepoint ls` and `log` output a person reads (issue 10, "Also", and bugs of the same
class): columns as wide as their content, a mistyped --monitor named, a closed pipe."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest

import safepoint
from safepoint.cli import main

LONG = "resnet50-imagenet-lr0.1-warmup5-cosine-seed1234-epoch{epoch:03d}-step{step:012d}"


def test_ls_columns_fit_long_names_and_wide_numbers(tmp_path, capsys):
    with safepoint.CheckpointManager(tmp_path, name=LONG) as mgr:
        for epoch, step in [(1, 7), (2, 123_456_789_012)]:
            metrics = {"val_loss": 0.5 / epoch, "a_metric_with_a_long_name": 1e-9}
            mgr.save({"w": np.zeros(2)}, step=step, epoch=epoch, metrics=metrics)
    assert main(["ls", str(tmp_path)]) == 0
    header, *rows = capsys.readouterr().out.splitlines()
    assert len(rows) == 2
    for column in ("seq", "step", "epoch", "size"):  # right-aligned under their header
        end = header.index(column) + len(column)
        for row in rows:
            assert row[end - 1] != " " and row[end] == " ", (column, header, row)
    start = header.index("created")
    assert all(
        re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", row[start : start + 19]) for row in rows
    )
    assert all(row.split()[0].startswith("resnet50-") for row in rows)
    assert header.index("seq") > max(len(r.split()[0]) for r in rows)


def test_ls_with_a_monitor_no_checkpoint_has_is_refused(tmp_path, capsys):
    with safepoint.CheckpointManager(tmp_path) as mgr:
        mgr.save({"w": np.zeros(2)}, step=1, metrics={"val_accuracy": 0.5})
    assert main(["ls", str(tmp_path), "--monitor", "val_acc"]) == 2
    err = capsys.readouterr().err
    assert "has the metric 'val_acc'" in err and "['val_accuracy']" in err
    assert main(["ls", str(tmp_path), "--monitor", "val_accuracy"]) == 0
    assert "(best)" in capsys.readouterr().out
    assert main(["ls", str(tmp_path), "--monitor", "val_score"]) == 2  # no direction known
    err = capsys.readouterr().err
    assert "Pass --mode min or --mode max" in err and "mode=" not in err
    assert main(["ls", str(tmp_path), "--monitor", "val_accuracy", "--mode", "min"]) == 0


@pytest.mark.e2e
def test_log_into_a_closed_pipe_is_quiet(tmp_path):
    with safepoint.CheckpointManager(tmp_path, keep=safepoint.Keep(last=1)) as mgr:
        for step in range(1, 400):
            mgr.save({"w": np.zeros(2)}, step=step, metrics={"loss": 1 / step})
    proc = subprocess.Popen(
        [sys.executable, "-m", "safepoint.cli", "log", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    first = proc.stdout.readline()
    proc.stdout.close()  # what `| head -1` does
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.wait(timeout=60) in (0, 141)
    assert first.startswith(b"save") and "Traceback" not in err and err == ""


def test_ls_shows_a_missing_epoch_as_a_dash(tmp_path, capsys):
    with safepoint.CheckpointManager(tmp_path) as mgr:
        mgr.save({"w": np.zeros(2)}, step=5)
    assert main(["ls", str(tmp_path)]) == 0
    assert "None" not in capsys.readouterr().out
    assert main(["show", str(tmp_path / "step-00000005")]) == 0
    assert "epoch -;" in capsys.readouterr().out
