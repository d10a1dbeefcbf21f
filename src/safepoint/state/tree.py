"""The state tree codec: any nested training state <-> (JSON tree, tensor leaves).

Saving flattens the user's state into a JSON-compatible tree in which every tensor
is replaced by a reference ``{"$tensor": key}``; the tensors themselves go to a
payload format. Loading rebuilds the exact Python structure. JSON cannot tell a
tuple from a list, an int key from a str key, or spell NaN, so those few cases get
tagged nodes (one key starting with ``$``)::

    {"$tuple": [...]}                       a tuple
    {"$dict": [[key, value], ...]}          a dict with non-str keys (or a "$" key)
    {"$float": "nan" | "inf" | "-inf" | "-0.0"}
    {"$int": "<hex>"}                       an int too large for JSON readers
    {"$stateful": "<class>", "state": ...}  an object saved through state_dict()
    {"$tensor": "<key>"}                    a tensor in the payload

No value is ever pickled: a leaf that is none of the above is a ``ConfigError``
naming its key path, when saving; a node that is none of the above is a
``CorruptCheckpointError`` when loading.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from safepoint.errors import ConfigError, CorruptCheckpointError
from safepoint.state import dtypes
from safepoint.state.dtypes import DType
from safepoint.state.stateful import view

#: Deepest nesting accepted, both ways; deeper trees are a bomb, not training state.
MAX_DEPTH = 200
_BIG_INT_BITS = 4096


@dataclass(frozen=True)
class TensorLeaf:
    """One tensor found in the state, with where it came from and how to spell it."""

    key: str
    dtype: DType
    shape: tuple[int, ...]
    lib: str  # "numpy" | "numpy-scalar" | "torch"
    source: Any  # the live array/tensor; read only when the payload is written
    requires_grad: bool = False

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def buffer(self) -> memoryview:
        """The tensor's bytes as a flat ``uint8`` view, copied only if not contiguous."""
        return as_bytes(self.source)

    def entry(self) -> dict[str, Any]:
        """The tensor's record in the manifest (without its file location)."""
        out: dict[str, Any] = {"dtype": self.dtype.name, "shape": list(self.shape), "lib": self.lib}
        if self.requires_grad:
            out["requires_grad"] = True
        return out


class SavedState(dict):  # type: ignore[type-arg]
    """The ``state_dict()`` of an object saved through it: a plain dict that also knows
    the class it came from (``saved_class``, ``"module.QualName"``), so that restoring an
    Adam's state into an SGD is refused instead of loaded."""

    saved_class: str = ""


def is_stateful(obj: object) -> bool:
    """True for objects that follow the ``state_dict``/``load_state_dict`` protocol."""
    return callable(getattr(obj, "state_dict", None)) and callable(
        getattr(obj, "load_state_dict", None)
    )


def is_torch_tensor(obj: object) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.Tensor)


def as_bytes(source: Any) -> memoryview:
    """Flat ``uint8`` view of an array or tensor, copying only non-contiguous data."""
    if isinstance(source, np.ndarray):
        arr = np.ascontiguousarray(source)
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("="))
        return arr.reshape(-1).view(np.uint8).data
    tensor = source.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    torch = sys.modules["torch"]  # loaded: ``source`` is one of its tensors

    tensor = tensor.contiguous().reshape(-1)
    if tensor.numel() == 1 and tensor.stride(0) != 1:
        # torch calls a one-element tensor contiguous whatever its stride (t[::2] of a
        # length-2 tensor), and view() to uint8 refuses a stride other than 1.
        tensor = tensor.clone(memory_format=torch.contiguous_format)
    if tensor.dtype != torch.uint8:
        tensor = tensor.view(torch.uint8)
    return memoryview(tensor.numpy())


def _part_text(part: object) -> str:
    # An int key past Python's int/str digit limit cannot be str()-ed: spell it in hex.
    if isinstance(part, int) and part.bit_length() > _BIG_INT_BITS:
        return hex(part)
    return str(part)


def _path_str(path: tuple[object, ...]) -> str:
    return "/".join(_part_text(p) for p in path) or "<root>"


def _key_part(part: object) -> str:
    return _part_text(part).replace("%", "%25").replace("/", "%2F")


class _Flattener:
    def __init__(self) -> None:
        self.leaves: list[TensorLeaf] = []
        self._keys: set[str] = {"__metadata__"}  # reserved by safetensors
        self._seen: dict[int, str] = {}  # id(tensor) -> key: one tensor saved once
        self._active: set[int] = set()  # containers on the current path: cycles

    def _new_key(self, path: tuple[object, ...]) -> str:
        base = "/".join(_key_part(p) for p in path) or "root"
        key, n = base, 1
        while key in self._keys:
            key, n = f"{base}#{n}", n + 1
        self._keys.add(key)
        return key

    def tensor(self, obj: Any, path: tuple[object, ...], lib: str) -> dict[str, str]:
        known = self._seen.get(id(obj))
        if known is not None:
            return {"$tensor": known}
        requires_grad = False
        if lib == "torch":
            if str(obj.layout) != "torch.strided" or obj.is_quantized:
                raise ConfigError(
                    f"Cannot save the tensor at key path {_path_str(path)!r}. "
                    f"Expected a dense tensor. Received: layout={obj.layout}, "
                    f"dtype={obj.dtype}. Convert it with .to_dense() (or dequantize it) first."
                )
            dt = dtypes.from_torch(obj.dtype)
            requires_grad = bool(obj.requires_grad)
            shape = tuple(int(s) for s in obj.shape)
        else:
            dt = dtypes.from_numpy(obj.dtype)
            shape = tuple(int(s) for s in np.shape(obj))
            if lib == "numpy-scalar":
                obj = np.asarray(obj)
        if dt is None:
            raise ConfigError(
                f"Cannot save the array at key path {_path_str(path)!r}: its dtype is outside "
                f"safepoint's allow-list. Expected one of {sorted(dtypes.BY_NAME)}. "
                f"Received: dtype={getattr(obj, 'dtype', None)}. Convert it to a numeric dtype, "
                "or keep such values out of the checkpointed state."
            )
        key = self._new_key(path)
        self._seen[id(obj)] = key
        self.leaves.append(TensorLeaf(key, dt, shape, lib, obj, requires_grad))
        return {"$tensor": key}

    def node(self, obj: Any, path: tuple[object, ...]) -> Any:
        if len(path) > MAX_DEPTH:
            raise ConfigError(
                f"State nests deeper than {MAX_DEPTH} levels at key path {_path_str(path)!r}. "
                "Flatten the state before checkpointing it."
            )
        if isinstance(obj, np.str_):
            return str(obj)
        if isinstance(obj, np.generic):
            return self.tensor(obj, path, "numpy-scalar")
        if obj is None or isinstance(obj, bool | str):
            return obj
        if isinstance(obj, int):
            if obj.bit_length() > _BIG_INT_BITS:
                return {"$int": hex(obj)}
            return int(obj)
        if isinstance(obj, float):
            return encode_float(float(obj))
        if isinstance(obj, np.ndarray):
            if isinstance(obj, np.ma.MaskedArray):
                # Saved as its data alone it would come back a plain ndarray, every
                # masked value silently unmasked.
                raise ConfigError(
                    f"Cannot save the {type(obj).__name__} at key path {_path_str(path)!r}. "
                    "Expected a plain numpy.ndarray. Received: a masked array, whose mask "
                    "would be lost. Save its parts instead (e.g. {'data': a.data, 'mask': "
                    "np.ma.getmaskarray(a)}) or np.asarray(a)."
                )
            return self.tensor(obj, path, "numpy")
        if is_torch_tensor(obj):
            return self.tensor(obj, path, "torch")
        if id(obj) in self._active:
            raise ConfigError(
                f"State contains a reference cycle at key path {_path_str(path)!r}. "
                "Checkpointed state must be a tree; remove the back-reference."
            )
        self._active.add(id(obj))
        try:
            return self._container(obj, path)
        finally:
            self._active.discard(id(obj))

    def _container(self, obj: Any, path: tuple[object, ...]) -> Any:
        if isinstance(obj, Mapping):
            keys = list(obj.keys())
            for k in keys:
                if isinstance(k, bool) or not isinstance(k, str | int):
                    raise ConfigError(
                        f"Cannot save the dict at key path {_path_str(path)!r}. Expected str or "
                        f"int keys. Received: key={k!r} of type {type(k).__name__}. "
                        "Convert the keys to str."
                    )
            if all(isinstance(k, str) and not k.startswith("$") for k in keys):
                return {k: self.node(obj[k], (*path, k)) for k in keys}
            return {"$dict": [[_encode_key(k), self.node(obj[k], (*path, k))] for k in keys]}
        if isinstance(obj, list):
            return [self.node(v, (*path, i)) for i, v in enumerate(obj)]
        if isinstance(obj, tuple):
            return {"$tuple": [self.node(v, (*path, i)) for i, v in enumerate(obj)]}
        stateful = view(obj)  # the object itself, or a registered view (numpy Generator)
        if stateful is not None:
            cls = type(obj)
            return {
                "$stateful": f"{cls.__module__}.{cls.__qualname__}",
                "state": self.node(stateful.state_dict(), path),
            }
        raise ConfigError(
            f"Cannot save the value at key path {_path_str(path)!r}. Expected a dict, list, "
            "tuple, str, int, float, bool, None, numpy array, torch tensor or an object with "
            f"state_dict()/load_state_dict(). Received: {type(obj).__module__}."
            f"{type(obj).__qualname__}. safepoint never pickles; give the object a "
            "state_dict()/load_state_dict() pair or leave it out of the state."
        )


def _encode_key(key: str | int) -> Any:
    """A ``$dict`` key: str and small ints as themselves, huge ints tagged.

    An int past Python's int/str digit limit cannot be written as a JSON number at all,
    so it gets the same ``{"$int": hex}`` tag as a huge value.
    """
    if isinstance(key, int):
        return {"$int": hex(key)} if key.bit_length() > _BIG_INT_BITS else int(key)
    return key


def _is_int_tag(node: Any) -> bool:
    return isinstance(node, dict) and list(node) == ["$int"]


def encode_float(value: float) -> Any:
    """A float as JSON: finite values as themselves, the rest tagged."""
    if math.isfinite(value) and not (value == 0.0 and math.copysign(1.0, value) < 0):
        return value
    return {"$float": repr(value)}


_SPECIAL_FLOATS = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf, "-0.0": -0.0}


def flatten(state: Any) -> tuple[Any, list[TensorLeaf]]:
    """Split ``state`` into its JSON tree and the tensors it references."""
    flattener = _Flattener()
    tree = flattener.node(state, ())
    return tree, flattener.leaves


def unflatten(tree: Any, tensor: Callable[[str], Any]) -> Any:
    """Rebuild the state from its JSON tree; ``tensor(key)`` supplies each tensor.

    Raises ``CorruptCheckpointError`` for any node that flatten() cannot have written.
    """
    return _decode(tree, tensor, 0)


def _corrupt(why: str, node: Any) -> CorruptCheckpointError:
    text = repr(node)
    if len(text) > 120:
        text = text[:117] + "..."
    return CorruptCheckpointError(
        f"Checkpoint state tree is malformed: {why}. Received: {text}. The manifest was not "
        "written by this version of safepoint or was altered; restore another checkpoint.",
        file="manifest.json",
    )


def _decode(node: Any, tensor: Callable[[str], Any], depth: int) -> Any:
    if depth > MAX_DEPTH:
        raise _corrupt(f"nesting deeper than {MAX_DEPTH}", "...")
    if node is None or isinstance(node, bool | str | int | float):
        return node
    if isinstance(node, list):
        return [_decode(v, tensor, depth + 1) for v in node]
    if not isinstance(node, dict):
        raise _corrupt("unexpected JSON type", node)
    tags = [k for k in node if k.startswith("$")]
    if not tags:
        return {k: _decode(v, tensor, depth + 1) for k, v in node.items()}
    tag = tags[0]
    value = node[tag]
    if tag == "$stateful":
        if set(node) != {"$stateful", "state"} or not isinstance(value, str):
            raise _corrupt("bad $stateful node", node)
        state = _decode(node["state"], tensor, depth + 1)
        if isinstance(state, dict):
            state = SavedState(state)
            state.saved_class = value
        return state
    if len(node) != 1:
        raise _corrupt(f"extra keys beside {tag}", node)
    if tag == "$tensor" and isinstance(value, str):
        return tensor(value)
    if tag == "$tuple" and isinstance(value, list):
        return tuple(_decode(v, tensor, depth + 1) for v in value)
    if tag == "$float" and isinstance(value, str) and value in _SPECIAL_FLOATS:
        return _SPECIAL_FLOATS[value]
    if tag == "$int" and isinstance(value, str) and len(value) <= _BIG_INT_BITS * 64:
        try:
            return int(value, 16)
        except ValueError:
            raise _corrupt("bad $int", node) from None
    if tag == "$dict" and isinstance(value, list):
        out: dict[Any, Any] = {}
        for pair in value:
            if isinstance(pair, list) and len(pair) == 2 and _is_int_tag(pair[0]):
                key = _decode(pair[0], tensor, depth + 1)  # a huge int key: {"$int": hex}
                if isinstance(key, int) and key.bit_length() > _BIG_INT_BITS:
                    pair = [key, pair[1]]
            if (
                not isinstance(pair, list)
                or len(pair) != 2
                or isinstance(pair[0], bool)
                or not isinstance(pair[0], str | int)
            ):
                raise _corrupt("bad $dict entry", pair)
            if pair[0] in out:
                raise _corrupt("duplicate key in $dict", pair[0])
            out[pair[0]] = _decode(pair[1], tensor, depth + 1)
        return out
    raise _corrupt(f"unknown or ill-formed tag {tag}", node)


def tensor_refs(tree: Any) -> list[str]:
    """Every tensor key the tree references, in order (iteratively: no recursion limit)."""
    refs: list[str] = []
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(reversed(node))
        elif isinstance(node, dict):
            if "$tensor" in node and isinstance(node["$tensor"], str):
                refs.append(node["$tensor"])
            else:
                stack.extend(reversed(list(node.values())))
    return refs


__all__ = [
    "MAX_DEPTH",
    "SavedState",
    "TensorLeaf",
    "as_bytes",
    "encode_float",
    "flatten",
    "is_stateful",
    "is_torch_tensor",
    "tensor_refs",
    "unflatten",
]
