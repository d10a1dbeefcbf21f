"""Common torch training state round-trips through the core's Stateful path.

torchsnapshot's pattern: make ``foo`` differ from ``bar``, save ``foo``, restore into
``bar``, and assert that ``bar`` now equals ``foo`` exactly.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, RandomSampler, TensorDataset  # noqa: E402

import safepoint  # noqa: E402
from safepoint.torch import ResumableSampler, RNGState  # noqa: E402


def _bytes(t: torch.Tensor) -> bytes:
    return t.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()


def _assert_equal(a: object, b: object, path: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), path
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert _bytes(a) == _bytes(b), f"{path}: tensor bytes differ"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), f"{path}: {list(a)} != {list(b)}"
        for k in a:
            _assert_equal(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, list | tuple):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_equal(x, y, f"{path}/{i}")
    else:
        assert a == b and type(a) is type(b), f"{path}: {a!r} != {b!r}"


def _trained(seed: int) -> dict:
    """Model, Adam, StepLR, GradScaler and an EMA copy after a few real steps."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.Adam(
        [
            {"params": model[0].parameters(), "lr": 1e-2},
            {"params": list(model[1].parameters()) + list(model[3].parameters())},
        ],
        lr=1e-3,
    )
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**seed)
    ema = torch.optim.swa_utils.AveragedModel(
        model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.9)
    )
    for _ in range(seed):
        opt.zero_grad()
        loss = model(torch.randn(4, 6)).pow(2).mean()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()
        ema.update_parameters(model)
    return {
        "model": model,
        "optimizer": opt,
        "scheduler": sched,
        "scaler": scaler,
        "ema": ema,
        "step": seed * 10,
        "counters": {"seen": seed * 4, "best": float(seed) / 3},
    }


def test_module_optimizer_scheduler_scaler_ema_round_trip(tmp_path):
    foo, bar = _trained(3), _trained(1)
    assert _bytes(foo["model"][0].weight) != _bytes(bar["model"][0].weight)
    mgr = safepoint.CheckpointManager(tmp_path)
    mgr.save(foo, step=1)
    mgr.restore(bar)
    for key in ("model", "optimizer", "scheduler", "scaler", "ema"):
        _assert_equal(foo[key].state_dict(), bar[key].state_dict(), key)
    assert bar["step"] == 30 and bar["counters"] == {"seen": 12, "best": 1.0}
    # Adam's state is keyed by int parameter ids; both param groups kept their lr.
    state = bar["optimizer"].state_dict()
    assert sorted(state["state"]) == list(range(6))
    assert [g["lr"] for g in state["param_groups"]] == [
        g["lr"] for g in foo["optimizer"].state_dict()["param_groups"]
    ]
    assert bar["scaler"].get_scale() == foo["scaler"].get_scale()


def test_training_continues_identically_after_restore(tmp_path):
    foo, bar = _trained(3), _trained(2)
    mgr = safepoint.CheckpointManager(tmp_path)
    mgr.save(foo, step=1)
    mgr.restore(bar)
    x = torch.randn(4, 6)
    for state in (foo, bar):
        state["optimizer"].zero_grad()
        state["model"](x).pow(2).mean().backward()
        state["optimizer"].step()
    _assert_equal(foo["model"].state_dict(), bar["model"].state_dict())


def test_generators_and_loaders_in_the_state_restore_in_place(tmp_path):
    def make(seed: int) -> dict:
        ds = TensorDataset(torch.arange(40.0))
        g = torch.Generator().manual_seed(seed)
        loader = DataLoader(ds, batch_size=4, shuffle=True, generator=g)
        sampler_g = torch.Generator().manual_seed(seed + 1)
        loader2 = DataLoader(ds, batch_size=4, sampler=RandomSampler(ds, generator=sampler_g))
        return {
            "torch_gen": torch.Generator().manual_seed(seed + 2),
            "np_gen": np.random.default_rng(seed),
            "loader": loader,
            "loader2": loader2,
        }

    foo, bar = make(1), make(2)
    next(iter(foo["loader"]))
    foo["np_gen"].random(3)
    mgr = safepoint.CheckpointManager(tmp_path)
    mgr.save(foo, step=1)
    objects = {k: bar[k] for k in bar}
    mgr.restore(bar)
    assert all(bar[k] is objects[k] for k in bar)  # the same objects, updated in place
    assert torch.equal(
        torch.rand(3, generator=foo["torch_gen"]), torch.rand(3, generator=bar["torch_gen"])
    )
    assert foo["np_gen"].random() == bar["np_gen"].random()
    for key in ("loader", "loader2"):
        assert [b[0].tolist() for b in foo[key]] == [b[0].tolist() for b in bar[key]], key


def test_restoring_into_another_shape_lists_the_keys(tmp_path):
    mgr = safepoint.CheckpointManager(tmp_path)
    mgr.save({"model": nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 1))}, step=1)
    other = nn.Sequential(nn.Linear(4, 16), nn.Linear(16, 1), nn.Linear(1, 1))
    before = _bytes(other[0].weight)
    with pytest.raises(safepoint.StateMismatchError) as info:
        mgr.restore({"model": other})
    err = info.value
    assert "model/0.weight (checkpoint [8, 4], target [16, 4])" in str(err)
    assert set(err.missing) == {"model/2.weight", "model/2.bias"}
    assert {m.split(" ")[0] for m in err.mismatched} == {
        "model/0.weight",
        "model/0.bias",
        "model/1.weight",
    }
    assert _bytes(other[0].weight) == before  # nothing was loaded


def test_resumable_sampler_from_another_dataset_is_a_mismatch(tmp_path):
    mgr = safepoint.CheckpointManager(tmp_path)
    mgr.save({"sampler": ResumableSampler(range(10), seed=1)}, step=1)
    with pytest.raises(safepoint.StateMismatchError, match=r"size: saved 10, now 12"):
        mgr.restore({"sampler": ResumableSampler(range(12), seed=1)})


def test_torch_rng_state_restores_every_generator(tmp_path):
    import random

    mgr = safepoint.CheckpointManager(tmp_path)
    state = {"rng": RNGState()}
    mgr.save(state, step=1)
    expected = (random.random(), np.random.rand(), torch.rand(2).tolist())
    random.random(), np.random.rand(), torch.rand(5)  # move on
    mgr.restore(state)
    assert (random.random(), np.random.rand(), torch.rand(2).tolist()) == expected


def test_import_safepoint_does_not_import_torch():
    code = "import sys, safepoint; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr


@pytest.mark.filterwarnings("ignore:'set_vital' is deprecated:UserWarning")
def test_torchdata_stateful_dataloader_works_as_it_is(tmp_path):
    """Objects with their own state_dict protocol need no adapter (skipped without it)."""
    stateful_dataloader = pytest.importorskip("torchdata.stateful_dataloader")

    def make() -> object:
        return stateful_dataloader.StatefulDataLoader(list(range(40)), batch_size=4, shuffle=True)

    torch.manual_seed(0)
    reference = [b.tolist() for b in make()]
    torch.manual_seed(0)
    loader = make()
    it = iter(loader)
    head = [next(it).tolist() for _ in range(3)]
    mgr = safepoint.CheckpointManager(tmp_path)
    mgr.save({"loader": loader, "rng": RNGState()}, step=1)
    resumed = make()
    mgr.restore({"loader": resumed, "rng": RNGState()})
    assert head + [b.tolist() for b in resumed] == reference
