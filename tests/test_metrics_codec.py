"""Metrics are user data: any name and any number round-trip, and damage costs only them."""

from __future__ import annotations

import json
import logging
import math
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import safepoint
from safepoint.cli import main
from safepoint.errors import ConfigError
from safepoint.ondisk import manifest
from safepoint.storage import runlog
from safepoint.storage.local import LocalStorage
from safepoint_testing import examples

GOLDEN = Path(__file__).parent / "data" / "metrics_v0"


def _same(a: Any, b: Any) -> bool:
    """Exact equality: NaN equals NaN, -0.0 differs from 0.0, 1 differs from 1.0/True."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return struct.pack("<d", a) == struct.pack("<d", b) or (math.isnan(a) and math.isnan(b))
    return bool(a == b)


def _same_metrics(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)


def _state(v: float) -> dict[str, Any]:
    return {"w": np.full(3, v, dtype=np.float32)}


@pytest.mark.parametrize(
    "metrics",
    [
        {"$lr": 0.1, "loss": 0.5},
        {"$float": 0.5},
        {"$float": "nan"},
        {"$int": 3},
        {"$tensor": "w"},
        {"$dict": 1.0},
        {"$stateful": 1, "state": 2},
    ],
)
def test_dollar_metric_names_keep_every_checkpoint_visible(
    tmp_path: Path, metrics: dict[str, Any]
) -> None:
    with safepoint.CheckpointManager(tmp_path) as mgr:
        mgr.save(_state(1.0), step=1, metrics=metrics)
        mgr.save(_state(2.0), step=2, metrics={"loss": 0.25})
    mgr = safepoint.CheckpointManager(tmp_path)
    listed = mgr.checkpoints()
    assert [c.step for c in listed] == [1, 2]
    assert _same_metrics(listed[0].metrics, metrics)
    restored = mgr.restore(checkpoint=listed[0].name)
    assert restored is not None and _same_metrics(restored.metrics, metrics)
    assert main(["ls", str(tmp_path)]) == 0


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (np.float64("nan"), math.nan),
        (np.float64("inf"), math.inf),
        (np.float32("-inf"), -math.inf),
        (np.float16(-0.0), -0.0),
        (np.float32(0.1), float(np.float32(0.1))),
        (np.longdouble(0.5), 0.5),
        (np.int64(-7), -7),
        (np.uint64(2**64 - 1), 2**64 - 1),
        (np.int8(3), 3),
        (np.bool_(True), True),
        (np.array(2.5), 2.5),
        (np.array([3], dtype=np.int32), 3),
        (2**5000 + 1, 2**5000 + 1),
        (-(2**70), -(2**70)),
        (False, False),
    ],
)
def test_numpy_and_extreme_values_round_trip_as_python_numbers(
    tmp_path: Path, value: Any, expected: Any
) -> None:
    with safepoint.CheckpointManager(tmp_path, keep=safepoint.Keep(last=1)) as mgr:
        saved = mgr.save(_state(1.0), step=1, metrics={"m": value})
        assert _same(saved.metrics["m"], expected)
    mgr = safepoint.CheckpointManager(tmp_path)
    (ckpt,) = mgr.checkpoints()
    assert _same(ckpt.metrics["m"], expected)
    restored = mgr.restore()
    assert restored is not None and _same(restored.metrics["m"], expected)
    # The run log receives the same plain Python value (spelled by its own encoder).
    (line,) = [e for e in runlog.read(LocalStorage(str(tmp_path))) if e["event"] == "save"]
    logged = line["metrics"]["m"]
    if isinstance(expected, float) and (math.isnan(expected) or math.isinf(expected)):
        assert logged == {"$float": repr(expected)}
    elif isinstance(expected, int) and expected.bit_length() > 4096:
        assert logged == {"$int": hex(expected)}
    elif expected == 0.0 and isinstance(expected, float):
        assert logged == {"$float": "-0.0"}
    else:
        assert _same(logged, expected)


def test_a_nan_numpy_metric_leaves_the_checkpoint_restorable_as_latest(tmp_path: Path) -> None:
    losses = np.array([1.0, np.nan, 2.0])  # a diverged loss
    with safepoint.CheckpointManager(tmp_path) as mgr:
        mgr.save(_state(1.0), step=1, metrics={"loss": 0.5})
        mgr.save(_state(2.0), step=2, metrics={"loss": np.mean(losses)})  # nan
    restored = safepoint.CheckpointManager(tmp_path).restore()
    assert restored is not None and restored.step == 2
    assert math.isnan(restored.metrics["loss"])
    assert restored.state["w"][0] == 2.0


@pytest.mark.parametrize(
    "value",
    [1 + 2j, np.complex64(1), np.zeros(2), object(), np.timedelta64(5, "s"), np.datetime64(0, "s")],
)
def test_values_that_are_not_real_numbers_are_refused_before_io(tmp_path: Path, value: Any) -> None:
    with safepoint.CheckpointManager(tmp_path) as mgr:
        with pytest.raises(ConfigError, match="Metric 'm'"):
            mgr.save(_state(1.0), step=1, metrics={"m": value})
        assert mgr.checkpoints() == []


def _rewrite_metrics(ckpt_dir: Path, metrics_node: Any) -> None:
    """Replace the manifest's metrics object with a valid checksum (a writer's damage)."""
    path = ckpt_dir / manifest.NAME
    body = json.loads(path.read_text())
    body["metrics"] = metrics_node
    body["checksum"] = manifest._body_digest(body)
    path.write_text(json.dumps(body))


@pytest.mark.parametrize(
    "node",
    [
        {"loss": {"$float": "bogus"}},
        {"loss": {"$tensor": "w"}},  # was a corrupt checkpoint; now only its metrics are lost
        {"loss": {"$int": "xyz"}},
        {"loss": [1, 2]},
        {"loss": {"nested": 1.0}},
        {"$dict": [["a", 1], ["a", 2]]},
        {"$dict": [[1, 2]]},
        [1, 2],
        "text",
        None,
    ],
)
def test_damaged_metrics_cost_only_the_metrics(
    tmp_path: Path, node: Any, caplog: pytest.LogCaptureFixture
) -> None:
    with safepoint.CheckpointManager(tmp_path) as mgr:
        first = mgr.save(_state(1.0), step=1, metrics={"loss": 0.5})
        mgr.save(_state(2.0), step=2, metrics={"loss": 0.25})
    _rewrite_metrics(tmp_path / first.name, node)
    caplog.set_level(logging.WARNING, logger="safepoint")
    mgr = safepoint.CheckpointManager(tmp_path)
    listed = mgr.checkpoints()
    assert [(c.step, c.metrics) for c in listed] == [(1, {}), (2, {"loss": 0.25})]
    assert "listing it without metrics" in caplog.text
    restored = mgr.restore(checkpoint=first.name)
    assert restored is not None and restored.state["w"][0] == 1.0
    with safepoint.CheckpointManager(tmp_path) as again:  # the root still takes saves
        assert again.save(_state(3.0), step=3).seq == 3


def test_manifests_of_the_old_encoding_load_the_same(tmp_path: Path) -> None:
    """tests/data/metrics_v0: written by safepoint before this codec (see its README)."""
    root = tmp_path / "run"
    shutil.copytree(GOLDEN, root)
    mgr = safepoint.CheckpointManager(root)
    listed = mgr.checkpoints()
    assert [c.step for c in listed] == [1, 2, 3]
    expected = {
        "loss": 0.25,
        "acc": 1,
        "flag": True,
        "note": "text",
        "none": None,
        "inf": math.inf,
        "ninf": -math.inf,
        "nan": math.nan,
        "negzero": -0.0,
        "big": 2**5000 + 7,
        "ünï": 1.5,
        "": 2.0,
        "np32": float(np.float32(0.1)),
    }
    assert _same_metrics(listed[0].metrics, expected)
    # These two were hidden by the old reader; their manifests were always complete.
    assert _same_metrics(listed[1].metrics, {"$lr": 0.1, "loss": 0.5})
    assert _same_metrics(listed[2].metrics, {"loss": math.nan})
    for ckpt in listed:
        restored = mgr.restore(checkpoint=ckpt.name)
        assert restored is not None
        assert restored.state["w"].tolist() == [0.0, 1.0, 2.0]


_names = st.one_of(st.text(max_size=12), st.text(max_size=8).map(lambda s: "$" + s))
_values = st.one_of(
    st.none(),
    st.booleans(),
    st.text(max_size=8),
    st.integers(),
    st.integers(min_value=2**4000, max_value=2**4200),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([-0.0, math.nan, math.inf, -math.inf]),
    st.floats(width=32).map(np.float32),
    st.floats().map(np.float64),
    st.integers(-(2**63), 2**63 - 1).map(np.int64),
    st.booleans().map(np.bool_),
)


@settings(max_examples=examples(40), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(_names, _values, max_size=6))
def test_any_metrics_round_trip_through_a_manifest(metrics: dict[str, Any]) -> None:
    expected = {k: _plain(v) for k, v in metrics.items()}
    with tempfile.TemporaryDirectory() as root:
        with safepoint.CheckpointManager(root) as mgr:
            saved = mgr.save(_state(1.0), step=1, metrics=metrics)
        assert _same_metrics(saved.metrics, expected)
        (listed,) = safepoint.CheckpointManager(root).checkpoints()
        assert _same_metrics(listed.metrics, expected)


def _plain(v: Any) -> Any:
    if isinstance(v, np.bool_):
        return bool(v)
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.floating):
        return float(v)
    return v


def test_odd_metric_names_round_trip(tmp_path: Path) -> None:
    metrics = {"": 1.0, "\x00": 2, "k\ud800": 3.5, "ünï/%": -1, "a" * 300: 0.5, "$": 7}
    with safepoint.CheckpointManager(tmp_path) as mgr:
        mgr.save(_state(1.0), step=1, metrics=metrics)
    (ckpt,) = safepoint.CheckpointManager(tmp_path).checkpoints()
    assert _same_metrics(ckpt.metrics, metrics)
