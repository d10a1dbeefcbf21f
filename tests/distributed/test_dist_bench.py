"""bench/distributed.py still runs (tiny state, one rep); its timings are not checked."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch.distributed")

BENCH = Path(__file__).resolve().parents[2] / "bench" / "distributed.py"


@pytest.mark.e2e
def test_distributed_bench_runs(tmp_path: Path) -> None:
    src = str(BENCH.parents[1] / "src")
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--mib", "4", "--ranks", "2", "--reps", "1"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "PYTHONPATH": src, "BENCH_DIR": str(tmp_path)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = (
        "safepoint save",
        "dcp.save",
        "safepoint async save stall",
        "dcp.async_save stall",
        "safepoint restore (cold)",
        "dcp.load (warm)",
    )
    for row in rows:
        assert f"| 2 | {row} |" in proc.stdout, proc.stdout
