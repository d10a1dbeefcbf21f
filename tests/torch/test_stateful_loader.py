"""torchdata's StatefulDataLoader in the state resumes bit-for-bit, dropout on; a plain
DataLoader whose sampler cannot resume mid-epoch is named in a warning."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchdata.stateful_dataloader")

from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import safepoint  # noqa: E402
import safepoint.torch  # noqa: E402

LOOP = str(Path(__file__).with_name("stateful_loader_loop.py"))
STEPS = 3 * 10  # EPOCHS * batches per epoch in stateful_loader_loop.py


def _run(root: Path, out: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, LOOP, "--root", str(root), "--out", str(out), *extra],
        capture_output=True,
        text=True,
        timeout=240,
    )
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def _final(out: Path) -> dict[str, Any]:
    ckpt = safepoint.CheckpointManager(out).latest()
    assert ckpt is not None
    return safepoint.load(ckpt.path)


def _assert_same(expected: dict[str, Any], actual: dict[str, Any]) -> None:
    assert [h.hex() for h in actual["history"]] == [h.hex() for h in expected["history"]]
    for key, value in expected["model"].items():
        assert value.tobytes() == actual["model"][key].tobytes(), key


@pytest.fixture(scope="module")
def oracle(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base = tmp_path_factory.mktemp("oracle")
    _run(base / "root", base / "out")
    result = _final(base / "out")
    assert len(result["history"]) == STEPS
    return result


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("kill_at", "extra"),
    [
        (8, ()),  # resumes from step 5, mid-epoch 1
        (13, ("--rng-first",)),  # from step 10: the last batch of epoch 1, not yet exhausted
    ],
)
def test_sigkill_then_resume_with_a_stateful_dataloader_is_bit_identical(
    tmp_path: Path, oracle: dict[str, Any], kill_at: int, extra: tuple[str, ...]
) -> None:
    root, out = tmp_path / "root", tmp_path / "out"
    killed = _run(root, out, "--kill-at", str(kill_at), *extra, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    latest = safepoint.CheckpointManager(root).latest()
    assert latest is not None and latest.step == (kill_at - 1) // 5 * 5
    resumed = _run(root, out, *extra)
    assert f"resumed {latest.name}" in resumed.stdout
    _assert_same(oracle, _final(out))


def test_a_shuffling_dataloader_in_the_state_is_named_in_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = TensorDataset(torch.arange(10.0))
    caplog.set_level(logging.WARNING, logger="safepoint")
    with safepoint.CheckpointManager(tmp_path) as mgr:
        loader = DataLoader(data, batch_size=2, shuffle=True)
        mgr.save({"loader": loader}, step=1)
        mgr.save({"loader": loader}, step=2)
    assert caplog.text.count("cannot resume mid-epoch") == 1
    assert "RandomSampler" in caplog.text and "ResumableSampler" in caplog.text
    assert "StatefulDataLoader" in caplog.text


def test_a_loader_with_a_resumable_sampler_is_not_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = TensorDataset(torch.arange(10.0))
    caplog.set_level(logging.WARNING, logger="safepoint")
    sampler = safepoint.torch.ResumableSampler(data, seed=0)
    with safepoint.CheckpointManager(tmp_path) as mgr:
        mgr.save({"loader": DataLoader(data, batch_size=2, sampler=sampler)}, step=1)
    assert "cannot resume mid-epoch" not in caplog.text
