"""PyTorch adapter: exact mid-epoch resume for plain PyTorch training loops.

Importing this module (``import safepoint.torch``) does three things for a loop that
checkpoints ``{"model": ..., "optimizer": ..., "sampler": ..., "rng": ...}``:

* :class:`RNGState` captures every generator a torch loop draws from: Python's,
  NumPy's global one, torch's CPU generator and the generator of every CUDA device.
* ``torch.Generator`` objects and ``DataLoader`` objects become valid state leaves:
  a loader is saved as the generators it owns (its own, its sampler's) and the state
  of a sampler that follows the ``state_dict`` protocol.
* :class:`ResumableSampler` records the data position, so that a run killed in the
  middle of an epoch continues with exactly the samples the uninterrupted run would
  have seen next, without reading the skipped ones through the dataset.
* DataLoader workers forked while ``save_on_signal`` is active ignore its signals, so
  a signal to the whole job reaches the safe point instead of killing a worker.

Modules, optimizers, LR schedulers, ``GradScaler`` and anything else with
``state_dict``/``load_state_dict`` need nothing from here: the core saves them as they
are. torchdata's ``StatefulDataLoader`` is saved with torch's global generator as it
was after the loader's state was taken, and restored so that the iterator the resumed
loop creates does not shift the random draws that follow (see ``loaders.py``). A
``DataLoader`` whose sampler has no saved position (``shuffle=True``) is saved with a
logged warning: it cannot resume mid-epoch.
"""

from __future__ import annotations

import logging
import signal
from typing import Any

import torch
from torch.utils.data import DataLoader

from safepoint import preemption
from safepoint.errors import StateMismatchError
from safepoint.state import rng, stateful
from safepoint.torch import loaders
from safepoint.torch.sampler import ResumableSampler, _as_byte_tensor

__all__ = ["RNGState", "ResumableSampler"]

log = logging.getLogger("safepoint")


class RNGState(rng.RNGState):
    """The process-global generators, CUDA included whenever CUDA is available.

    Unlike the core ``safepoint.RNGState`` (which never initialises CUDA), this one
    captures each CUDA device's generator as soon as CUDA is available, because a
    torch user's loop draws from it (dropout on the GPU). Restoring onto a machine
    with fewer CUDA devices restores those it has and logs a warning: the draws on
    the missing devices cannot be reproduced there.
    """

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["torch"] = torch.get_rng_state()
        if torch.cuda.is_available():
            state["torch_cuda"] = list(torch.cuda.get_rng_state_all())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        cuda = state.get("torch_cuda") if isinstance(state, dict) else None
        if cuda is None:
            super().load_state_dict(state)
            return
        super().load_state_dict({k: v for k, v in state.items() if k != "torch_cuda"})
        here = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if here < len(cuda):
            log.warning(
                "safepoint: the checkpoint holds RNG states of %d CUDA devices and this "
                "process sees %d; the others are not restored, so GPU random draws differ "
                "from the saved run.",
                len(cuda),
                here,
            )
        for device, value in enumerate(cuda[:here]):
            torch.cuda.set_rng_state(_as_byte_tensor(value), device)


class GeneratorState:
    """A ``torch.Generator`` as state: its byte state, restored in place."""

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator

    def state_dict(self) -> dict[str, Any]:
        return {"device": str(self.generator.device), "state": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        try:
            self.generator.set_state(_as_byte_tensor(state["state"]))
        except (KeyError, TypeError, RuntimeError) as exc:
            raise StateMismatchError(
                f"Restoring a torch.Generator failed: {exc}. Expected the state saved from a "
                f"generator on {self.generator.device}. Received: device="
                f"{state.get('device') if isinstance(state, dict) else state!r}. Create the "
                "generator on the device it was saved from."
            ) from None


def _sampler_parts(loader: DataLoader) -> dict[str, Any]:
    """The samplers of ``loader`` that carry state, by role (each object once)."""
    parts: dict[str, Any] = {}
    seen: set[int] = set()
    batch_sampler = loader.batch_sampler
    candidates = [
        ("sampler", loader.sampler),
        ("batch_sampler", batch_sampler),
        ("batch_sampler.sampler", getattr(batch_sampler, "sampler", None)),
    ]
    for role, obj in candidates:
        if obj is None or id(obj) in seen:
            continue
        seen.add(id(obj))
        if stateful.view(obj) is not None:
            parts[role] = obj
        elif isinstance(generator := getattr(obj, "generator", None), torch.Generator):
            parts[role] = generator  # RandomSampler(generator=...)
    return parts


class LoaderState:
    """A ``DataLoader`` as state: the generators it owns and its samplers' states.

    The loader's own ``generator`` seeds its workers (and its default sampler); a
    sampler's generator or ``state_dict`` decides the order of the data. Datasets,
    workers and prefetched batches are not state: they are rebuilt by the loop.
    """

    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader

    def _parts(self) -> dict[str, Any]:
        parts: dict[str, Any] = {}
        if isinstance(self.loader.generator, torch.Generator):
            parts["generator"] = self.loader.generator
        parts.update(_sampler_parts(self.loader))
        return parts

    def state_dict(self) -> dict[str, Any]:
        loaders.warn_if_position_lost(self.loader)
        return {role: stateful.view(obj).state_dict() for role, obj in self._parts().items()}  # type: ignore[union-attr]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        parts = self._parts()
        if not isinstance(state, dict) or sorted(state) != sorted(parts):
            received = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise StateMismatchError(
                "Restoring a DataLoader failed: its stateful parts differ from the saved "
                f"loader's. Expected: {sorted(parts)}. Received: {received}. Build the "
                "DataLoader with the same generator and sampler arguments as the saved run.",
                missing=[k for k in parts if not isinstance(state, dict) or k not in state],
                unexpected=[k for k in state if k not in parts] if isinstance(state, dict) else [],
            )
        for role, obj in parts.items():
            stateful.view(obj).load_state_dict(state[role])  # type: ignore[union-attr]


stateful.register(torch.Generator, GeneratorState)
stateful.register(DataLoader, LoaderState)
loaders.register()  # torchdata's StatefulDataLoader, when installed


def _patch_worker_signals() -> None:
    """Let DataLoader workers outlive a preemption signal sent to the process group.

    Batch schedulers signal every process of a job. Torch gives each worker a SIGTERM
    handler that kills it unless the signal comes from its parent, and the main process
    then raises "DataLoader worker is killed by signal" in the middle of a step: the
    save at the next safe point (``save_on_signal``) would never happen. So, in a worker
    forked while a guard is installed, the guard's signals are ignored; the main
    process saves, exits, and its workers stop with it (torch's watchdog).
    """
    try:
        from torch.utils.data._utils import signal_handling
    except ImportError:  # pragma: no cover - torch moved it; workers keep torch's handlers
        return
    original = signal_handling._set_worker_signal_handlers
    if getattr(original, "_safepoint", False):
        return

    def set_worker_signal_handlers(*args: Any) -> None:
        original(*args)
        guard = preemption.active()
        if guard is not None:
            for sig in guard.signals:
                signal.signal(sig, signal.SIG_IGN)

    set_worker_signal_handlers._safepoint = True  # type: ignore[attr-defined]
    signal_handling._set_worker_signal_handlers = set_worker_signal_handlers


_patch_worker_signals()
