"""A hostile run log (issue 10, "Hostile files"): a FIFO or a symbolic link named
``safepoint-log.jsonl`` never hangs a save or a reader and never makes a save write
outside the root; reading the log is bounded."""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import safepoint
from safepoint.storage import local as storage_module
from safepoint.storage.local import LOG_NAME, LocalStorage


def test_a_fifo_as_the_run_log_hangs_nothing(tmp_path: Path) -> None:
    root = tmp_path / "run"
    root.mkdir()
    os.mkfifo(root / LOG_NAME)
    script = textwrap.dedent(
        f"""
        import numpy as np, safepoint
        from safepoint.storage.local import LocalStorage
        with safepoint.CheckpointManager({str(root)!r}) as mgr:
            mgr.save({{"w": np.ones(2, np.float32)}}, step=1)
            guard = mgr.save_on_signal({{"w": np.ones(2, np.float32)}})
            guard.close() if hasattr(guard, "close") else None
        try:
            LocalStorage({str(root)!r}).read_log()
        except safepoint.StorageError as exc:
            print("refused", "not a regular file" in str(exc))
        print([c.step for c in safepoint.CheckpointManager({str(root)!r}).checkpoints()])
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=20, check=True
    )
    assert out.stdout.splitlines() == ["refused True", "[1]"], out.stderr
    assert "could not write the run log" in out.stderr


def test_a_symlinked_run_log_is_never_written_through(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "run"
    root.mkdir()
    outside = tmp_path / "outside.txt"
    outside.write_text("precious\n")
    os.symlink(outside, root / LOG_NAME)
    with (
        caplog.at_level(logging.WARNING, logger="safepoint"),
        safepoint.CheckpointManager(root) as mgr,
    ):
        mgr.save({"w": np.ones(2, np.float32)}, step=1)
    assert outside.read_text() == "precious\n"
    assert "symbolic link" in caplog.text
    with pytest.raises(safepoint.StorageError, match="symbolic link"):
        LocalStorage(root).read_log()
    assert [c.step for c in safepoint.CheckpointManager(root).checkpoints()] == [1]


def test_reading_a_huge_log_is_bounded_to_its_newest_lines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(storage_module, "LOG_READ_MAX", 1000)
    storage = LocalStorage(tmp_path)
    for i in range(200):
        storage.append_log(f'{{"event": "note", "i": {i}}}')
    data = storage.read_log()
    assert 0 < len(data) <= 1000
    lines = data.decode().splitlines()
    assert lines[-1] == '{"event": "note", "i": 199}'
    assert all(line.startswith("{") for line in lines)  # starts on a line boundary


class LogFails(LocalStorage):
    """A root whose run log cannot be appended to (a full disk for the log only)."""

    def append_log(self, line: str) -> None:
        raise safepoint.StorageError("log failed", errno=errno.ENOSPC, stage="log")


def test_a_run_log_failure_never_fails_a_committed_save(tmp_path, caplog):
    mgr = safepoint.CheckpointManager(LogFails(tmp_path / "run"), keep=safepoint.Keep(last=1))
    with caplog.at_level(logging.WARNING, logger="safepoint"):
        first = mgr.save({"x": np.ones(3)}, step=1)
        second = mgr.save({"x": np.zeros(3)}, step=2)
    assert (first.step, second.step) == (1, 2)
    # retention still ran after the failed log line: only the newest remains
    assert [c.name for c in mgr.checkpoints()] == [second.name]
    assert "could not write the run log" in caplog.text
