"""Fault injection, comparison and tampering helpers shared by the test files.

A plain module, not conftest.py: test files import these names directly, and
``from conftest import ...`` would pick up whichever of the suite's several
conftest.py files was imported first.
"""

from __future__ import annotations

import errno
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import safepoint
from safepoint.ondisk.manifest import _body_digest
from safepoint.storage.local import FAULT_STAGES, LocalStorage

#: What an armed fault does: an exception (instance or class) to raise, or a callable
#: run as ``action(stage, target)`` (to stall, kill the process, cut the power...).
Action = BaseException | type[BaseException] | Callable[[str, str], object]


def eio(stage: str, target: str) -> None:
    """The default fault: the device reports an I/O error."""
    raise OSError(errno.EIO, f"Input/output error (injected at stage {stage})")


@dataclass
class _Rule:
    stage: str | None
    action: Action
    nth: int
    times: int | None
    target: str | Callable[[str], bool] | None
    seen: int = 0
    fired: int = 0

    def matches(self, stage: str, target: str) -> bool:
        if self.stage is not None and stage != self.stage:
            return False
        if self.target is None:
            return True
        return self.target(target) if callable(self.target) else target == self.target

    @property
    def spent(self) -> bool:
        return self.times is not None and self.fired >= self.times


class Faults:
    """The fault-injection hook of a test: ``LocalStorage(root, faults=Faults())``.

    The one shared way tests inject faults (``LocalStorage``'s ``faults`` hook is called
    as ``faults(stage, target)`` right before each I/O step of a save; the stages are
    ``safepoint.storage.local.FAULT_STAGES``). It records every step it sees in
    :attr:`hits`, and runs the faults armed with :meth:`arm`.
    """

    def __init__(self) -> None:
        self.hits: list[tuple[str, str]] = []
        self._rules: list[_Rule] = []

    @property
    def stages(self) -> list[str]:
        """The stages seen so far, in order."""
        return [stage for stage, _ in self.hits]

    @property
    def armed(self) -> bool:
        """Whether a fault armed here has yet to fire (as often as it was asked to)."""
        return any(not rule.spent for rule in self._rules)

    def arm(
        self,
        stage: str | None,
        action: Action = eio,
        *,
        nth: int = 1,
        times: int | None = 1,
        target: str | Callable[[str], bool] | None = None,
    ) -> Faults:
        """Run ``action`` at the ``nth`` step of ``stage`` (``None``: of any stage) seen
        from now on, and at the ``times - 1`` matching steps after it (``times=None``:
        at every one). ``target`` narrows the steps that count: a relative path (``""``
        is the root) or a predicate on it. Returns ``self``."""
        if stage is not None and stage not in FAULT_STAGES:
            raise ValueError(f"unknown stage {stage!r}; expected one of {FAULT_STAGES}")
        if nth < 1 or (times is not None and times < 1):
            raise ValueError(f"nth and times count from 1; got nth={nth}, times={times}")
        self._rules.append(_Rule(stage, action, nth, times, target))
        return self

    def disarm(self) -> None:
        """Drop every armed fault (the device recovers); recording goes on."""
        self._rules.clear()

    def __call__(self, stage: str, target: str) -> None:
        self.hits.append((stage, target))
        for rule in self._rules:
            if rule.spent or not rule.matches(stage, target):
                continue
            rule.seen += 1
            if rule.seen < rule.nth:
                continue
            rule.fired += 1
            action = rule.action
            if isinstance(action, BaseException) or (
                isinstance(action, type) and issubclass(action, BaseException)
            ):
                raise action
            action(stage, target)


def fail_at(
    stage: str | None,
    action: Action = eio,
    *,
    nth: int = 1,
    times: int | None = 1,
    target: str | Callable[[str], bool] | None = None,
) -> Faults:
    """A hook that fails the ``nth`` step of ``stage`` with ``action`` (``EIO`` by
    default); see :meth:`Faults.arm`."""
    return Faults().arm(stage, action, nth=nth, times=times, target=target)


def faulty_manager(
    root: str | os.PathLike[str], faults: Faults, **kwargs: Any
) -> safepoint.CheckpointManager:
    """A manager whose storage is ``root`` with the fault hook ``faults``."""
    return safepoint.CheckpointManager(LocalStorage(root, faults=faults), **kwargs)


def tensor_bytes(value: Any) -> bytes:
    """The raw bytes of a torch tensor (any dtype, contiguous copy)."""
    import torch

    flat = value.detach().clone(memory_format=torch.contiguous_format).reshape(-1)
    if flat.dtype != torch.uint8:
        flat = flat.view(torch.uint8)
    return bytes(flat.numpy())


def _payload_bytes(arr: np.ndarray) -> bytes:
    """The bytes of ``arr`` that carry its values (x87 long doubles have 6 pad bytes)."""
    arr = np.ascontiguousarray(arr.astype(arr.dtype.newbyteorder("=")))
    padded = (np.dtype(np.longdouble), np.dtype(np.clongdouble))
    if np.dtype(np.longdouble).itemsize == 16 and arr.dtype in padded:
        return arr.reshape(-1).view(np.uint8).reshape(-1, 16)[:, :10].tobytes()
    return arr.tobytes()


def _short(key: object) -> str:
    """A printable key (ints past the str digit limit cannot be repr'd)."""
    if isinstance(key, int) and key.bit_length() > 4096:
        return f"<int of {key.bit_length()} bits>"
    return repr(key)


def assert_same(expected: Any, actual: Any, path: str = "<root>") -> None:
    """Assert ``actual`` is ``expected`` rebuilt exactly: same types, keys, bytes.

    Floats compare by bits (NaN equals NaN, -0.0 differs from 0.0), arrays and
    tensors by dtype, shape and raw bytes, containers by exact type.
    """
    if isinstance(expected, np.generic):
        assert type(actual) is type(expected), f"{path}: {type(actual)} != {type(expected)}"
        assert _payload_bytes(np.asarray(actual)) == _payload_bytes(np.asarray(expected)), path
        return
    if isinstance(expected, np.ndarray):
        assert type(actual) is np.ndarray, f"{path}: {type(actual)}"
        assert actual.dtype == expected.dtype.newbyteorder("="), path
        assert actual.shape == expected.shape, path
        assert _payload_bytes(actual) == _payload_bytes(expected), path
        return
    if type(expected).__module__ == "torch" and type(expected).__name__ == "Tensor":
        assert type(actual) is type(expected), f"{path}: {type(actual)}"
        assert actual.dtype == expected.dtype, path
        assert actual.shape == expected.shape, path
        assert actual.requires_grad == expected.requires_grad, path
        assert tensor_bytes(actual) == tensor_bytes(expected), path
        return
    assert type(actual) is type(expected), f"{path}: {type(actual)} != {type(expected)}"
    if isinstance(expected, float):
        if math.isnan(expected):
            assert math.isnan(actual), path
        else:
            assert actual == expected, path
            assert math.copysign(1.0, actual) == math.copysign(1.0, expected), path
    elif isinstance(expected, dict):
        assert list(actual.keys()) == list(expected.keys()), path
        for k in expected:
            where = f"{path}/{_short(k)}"
            assert type(next(x for x in actual if x == k)) is type(k), where
            assert_same(expected[k], actual[k], where)
    elif isinstance(expected, list | tuple):
        assert len(actual) == len(expected), path
        for i, (e, a) in enumerate(zip(expected, actual, strict=True)):
            assert_same(e, a, f"{path}/{i}")
    else:
        assert actual == expected, path


def read_manifest(ckpt_dir: Path) -> dict[str, Any]:
    """A checkpoint's manifest as a plain JSON object."""
    return json.loads((ckpt_dir / "manifest.json").read_text())


def write_manifest(ckpt_dir: Path, body: dict[str, Any], *, sign: bool = True) -> None:
    """Write ``body`` as the manifest, re-signed so only deeper validation can reject it."""
    if sign:
        body["checksum"] = _body_digest(body)
    (ckpt_dir / "manifest.json").write_text(json.dumps(body, indent=1))


def listing(root: Path) -> set[str]:
    """Every entry of a checkpoint root, hidden ones included."""
    return set(os.listdir(root)) if root.exists() else set()


def mark_folder(items: list[Any], conftest: str, marks: list[Any]) -> None:
    """Add ``marks`` (pytest marks) to every collected test in ``conftest``'s folder:
    the folder-wide ``e2e`` marker, or warning filters for a framework's own notices."""
    here = os.path.dirname(os.path.abspath(conftest))
    for item in items:
        if str(item.path).startswith(here + os.sep):
            for mark in marks:
                item.add_marker(mark)


def examples(n: int) -> int:
    """``n`` Hypothesis examples, scaled like the loaded profile's default (40).

    The ``fast`` profile of ``make test-fast`` runs a quarter of each count, never
    fewer than 5, so a property test with its own count shrinks with the others.
    """
    from hypothesis import settings

    return max(5, n * settings.default.max_examples // 40)
