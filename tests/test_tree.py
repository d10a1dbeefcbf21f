"""The state tree codec, through a real save and restore.

Property tests build random nested states out of every leaf type the codec accepts
and check that a checkpoint gives back exactly the same structure, types and bytes;
the unsupported leaves must be refused before anything touches the disk.
"""

from __future__ import annotations

import itertools
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import safepoint
from safepoint.state import dtypes
from safepoint_testing import assert_same, listing, tensor_bytes

_counter = itertools.count()

NUMPY_DTYPES = [np.dtype(d.numpy) for d in dtypes.BY_NAME.values() if d.numpy is not None]


def roundtrip(tmp_path: Path, state: Any, *, format: str = "safetensors") -> Any:
    """Save ``state`` in a fresh root and return what a restore gives back."""
    root = tmp_path / f"r{next(_counter)}"
    with safepoint.CheckpointManager(root, format=format) as mgr:
        mgr.save(state, step=1)
        ckpt = mgr.restore()
    assert ckpt is not None
    return ckpt.state


# ------------------------------------------------------------------- strategies
big_ints = st.one_of(
    st.integers(),
    st.integers(min_value=2**64, max_value=2**70),
    st.integers(min_value=2**5000, max_value=2**5010),
    st.integers(min_value=-(2**5010), max_value=-(2**5000)),
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    big_ints,
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([-0.0, 0.0, math.inf, -math.inf, math.nan]),
    st.text(max_size=8),
)
np_arrays = st.sampled_from(NUMPY_DTYPES).flatmap(
    lambda dt: hnp.arrays(dt, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4))
)
np_scalars = st.sampled_from(NUMPY_DTYPES).flatmap(
    lambda dt: hnp.arrays(dt, ()).map(lambda a: a[()])
)
keys = st.one_of(
    st.text(max_size=6),
    st.text(max_size=5).map(lambda s: "$" + s),
    st.sampled_from(["$tensor", "$tuple", "$dict", "$float", "$int", "$stateful"]),
    st.integers(min_value=-(2**70), max_value=2**70),
)
leaves = st.one_of(scalars, np_arrays, np_scalars)
trees = st.recursive(
    leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=4).map(tuple),
        st.dictionaries(keys, children, max_size=4),
    ),
    max_leaves=20,
)


@given(state=trees)
def test_random_trees_roundtrip_exactly(tmp_path: Path, state: Any) -> None:
    assert_same(state, roundtrip(tmp_path, {"s": state})["s"])


def test_special_floats_keep_their_sign_and_nan(tmp_path: Path) -> None:
    state = {"f": [math.nan, math.inf, -math.inf, -0.0, 0.0, 5e-324, 1.7976931348623157e308]}
    back = roundtrip(tmp_path, state)["f"]
    assert math.isnan(back[0])
    assert back[1] == math.inf and back[2] == -math.inf
    assert math.copysign(1.0, back[3]) == -1.0 and back[3] == 0.0
    assert math.copysign(1.0, back[4]) == 1.0
    assert back[5:] == state["f"][5:]


def test_big_ints_and_int_keys(tmp_path: Path) -> None:
    state = {
        "big": 2**64 + 1,
        "huge": 2**5001 + 7,
        "neg": -(2**5003),
        "ints": {1: "a", -2: "b", 2**65: "c"},
        "mixed": {1: "int", "1": "str"},
        "$tensor": "not a tag",
    }
    back = roundtrip(tmp_path, state)
    assert_same(state, back)
    assert set(back["mixed"]) == {1, "1"}


def test_huge_int_dict_key_roundtrips(tmp_path: Path) -> None:
    """An int key past Python's 4300-digit str limit must not break the manifest."""
    state = {"d": {2**20000 + 3: "x", -(2**20000): "y"}}
    assert_same(state, roundtrip(tmp_path, state))


def test_lists_and_tuples_stay_distinct(tmp_path: Path) -> None:
    state = {"l": [1, (2, [3, ()]), []], "t": ((), (1,), [()])}
    assert_same(state, roundtrip(tmp_path, state))


@pytest.mark.parametrize("dtype", NUMPY_DTYPES, ids=str)
def test_every_numpy_dtype_roundtrips(tmp_path: Path, dtype: np.dtype) -> None:
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, size=6 * dtype.itemsize, dtype=np.uint8)
    state = {
        "a": raw.view(dtype).reshape(2, 3) if dtype != np.bool_ else raw.astype(bool)[:6],
        "zero_d": np.zeros((), dtype=dtype),
        "empty": np.zeros((0, 4), dtype=dtype),
        "scalar": np.zeros((), dtype=dtype)[()],
    }
    back = roundtrip(tmp_path, state)
    assert_same(state, back)
    assert type(back["scalar"]) is dtype.type


def test_non_contiguous_and_big_endian_numpy(tmp_path: Path) -> None:
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    state = {"t": base.T, "s": base[::2, 1::3], "be": np.arange(5, dtype=">i4")}
    back = roundtrip(tmp_path, state)
    assert_same(state, back)
    np.testing.assert_array_equal(back["be"], np.arange(5))


# ------------------------------------------------------------------- torch
TORCH_DTYPE_NAMES = [d.torch for d in dtypes.BY_NAME.values() if d.torch]


def _random_tensor(torch: Any, name: str, shape: tuple[int, ...], seed: int) -> Any:
    """A tensor of dtype ``name`` filled with random bytes (valid for every dtype)."""
    dt = getattr(torch, name)
    itemsize = dt.itemsize
    gen = torch.Generator().manual_seed(seed)
    n = math.prod(shape) * itemsize
    raw = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen)
    if dt == torch.bool:
        return (raw % 2).bool().reshape(shape)
    return raw.view(dt).reshape(shape)


# torch warns whenever it allocates a complex32 tensor (a .contiguous() copy included).
complex32_warning = pytest.mark.filterwarnings(
    "ignore:ComplexHalf support is experimental:UserWarning"
)


@complex32_warning
@pytest.mark.parametrize("name", TORCH_DTYPE_NAMES)
def test_every_torch_dtype_roundtrips_as_torch(tmp_path: Path, name: str) -> None:
    torch = pytest.importorskip("torch")
    if not hasattr(torch, name):
        pytest.skip(f"this torch has no {name}")
    t = _random_tensor(torch, name, (3, 4), 1)
    state = {"t": t, "zero_d": _random_tensor(torch, name, (), 2), "empty": t[:0]}
    back = roundtrip(tmp_path, state)
    for k in state:
        assert isinstance(back[k], torch.Tensor)
        assert back[k].dtype == state[k].dtype
        assert tensor_bytes(back[k]) == tensor_bytes(state[k])
    assert_same(state, back)


@complex32_warning
@given(
    data=st.data(),
    name=st.sampled_from(TORCH_DTYPE_NAMES),
    shape=st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple),
)
def test_random_torch_tensors_roundtrip(
    tmp_path: Path, data: st.DataObject, name: str, shape: tuple[int, ...]
) -> None:
    torch = pytest.importorskip("torch")
    if not hasattr(torch, name):
        return
    t = _random_tensor(torch, name, shape, data.draw(st.integers(0, 2**31)))
    views = {"t": t}
    if t.dim() >= 2:
        views["T"] = t.transpose(0, 1)
    if t.dim() >= 1 and t.shape[0] > 1:
        views["slice"] = t[::2]
    assert_same(views, roundtrip(tmp_path, views))


def test_non_contiguous_tensors_and_shared_references(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    base = torch.arange(60, dtype=torch.float64).reshape(3, 4, 5)
    state = {
        "base": base,
        "again": base,
        "T": base.transpose(0, 2),
        "slice": base[:, 1:3, ::2],
        "narrow": base.select(1, 2),
        "expanded": torch.ones(1, 3).expand(4, 3),
    }
    assert not state["T"].is_contiguous() and not state["slice"].is_contiguous()
    back = roundtrip(tmp_path, state)
    assert_same(state, back)
    assert back["base"] is back["again"]  # one tensor, one entry, one object back
    back["base"][0, 0, 0] = -1.0
    assert back["again"][0, 0, 0] == -1.0


def test_requires_grad_is_kept(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    state = {"w": torch.randn(3, 2, requires_grad=True), "b": torch.zeros(2)}
    back = roundtrip(tmp_path, state)
    assert back["w"].requires_grad and back["w"].is_leaf
    assert not back["b"].requires_grad
    assert_same(state, back)


# ------------------------------------------------------------------- unsupported leaves
class _Opaque:
    pass


@pytest.mark.parametrize(
    ("value", "path"),
    [
        (lambda x: x, "model/head/fn"),
        (_Opaque(), "model/head/fn"),
        ({1, 2}, "model/head/fn"),
        (frozenset({1}), "model/head/fn"),
        (np.array([object(), 1], dtype=object), "model/head/fn"),
        (np.array(["a", "bc"]), "model/head/fn"),
        (np.array([b"a"]), "model/head/fn"),
        (b"bytes", "model/head/fn"),
        (1 + 2j, "model/head/fn"),
        (np.ma.masked_array([1.0, 2.0], mask=[0, 1]), "model/head/fn"),
    ],
    ids=[
        "lambda",
        "object",
        "set",
        "frozenset",
        "object-array",
        "str-array",
        "bytes-array",
        "bytes",
        "complex",
        "masked-array",
    ],
)
def test_unsupported_leaf_is_refused_before_io(tmp_path: Path, value: Any, path: str) -> None:
    root = tmp_path / "root"
    mgr = safepoint.CheckpointManager(root)
    state = {"model": {"head": {"fn": value, "ok": 1}}, "x": np.ones(3)}
    with pytest.raises(safepoint.ConfigError) as info:
        mgr.save(state, step=1)
    assert path in str(info.value)
    assert not root.exists(), listing(root)


def test_unsupported_leaf_in_list_names_index(tmp_path: Path) -> None:
    root = tmp_path / "root"
    with pytest.raises(safepoint.ConfigError, match=r"opt/groups/1"):
        safepoint.CheckpointManager(root).save({"opt": {"groups": [1, {2}]}}, step=1)
    assert not root.exists()


def test_cycles_and_bad_keys_are_config_errors(tmp_path: Path) -> None:
    root = tmp_path / "root"
    cyc: dict[str, Any] = {}
    cyc["self"] = cyc
    mgr = safepoint.CheckpointManager(root)
    for bad in [cyc, {"d": {(1, 2): 3}}, {"d": {True: 1}}, {"d": {1.5: 1}}]:
        with pytest.raises(safepoint.ConfigError):
            mgr.save(bad, step=1)
    assert not root.exists()


def test_tensor_under_huge_int_key(tmp_path: Path) -> None:
    """Key paths of tensors are built from the keys; a huge int key must not break them."""
    state = {2**20000: np.arange(3), "x": {2**20000 + 1: [np.ones(2)]}}
    assert_same(state, roundtrip(tmp_path, state))


def test_strings_with_lone_surrogates_roundtrip(tmp_path: Path) -> None:
    """os.fsdecode() of an undecodable file name yields lone surrogates: valid state."""
    name = os.fsdecode(b"data-\xff.bin")
    state = {"file": name, name: 1, "\ud800": [np.arange(2)]}
    assert_same(state, roundtrip(tmp_path, state))


@complex32_warning
def test_every_dtype_and_odd_key_roundtrips_in_hdf5(tmp_path: Path) -> None:
    """The HDF5 payload holds the same leaves as safetensors, byte for byte."""
    pytest.importorskip("h5py")
    torch = pytest.importorskip("torch")
    state: dict[Any, Any] = {os.fsdecode(b"key-\xff"): np.arange(3), 2**20000: [1.5]}
    for i, dtype in enumerate(NUMPY_DTYPES):
        raw = np.random.default_rng(i).integers(0, 256, 6 * dtype.itemsize, dtype=np.uint8)
        arr = (raw.view(dtype) if dtype != np.bool_ else raw.astype(bool)[:6]).reshape(2, 3)
        state[f"np-{dtype}"] = {"a": arr, "T": arr.T, "e": arr[:0], "s": arr[0, 0]}
    for i, name in enumerate(TORCH_DTYPE_NAMES):
        if hasattr(torch, name):
            t = _random_tensor(torch, name, (2, 3), i)
            state[f"torch-{name}"] = {"t": t, "T": t.t(), "e": t[:0], "z": t[0, 0]}
    assert_same(state, roundtrip(tmp_path, state, format="hdf5"))
