"""`safepoint ls` and `verify --deep` while a writer in another process prunes (issue 10
item 8b): a checkpoint deleted between listing and reading is gone, not an error."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

import pytest

from safepoint.cli import main

WRITER = textwrap.dedent(
    """
    import sys, numpy as np, safepoint
    mgr = safepoint.CheckpointManager(sys.argv[1], keep=safepoint.Keep(last=1))
    step = 0
    while True:
        step += 1
        mgr.save({"w": np.full((64, 64), step, np.float32), "step": step}, step=step,
                 metrics={"loss": 1.0 / step})
        if step == 3:
            print("ready", flush=True)
    """
)


@pytest.fixture
def pruning_writer(tmp_path):
    root = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(root)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        yield root
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


@pytest.mark.e2e
@pytest.mark.parametrize("argv", [["ls"], ["ls", "--json"], ["verify", "--deep"], ["verify"]])
def test_reading_commands_pass_while_retention_deletes(pruning_writer, capsys, argv):
    deadline, runs = time.monotonic() + 2.0, 0
    # 2 s of runs, and at least 5 of them: a loaded machine (CI's other worker running
    # multi-rank tests) once fit only 4 into the 2 s
    while time.monotonic() < deadline or runs < 5:
        code = main([argv[0], str(pruning_writer), *argv[1:]])
        out, err = capsys.readouterr()
        assert code == 0, (out, err)
        assert err == ""
        if argv == ["ls", "--json"]:
            assert all(item["bytes"] > 0 for item in json.loads(out))
        runs += 1
    assert runs >= 5
