"""Real torch training state round-trips: make ``foo`` differ from ``bar``, save ``foo``,
restore into ``bar``, and check that ``bar`` now equals ``foo`` — in place."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import safepoint
from safepoint import StateMismatchWarning

torch = pytest.importorskip("torch")
nn = torch.nn


def make_run(seed: int, *, hidden: int = 6) -> dict[str, Any]:
    """A small model with Adam, SGD-with-momentum, a scheduler and a scaler, trained a bit."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, 1))
    model.register_buffer("counter", torch.tensor([seed], dtype=torch.int64))
    adam = torch.optim.Adam(model.parameters(), lr=1e-2 * (seed + 1))
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    sched = torch.optim.lr_scheduler.StepLR(adam, step_size=2, gamma=0.5)
    for _ in range(3 + seed):
        loss = model(torch.randn(8, 4)).pow(2).mean()
        adam.zero_grad()
        sgd.zero_grad()
        loss.backward()
        adam.step()
        sgd.step()
        sched.step()
    return {"model": model, "adam": adam, "sgd": sgd, "sched": sched, "epoch": seed}


def assert_state_dicts_equal(a: Any, b: Any, path: str = "") -> None:
    """Deep equality of two state dicts (tensors by dtype, shape and values)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), path
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{path}: {set(a) ^ set(b)}"
        for k in a:
            assert type(k) is type(next(x for x in b if x == k)), f"{path}/{k}"
            assert_state_dicts_equal(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, list | tuple):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_state_dicts_equal(x, y, f"{path}/{i}")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def test_modules_optimizers_schedulers_restore_in_place(tmp_path: Path) -> None:
    foo, bar = make_run(0), make_run(1)
    for k in ("model", "adam", "sgd", "sched"):
        with pytest.raises(AssertionError):
            assert_state_dicts_equal(foo[k].state_dict(), bar[k].state_dict())
    objects = {k: bar[k] for k in ("model", "adam", "sgd", "sched")}
    with safepoint.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(foo, step=5, epoch=0)
        ckpt = mgr.restore(bar)
    assert ckpt is not None and ckpt.step == 5
    for k, obj in objects.items():
        assert bar[k] is obj  # loaded in place, not replaced
        assert_state_dicts_equal(foo[k].state_dict(), obj.state_dict(), k)
    assert bar["epoch"] == 0
    # optimizer state keeps its int keys, param_groups their values
    state = bar["adam"].state_dict()
    assert all(type(k) is int for k in state["state"])
    assert state["param_groups"][0]["lr"] == foo["adam"].state_dict()["param_groups"][0]["lr"]
    assert bar["sgd"].state_dict()["param_groups"][0]["nesterov"] is True
    # the live parameters are the model's, still wired to the optimizers
    params = list(bar["model"].parameters())
    assert params[0] is bar["adam"].param_groups[0]["params"][0]


def test_training_continues_identically_after_restore(tmp_path: Path) -> None:
    """Restored model+optimizer take the same next step as the originals."""
    foo, bar = make_run(0), make_run(1)
    with safepoint.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save({"model": foo["model"], "adam": foo["adam"]}, step=1)
        mgr.restore({"model": bar["model"], "adam": bar["adam"]})
    x = torch.randn(8, 4)
    for run in (foo, bar):
        run["adam"].zero_grad()
        run["model"](x).pow(2).mean().backward()
        run["adam"].step()
    assert_state_dicts_equal(foo["model"].state_dict(), bar["model"].state_dict())


def test_grad_scaler_roundtrip(tmp_path: Path) -> None:
    try:
        foo = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=7)
        bar = torch.amp.GradScaler("cpu", init_scale=2.0, growth_interval=3)
    except (RuntimeError, TypeError, AttributeError) as exc:
        pytest.skip(f"GradScaler not constructible on CPU here: {exc}")
    assert foo.state_dict() != bar.state_dict()
    with safepoint.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save({"scaler": foo}, step=1)
        mgr.restore({"scaler": bar})
    assert bar.state_dict() == foo.state_dict()


def test_rng_state_restores_every_generator(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.random(), np.random.rand(), torch.rand(1)
    with safepoint.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save({"rng": safepoint.RNGState()}, step=1)
        expected = (
            [random.random() for _ in range(5)],
            random.gauss(0, 1),
            np.random.rand(5).tolist(),
            np.random.randn(3).tolist(),
            torch.rand(5).tolist(),
            torch.randint(0, 1000, (5,)).tolist(),
        )
        random.seed(99)
        np.random.seed(99)
        torch.manual_seed(99)
        mgr.restore({"rng": safepoint.RNGState()})
    actual = (
        [random.random() for _ in range(5)],
        random.gauss(0, 1),
        np.random.rand(5).tolist(),
        np.random.randn(3).tolist(),
        torch.rand(5).tolist(),
        torch.randint(0, 1000, (5,)).tolist(),
    )
    assert actual == expected


def test_rng_state_keeps_pending_gauss(tmp_path: Path) -> None:
    """random.gauss caches its second value; it is part of the state."""
    random.seed(5)
    random.gauss(0, 1)  # leaves gauss_next set
    np.random.seed(5)
    np.random.standard_normal()  # numpy's legacy cached gaussian
    with safepoint.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save({"rng": safepoint.RNGState()}, step=1)
        expected = (random.gauss(0, 1), np.random.standard_normal())
        random.seed(0)
        np.random.seed(0)
        mgr.restore({"rng": safepoint.RNGState()})
    assert (random.gauss(0, 1), np.random.standard_normal()) == expected


def test_wrong_shape_model_is_a_mismatch_and_loads_nothing(tmp_path: Path) -> None:
    foo, bar = make_run(0, hidden=6), make_run(1, hidden=5)
    before = {k: v.clone() for k, v in bar["model"].state_dict().items()}
    adam_before = bar["adam"].state_dict()
    with safepoint.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save({"model": foo["model"], "adam": foo["adam"]}, step=1)
        with pytest.raises(safepoint.StateMismatchError) as info:
            mgr.restore({"model": bar["model"], "adam": bar["adam"]})
    err = info.value
    assert "model/0.weight" in str(err) and "model/0.weight" in " ".join(err.mismatched)
    assert any("model/2.weight" in m for m in err.mismatched)
    assert_state_dicts_equal(before, bar["model"].state_dict())
    assert_state_dicts_equal(adam_before, bar["adam"].state_dict())


def test_missing_and_unexpected_keys_are_listed(tmp_path: Path) -> None:
    torch.manual_seed(0)
    small = nn.Sequential(nn.Linear(3, 3))
    big = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    with safepoint.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save({"model": small, "extra": 1}, step=1)
        with pytest.raises(safepoint.StateMismatchError) as info:
            mgr.restore({"model": big, "lost": np.zeros(2)})
    assert "model/1.weight" in info.value.missing and "model/1.bias" in info.value.missing
    assert "lost" in info.value.missing
    assert "model/1.weight" in str(info.value)


def test_strict_false_loads_what_matches(tmp_path: Path) -> None:
    torch.manual_seed(0)
    small = nn.Sequential(nn.Linear(3, 3))
    torch.manual_seed(1)
    big = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    untouched = big[1].weight.detach().clone()
    with safepoint.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save({"model": small}, step=1)
        with pytest.warns(StateMismatchWarning, match=r"model/1\.weight"):
            mgr.restore({"model": big}, strict=False)
    assert torch.equal(big[0].weight, small[0].weight)
    assert torch.equal(big[0].bias, small[0].bias)
    assert torch.equal(big[1].weight, untouched)


def test_arrays_and_tensors_in_state_are_copied_in_place(tmp_path: Path) -> None:
    saved = {"np": np.arange(4.0), "t": torch.arange(3.0), "n": 7}
    target = {"np": np.zeros(4), "t": torch.zeros(3), "n": 0}
    np_obj, t_obj = target["np"], target["t"]
    with safepoint.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(saved, step=1)
        ckpt = mgr.restore(target)
    assert target["np"] is np_obj and np.array_equal(np_obj, saved["np"])
    assert target["t"] is t_obj and torch.equal(t_obj, saved["t"])
    assert target["n"] == 7
    assert ckpt is not None and ckpt.state["n"] == 7


def test_optimizer_mismatch_loads_nothing(tmp_path: Path) -> None:
    """An optimizer with other param groups must fail before the model is touched."""
    torch.manual_seed(0)
    saved_model = nn.Linear(3, 2)
    saved_opt = torch.optim.SGD(
        [{"params": [saved_model.weight]}, {"params": [saved_model.bias]}], lr=0.1
    )
    torch.manual_seed(1)
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with safepoint.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save({"model": saved_model, "opt": saved_opt}, step=1)
        with pytest.raises(safepoint.StateMismatchError) as info:
            mgr.restore({"model": model, "opt": opt})
    assert any("opt/param_groups" in m for m in info.value.mismatched)
    assert_state_dicts_equal(before, model.state_dict())
    assert opt.param_groups[0]["lr"] == 0.5


def test_strict_false_skips_mismatched_shapes(tmp_path: Path) -> None:
    """A changed head (fine-tuning) must not stop the matching layers from loading."""
    torch.manual_seed(0)
    saved = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1))
    torch.manual_seed(1)
    target = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    head = target[1].weight.detach().clone()
    with safepoint.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save({"model": saved}, step=1)
        with pytest.raises(safepoint.StateMismatchError):
            mgr.restore({"model": target})
        with pytest.warns(StateMismatchWarning, match=r"model/1\.weight"):
            mgr.restore({"model": target}, strict=False)
    assert torch.equal(target[0].weight, saved[0].weight)
    assert torch.equal(target[0].bias, saved[0].bias)
    assert torch.equal(target[1].weight, head)


def test_objects_in_lists_and_tuples_restore_in_place(tmp_path: Path) -> None:
    """A GAN keeps [generator, discriminator]: both must be restored, in place."""
    torch.manual_seed(0)
    saved = {"models": [nn.Linear(2, 2), nn.Linear(2, 3)], "pair": (nn.Linear(1, 1), 5)}
    torch.manual_seed(1)
    models = [nn.Linear(2, 2), nn.Linear(2, 3)]
    pair_module = nn.Linear(1, 1)
    target = {"models": list(models), "pair": (pair_module, 0), "history": [1.0]}
    models_list = target["models"]
    with safepoint.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save({**saved, "history": [0.5, 0.4]}, step=1)
        mgr.restore(target)
    assert target["models"] is models_list
    for live, want in zip(models, saved["models"], strict=True):
        assert torch.equal(live.weight, want.weight) and torch.equal(live.bias, want.bias)
    assert target["pair"][0] is pair_module and target["pair"][1] == 5
    assert torch.equal(pair_module.weight, saved["pair"][0].weight)
    assert target["history"] == [0.5, 0.4]  # plain lists may change length


def test_list_of_modules_with_other_length_is_a_mismatch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    models = [nn.Linear(2, 2)]
    before = models[0].weight.detach().clone()
    with safepoint.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save({"models": [nn.Linear(2, 2), nn.Linear(2, 2)]}, step=1)
        with pytest.raises(safepoint.StateMismatchError, match="models"):
            mgr.restore({"models": models})
    assert torch.equal(models[0].weight, before)
