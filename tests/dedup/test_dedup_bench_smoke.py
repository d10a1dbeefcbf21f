"""bench/dedup.py still runs (tiny sizes, one repetition); its timings are not checked,
its bytes are: dedup writes no more than the floor."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

pytest.importorskip("torch")

BENCH = Path(__file__).resolve().parents[2] / "bench" / "dedup.py"


def test_dedup_bench_runs() -> None:
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--mib", "4", "--ckpts", "3", "--reps", "1"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ratio = re.search(r"\(([\d.]+)x the floor\)", proc.stdout)
    assert ratio is not None, proc.stdout
    assert float(ratio.group(1)) <= 1.05
