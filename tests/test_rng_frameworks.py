"""``safepoint.RNGState`` uses torch only when the program has imported it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

# Child processes that load torch (or must not): the e2e set.
pytestmark = pytest.mark.e2e

SAVE = """
import sys, torch, safepoint
torch.manual_seed(5)
m = safepoint.CheckpointManager(sys.argv[1])
m.save({"rng": safepoint.RNGState()}, step=1)
m.close()
print(torch.rand(1).item())
"""

RESTORE_WITHOUT_TORCH = """
import logging, sys, safepoint
logging.basicConfig(level=logging.INFO, format="%(message)s")
m = safepoint.CheckpointManager(sys.argv[1])
m.restore({"rng": safepoint.RNGState()})
m.close()
assert "torch" not in sys.modules, "restore imported torch"
"""

RESTORE_WITH_TORCH = """
import sys, torch, safepoint
torch.manual_seed(99)
m = safepoint.CheckpointManager(sys.argv[1])
m.restore({"rng": safepoint.RNGState()})
m.close()
print(torch.rand(1).item())
"""


def _run(code: str, root: Path) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(
        [sys.executable, "-c", code, str(root)], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr
    return out


def test_torch_generator_restored_when_torch_is_loaded_and_never_imported_otherwise(
    tmp_path: Path,
) -> None:
    pytest.importorskip("torch")
    first = _run(SAVE, tmp_path / "run").stdout.strip()
    again = _run(RESTORE_WITH_TORCH, tmp_path / "run").stdout.strip()
    assert again == first  # the draw after restore is the draw after the save
    quiet = _run(RESTORE_WITHOUT_TORCH, tmp_path / "run")
    assert "torch is not imported" in quiet.stderr


def test_load_as_torch_without_torch_says_to_import_it(tmp_path: Path) -> None:
    code = (
        "import sys, numpy as np, safepoint\n"
        "m = safepoint.CheckpointManager(sys.argv[1])\n"
        "m.save({'w': np.ones(2)}, step=1)\n"
        "m.close()\n"
        "try:\n"
        "    safepoint.load(sys.argv[1] + '/step-00000001', as_numpy=False)\n"
        "except safepoint.ConfigError as exc:\n"
        "    print(exc)\n"
        "assert 'torch' not in sys.modules\n"
    )
    out = _run(code, tmp_path / "run")
    assert "import torch" in out.stdout
