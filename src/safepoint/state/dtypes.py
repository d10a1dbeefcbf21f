"""The dtype allow-list: the only element types a checkpoint may hold.

Every tensor carries a *logical* dtype (what the user saved: ``"bfloat16"``,
``"complex64"``) and is stored under a *payload* dtype that the file format knows
natively. When the format has no code for the logical dtype (complex numbers,
float8 variants safetensors lacks, ``longdouble``), the tensor is stored as raw
bytes (``uint8``) with one extra trailing axis of ``itemsize`` and reinterpreted on
load. Anything outside this table (object, string, void, datetime arrays) is refused
when saving with a ``ConfigError`` and when loading with a ``CorruptCheckpointError``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DType:
    """One allowed element type and how each library and format spells it."""

    name: str  # safepoint's canonical name, used in manifests
    itemsize: int
    numpy: str | None  # numpy dtype string, None when numpy has no such type
    torch: str | None  # attribute of the torch module, None when torch has none
    safetensors: str | None  # safetensors dtype code, None -> stored as raw bytes


_TABLE = [
    DType("bool", 1, "bool", "bool", "BOOL"),
    DType("uint8", 1, "uint8", "uint8", "U8"),
    DType("int8", 1, "int8", "int8", "I8"),
    DType("int16", 2, "int16", "int16", "I16"),
    DType("uint16", 2, "uint16", "uint16", "U16"),
    DType("int32", 4, "int32", "int32", "I32"),
    DType("uint32", 4, "uint32", "uint32", "U32"),
    DType("int64", 8, "int64", "int64", "I64"),
    DType("uint64", 8, "uint64", "uint64", "U64"),
    DType("float16", 2, "float16", "float16", "F16"),
    DType("bfloat16", 2, None, "bfloat16", "BF16"),
    DType("float32", 4, "float32", "float32", "F32"),
    DType("float64", 8, "float64", "float64", "F64"),
    DType("complex32", 4, None, "complex32", None),
    DType("complex64", 8, "complex64", "complex64", None),
    DType("complex128", 16, "complex128", "complex128", None),
    DType("float8_e4m3fn", 1, None, "float8_e4m3fn", "F8_E4M3"),
    DType("float8_e5m2", 1, None, "float8_e5m2", "F8_E5M2"),
    DType("float8_e4m3fnuz", 1, None, "float8_e4m3fnuz", None),
    DType("float8_e5m2fnuz", 1, None, "float8_e5m2fnuz", None),
    DType("float8_e8m0fnu", 1, None, "float8_e8m0fnu", None),
    DType("float4_e2m1fn_x2", 1, None, "float4_e2m1fn_x2", None),
]
if np.dtype(np.longdouble).itemsize not in (8,):  # float64-sized longdouble is just float64
    _TABLE.append(
        DType(
            f"longdouble{np.dtype(np.longdouble).itemsize * 8}",
            np.dtype(np.longdouble).itemsize,
            "longdouble",
            None,
            None,
        )
    )
    _TABLE.append(
        DType(
            f"clongdouble{np.dtype(np.clongdouble).itemsize * 8}",
            np.dtype(np.clongdouble).itemsize,
            "clongdouble",
            None,
            None,
        )
    )

BY_NAME: dict[str, DType] = {d.name: d for d in _TABLE}
_BY_NUMPY: dict[np.dtype, DType] = {np.dtype(d.numpy): d for d in _TABLE if d.numpy}
BY_SAFETENSORS: dict[str, DType] = {d.safetensors: d for d in _TABLE if d.safetensors}

#: Payload dtype used for logical dtypes a format cannot spell.
RAW = BY_NAME["uint8"]


def from_numpy(dtype: np.dtype) -> DType | None:
    """The allowed dtype for a numpy dtype, or None when it is not allowed."""
    if dtype.byteorder == ">":  # big-endian arrays are stored in native order
        dtype = dtype.newbyteorder("=")
    return _BY_NUMPY.get(dtype)


def from_torch(dtype: object) -> DType | None:
    """The allowed dtype for a ``torch.dtype``, or None (quantized and bit types)."""
    name = str(dtype).removeprefix("torch.")
    found = BY_NAME.get(name)
    return found if found is not None and found.torch == name else None


def lookup(name: object, *, where: str) -> DType:
    """The allowed dtype called ``name``; a ``CorruptCheckpointError`` otherwise."""
    from safepoint.errors import CorruptCheckpointError

    found = BY_NAME.get(name) if isinstance(name, str) else None
    if found is None:
        raise CorruptCheckpointError(
            f"Checkpoint declares a dtype outside the allow-list in {where}. "
            f"Expected one of {sorted(BY_NAME)}. Received: dtype={name!r}. "
            "The file was not written by safepoint or was tampered with; do not load it.",
            file=where,
            expected=sorted(BY_NAME),
            actual=name,
        )
    return found


def payload_layout(
    dt: DType, shape: tuple[int, ...], *, native: bool
) -> tuple[DType, tuple[int, ...]]:
    """How a tensor of logical ``dt``/``shape`` is laid out in a payload file.

    ``native`` says whether the format can spell ``dt`` itself.
    """
    if native:
        return dt, shape
    if dt.itemsize == 1 and dt.name != "bool":
        return RAW, shape
    return RAW, (*shape, dt.itemsize)


__all__ = [
    "BY_NAME",
    "BY_SAFETENSORS",
    "RAW",
    "DType",
    "from_numpy",
    "from_torch",
    "lookup",
    "payload_layout",
]
