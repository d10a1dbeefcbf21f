"""Restore refuses what does not fit (another optimizer class) and matches what does
(a torch.compile'd or DataParallel model), and strict=False names what it skipped."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import safepoint  # noqa: E402
from safepoint import StateMismatchWarning  # noqa: E402


def _model(seed: int, out: int = 2) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, out))


def _equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = list(a.parameters()), list(b.parameters())
    return len(sa) == len(sb) and all(torch.equal(x, y) for x, y in zip(sa, sb, strict=True))


@pytest.fixture(scope="module")
def compile_model():  # type: ignore[no-untyped-def]
    # torch.compile only wraps (an OptimizedModule whose keys start with _orig_mod.);
    # nothing is compiled until a forward pass, which these tests never run. Importing
    # torch._dynamo trips torch's own DeprecationWarnings (torch.jit.script_method).
    def wrap(model: nn.Module) -> nn.Module:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.compile(model)  # type: ignore[no-any-return]

    return wrap


@pytest.mark.heavy
def test_plain_checkpoint_restores_into_a_compiled_model(tmp_path: Path, compile_model) -> None:  # type: ignore[no-untyped-def]
    saved, fresh = _model(0), _model(1)
    compiled = compile_model(fresh)
    assert next(iter(compiled.state_dict())).startswith("_orig_mod.")
    with safepoint.CheckpointManager(tmp_path) as mgr:
        mgr.save({"model": saved}, step=1)
        mgr.restore({"model": compiled})  # strict: every key matched across the prefix
    assert _equal(fresh, saved)


def test_compiled_checkpoint_restores_into_a_plain_model(tmp_path: Path, compile_model) -> None:  # type: ignore[no-untyped-def]
    saved, fresh = _model(0), _model(1)
    with safepoint.CheckpointManager(tmp_path) as mgr:
        mgr.save({"model": compile_model(saved)}, step=1)
        mgr.restore({"model": fresh})
    assert _equal(fresh, saved)


def test_strict_false_into_a_compiled_model_loads_the_fitting_keys_and_warns(
    tmp_path: Path,
    compile_model,  # type: ignore[no-untyped-def]
) -> None:
    saved, fresh = _model(0, out=2), _model(1, out=5)  # another head: fine-tuning
    head = fresh[2].weight.detach().clone()
    compiled = compile_model(fresh)
    with safepoint.CheckpointManager(tmp_path) as mgr:
        mgr.save({"model": saved}, step=1)
        with pytest.raises(safepoint.StateMismatchError, match=r"model/_orig_mod\.2\.weight"):
            mgr.restore({"model": compiled})
        with pytest.warns(StateMismatchWarning, match=r"_orig_mod\.2\.weight") as seen:
            mgr.restore({"model": compiled}, strict=False)
    assert "torch.compile" in str(seen[0].message)
    assert torch.equal(fresh[0].weight, saved[0].weight)
    assert torch.equal(fresh[2].weight, head)


def test_strict_false_warns_about_every_key_it_skips(tmp_path: Path) -> None:
    with safepoint.CheckpointManager(tmp_path) as mgr:
        mgr.save({"model": nn.Linear(2, 2)}, step=1)
        target = {"model": nn.Sequential(nn.Linear(2, 2)), "extra": np.zeros(1)}
        with pytest.warns(StateMismatchWarning) as seen:
            mgr.restore(target, strict=False)
    text = str(seen[0].message)
    for key in ("model/0.weight", "model/0.bias", "model/weight", "model/bias", "extra"):
        assert key in text


def test_data_parallel_prefix_is_matched_both_ways(tmp_path: Path) -> None:
    saved, fresh = _model(0), _model(1)
    with safepoint.CheckpointManager(tmp_path / "a") as mgr:
        mgr.save({"model": nn.DataParallel(saved)}, step=1)
        mgr.restore({"model": fresh})
    assert _equal(fresh, saved)
    other = _model(2)
    wrapped = nn.DataParallel(other)
    with safepoint.CheckpointManager(tmp_path / "b") as mgr:
        mgr.save({"model": saved}, step=1)
        mgr.restore({"model": wrapped})
    assert _equal(other, saved)


# -- the class of each stateful object ------------------------------------------------------
def _adam_run(tmp_path: Path) -> nn.Module:
    model = _model(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    with safepoint.CheckpointManager(tmp_path) as mgr:
        mgr.save({"model": model, "optimizer": opt}, step=1)
    return model


def test_adam_checkpoint_into_sgd_is_refused_naming_both(tmp_path: Path) -> None:
    _adam_run(tmp_path)
    model = _model(1)
    before = [p.detach().clone() for p in model.parameters()]
    sgd = torch.optim.SGD(model.parameters(), lr=0.5)
    with pytest.raises(safepoint.StateMismatchError) as err:
        safepoint.CheckpointManager(tmp_path).restore({"model": model, "optimizer": sgd})
    text = str(err.value)
    assert "torch.optim.adam.Adam" in text and "torch.optim.sgd.SGD" in text
    assert "nothing was loaded" in text and "optimizer" in err.value.mismatched[0]
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert sgd.param_groups[0]["lr"] == 0.5 and not sgd.state


def test_adam_checkpoint_into_sgd_non_strict_skips_the_optimizer_and_warns(
    tmp_path: Path,
) -> None:
    saved = _adam_run(tmp_path)
    model = _model(1)
    sgd = torch.optim.SGD(model.parameters(), lr=0.5)
    with pytest.warns(StateMismatchWarning, match="torch.optim.adam.Adam"):
        safepoint.CheckpointManager(tmp_path).restore(
            {"model": model, "optimizer": sgd}, strict=False
        )
    assert _equal(model, saved)
    assert sgd.param_groups[0]["lr"] == 0.5 and "betas" not in sgd.param_groups[0]


def test_same_optimizer_class_still_restores(tmp_path: Path) -> None:
    _adam_run(tmp_path)
    model = _model(1)
    adam = torch.optim.Adam(model.parameters(), lr=0.5)
    safepoint.CheckpointManager(tmp_path).restore({"model": model, "optimizer": adam})
    assert adam.param_groups[0]["lr"] == 1e-3 and len(adam.state) == 4


def test_scheduler_of_another_class_is_refused(tmp_path: Path) -> None:
    opt = torch.optim.SGD(_model(0).parameters(), lr=0.1)
    step_lr = torch.optim.lr_scheduler.StepLR(opt, step_size=2)
    with safepoint.CheckpointManager(tmp_path) as mgr:
        mgr.save({"sched": step_lr}, step=1)
        other = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.5)
        with pytest.raises(safepoint.StateMismatchError, match=r"StepLR.*ExponentialLR"):
            mgr.restore({"sched": other})


def test_numpy_random_state_into_a_generator_is_refused_before_loading(tmp_path: Path) -> None:
    with safepoint.CheckpointManager(tmp_path) as mgr:
        mgr.save({"w": np.ones(2), "rng": np.random.RandomState(0)}, step=1)
        target = {"w": np.zeros(2), "rng": np.random.default_rng(0)}
        with pytest.raises(safepoint.StateMismatchError, match=r"RandomState.*Generator"):
            mgr.restore(target)
    assert target["w"].tolist() == [0.0, 0.0]


def test_optimizer_with_other_groups_non_strict_is_skipped_with_a_warning(
    tmp_path: Path,
) -> None:
    saved = _model(0)
    groups = [{"params": [p]} for p in saved.parameters()]
    with safepoint.CheckpointManager(tmp_path) as mgr:
        mgr.save({"model": saved, "opt": torch.optim.SGD(groups, lr=0.1)}, step=1)
        model = _model(1)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        with pytest.warns(StateMismatchWarning, match="opt/param_groups"):
            mgr.restore({"model": model, "opt": opt}, strict=False)
    assert _equal(model, saved) and opt.param_groups[0]["lr"] == 0.5


def test_a_plain_value_where_the_target_has_a_tensor_is_a_mismatch(tmp_path: Path) -> None:
    with safepoint.CheckpointManager(tmp_path) as mgr:
        mgr.save({"ema": None, "w": torch.ones(2)}, step=1)
        target = {"ema": torch.zeros(3), "w": torch.zeros(2)}
        with pytest.raises(safepoint.StateMismatchError, match=r"ema \(checkpoint holds NoneType"):
            mgr.restore(target)
        assert target["w"].tolist() == [0.0, 0.0] and target["ema"] is not None
        with pytest.warns(StateMismatchWarning, match="ema"):
            mgr.restore(target, strict=False)
    assert target["w"].tolist() == [1.0, 1.0] and target["ema"].tolist() == [0.0, 0.0, 0.0]
