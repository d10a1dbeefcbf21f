"""The seed's three Keras 2 scripts run on Keras 3 with only the import line changed.

The scripts are taken from the seed tutorial (``../shared/seed/``) when it is there,
else from ``examples/keras_seed/``; ``epochs=150`` becomes ``epochs=3`` to keep the
run short, and the Pima CSV is copied (or generated with its shape) into the working
directory, where the scripts read it. The unused ``matplotlib`` import is satisfied
by an empty stand-in when matplotlib is not installed.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from seed_data import pima

import safepoint

REPO = Path(__file__).resolve().parents[2]
SEED = REPO.parent / "shared" / "seed" / "keras-checkpointing-tutorial.txt"
EXAMPLES = REPO / "examples" / "keras_seed"
NAMES = ["checkpoint_improvements.py", "checkpoint_best.py", "load_best.py"]
KERAS_IMPORT = "from keras.callbacks import ModelCheckpoint\n"
OUR_IMPORT = "from safepoint.keras import ModelCheckpoint\n"


def seed_scripts() -> list[str]:
    if SEED.exists():
        blocks = re.findall(r"```python\n(.*?)```", SEED.read_text(), re.S)
        code = [b for b in blocks if "from keras.models import Sequential" in b]
        assert len(code) == 3 and all(KERAS_IMPORT in b for b in code)
        return [b.replace(KERAS_IMPORT, OUR_IMPORT) for b in code]
    return [(EXAMPLES / n).read_text() for n in NAMES]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A working directory with the CSV, the scripts, and matplotlib if needed."""
    work = tmp_path_factory.mktemp("seed")
    x, y = pima()
    np.savetxt(work / "pima-indians-diabetes.csv", np.column_stack([x, y]), delimiter=",")
    for name, code in zip(NAMES, seed_scripts(), strict=True):
        assert "epochs=150" in code or name == "load_best.py"
        (work / name).write_text(code.replace("epochs=150", "epochs=3"))
    if importlib.util.find_spec("matplotlib") is None:
        stub = work / "stub" / "matplotlib"
        stub.mkdir(parents=True)
        (stub / "__init__.py").write_text("")
        (stub / "pyplot.py").write_text("")
    return work


def run(workdir: Path, name: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KERAS_BACKEND": "torch", "PYTHONPATH": str(workdir / "stub")}
    return subprocess.run(
        [sys.executable, name], cwd=workdir, capture_output=True, text=True, timeout=300, env=env
    )


def test_examples_are_the_seed_with_only_the_import_changed():
    if not SEED.exists():
        pytest.skip("the seed tutorial is not next to the repository")
    for name, code in zip(NAMES, seed_scripts(), strict=True):
        assert (EXAMPLES / name).read_text() == code.replace(
            "import matplotlib.pyplot as plt\n", ""
        )


@pytest.mark.e2e
def test_the_three_seed_scripts_run_unchanged(workdir):
    improvements = run(workdir, "checkpoint_improvements.py")
    assert improvements.returncode == 0, improvements.stderr
    out = improvements.stdout
    first = re.search(
        r"\nEpoch 1: val_acc improved from None to (0\.\d{5}), saving model to "
        r"weights-improvement-01-(0\.\d\d)\.hdf5\n",
        out,
    )
    assert first and f"{float(first[1]):.2f}" == first[2], out
    assert "\nEpoch 1: finished saving model to weights-improvement-01-" in out
    assert improvements.stderr.count("are Keras 2 metric names") == 1
    files = sorted(p.name for p in workdir.glob("weights-improvement-*.hdf5"))
    assert len(files) == len(re.findall("improved from", out))

    best = run(workdir, "checkpoint_best.py")
    assert best.returncode == 0, best.stderr
    assert "saving model to weights.best.hdf5\n" in best.stdout
    assert (workdir / "weights.best.hdf5").exists()

    loaded = run(workdir, "load_best.py")
    assert loaded.returncode == 0, loaded.stderr
    assert "Created model and loaded weights from file\n" in loaded.stdout
    assert re.search(r"\n\w+: \d+\.\d\d%\n", loaded.stdout), loaded.stdout

    # The files Keras reads are safepoint checkpoints too.
    mgr = safepoint.CheckpointManager(workdir, monitor="val_acc")
    names = [c.name for c in mgr.checkpoints()]
    assert set(names) == {*files, "weights.best.hdf5"}
    assert all(v.ok for v in mgr.verify() if v.name != "stub")
    assert not [n for n in os.listdir(workdir) if n.startswith(".sp.tmp-")]
