"""The CUDA paths: pinned staging of device tensors, restore into device tensors, CUDA RNG.

They need a CUDA device and skip without one (CI has none); a session lent a GPU
machine runs them there (see bench/README.md for the figures of bench/cuda_snapshot.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

import safepoint  # noqa: E402
import safepoint.torch  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 8)
    ).cuda()


def test_async_save_of_device_tensors_is_pinned_and_bit_exact(tmp_path: Path) -> None:
    model = _model(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 64, device="cuda")).sum().backward()
    opt.step()
    expected = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    with safepoint.CheckpointManager(tmp_path, async_save=True) as mgr:
        mgr.save({"model": model, "optimizer": opt}, step=1)
        with torch.no_grad():  # training goes on while the save persists
            for p in model.parameters():
                p.add_(1.0)
        mgr.wait()
        assert mgr._staging._pinned  # the arena was page-locked for DMA copies
        target = _model(1)
        mgr.restore({"model": target, "optimizer": torch.optim.AdamW(target.parameters())})
    for key, value in target.state_dict().items():
        assert value.device.type == "cuda"
        assert torch.equal(value.cpu(), expected[key]), key


def test_cuda_rng_is_restored(tmp_path: Path) -> None:
    torch.cuda.manual_seed_all(3)
    with safepoint.CheckpointManager(tmp_path) as mgr:
        mgr.save({"rng": safepoint.torch.RNGState()}, step=1)
        after_save = torch.rand(5, device="cuda")
        torch.cuda.manual_seed_all(99)
        mgr.restore({"rng": safepoint.torch.RNGState()})
    assert torch.equal(torch.rand(5, device="cuda"), after_save)
