"""The documented loops run: examples/torch_loop.py and the loop in docs/torch.md."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

import safepoint

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "torch_loop.py"


def _weights(stdout: str) -> str:
    found = re.findall(r"^weights: (\S+)$", stdout, re.MULTILINE)
    assert len(found) == 1, stdout
    return found[0]


@pytest.mark.e2e
def test_example_stopped_by_sigterm_resumes_to_the_same_weights(tmp_path):
    whole = subprocess.run(
        [sys.executable, str(EXAMPLE), str(tmp_path / "a")],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert whole.returncode == 0, whole.stderr[-3000:]

    root = tmp_path / "b"
    proc = subprocess.Popen(
        [sys.executable, str(EXAMPLE), str(root)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("epoch 1:"):
            proc.send_signal(signal.SIGTERM)
            break
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "checkpoint step-" in err and "committed" in err
    again = subprocess.run(
        [sys.executable, str(EXAMPLE), str(root)], capture_output=True, text=True, timeout=240
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from step-" in again.stdout
    assert _weights(again.stdout) == _weights(whole.stdout)


@pytest.mark.e2e
def test_the_plain_pytorch_loop_in_the_docs_runs(tmp_path):
    text = (REPO / "docs" / "torch.md").read_text()
    section = text.split("## Plain PyTorch", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert code is not None
    assert len(code.group(1).splitlines()) <= 40
    run = subprocess.run(
        [sys.executable, "-c", code.group(1)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    latest = safepoint.CheckpointManager(tmp_path / "runs" / "torch_loop").latest()
    assert latest is not None and latest.step == 4 * 32  # 4 epochs of 32 batches
