"""The benchmarks still run (tiny sizes, one repetition); their timings are not checked."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e  # each test runs the benchmark scripts as real processes

pytest.importorskip("torch")

BENCH = Path(__file__).resolve().parents[1] / "bench"


def run(script: str, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_save_load_runs(tmp_path: Path) -> None:
    out = run(
        "save_load.py",
        *("--reps", "1", "--large-mib", "4", "--large-count", "4"),
        *("--small-mib", "1", "--small-count", "20", "--dir", str(tmp_path)),
        "--no-memory",
    )
    assert "| safepoint |" in out and "| torch.save |" in out
    assert "safepoint async: `save()` returned after" in out
    assert "| safepoint, load(mmap=True) + 1 tensor |" in out


def test_async_stall_runs(tmp_path: Path) -> None:
    out = run(
        "async_stall.py",
        *("--mib", "4", "--count", "4", "--reps", "1", "--steps", "8", "--every", "2"),
        *("--step-ms", "2", "--dir", str(tmp_path)),
    )
    assert "| safepoint async |" in out and "| DCP async_save (thread) |" in out
    assert "steady-state overhead" in out


def test_cuda_snapshot_runs_on_cpu(tmp_path: Path) -> None:
    """The GPU script's logic (the bit-for-bit check included) runs here on the CPU."""
    out = run(
        "cuda_snapshot.py",
        *("--device", "cpu", "--gib", "0.01", "--saves", "3", "--every", "4"),
        *("--step-ms", "2", "--dir", str(tmp_path)),
    )
    assert "restored bytes identical to the state at the last save: True" in out


def test_persist_cpu_runs(tmp_path: Path) -> None:
    out = run(
        "persist_cpu.py",
        *("--mib", "8", "--reps", "1", "--steps", "2", "--dir", str(tmp_path)),
    )
    assert "| safepoint async save (save + wait) |" in out
