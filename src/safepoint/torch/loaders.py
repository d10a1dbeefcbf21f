"""Data loaders in the state: torchdata's ``StatefulDataLoader`` resumed exactly, and a
warning for loaders whose position cannot be saved.

Part of the PyTorch adapter (imported through ``safepoint.torch``).

Creating a loader iterator draws a seed from torch's global generator (the workers'
base seed, and a shuffling sampler's seed). The uninterrupted run drew it when its
epoch began; a resumed run draws it again when its loop calls ``iter()`` on the
restored loader, after ``RNGState`` was put back, which shifts every dropout mask that
follows. :class:`StatefulLoaderState` therefore saves torch's generator as it was
after the loader's own state was taken, and puts it back right after the first
iterator the restored loader creates (the one that continues the saved pass).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import DataLoader

from safepoint.state import stateful

log = logging.getLogger("safepoint")

_KEYS = {"loader", "torch_rng"}
_warned: set[int] = set()


class StatefulLoaderState:
    """A torchdata ``StatefulDataLoader``: its own state plus torch's global generator."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def state_dict(self) -> dict[str, Any]:
        inner = self.loader.state_dict()  # may create an iterator, which draws a seed
        return {"loader": inner, "torch_rng": torch.get_rng_state()}

    def load_state_dict(self, state: Any) -> None:
        if not (isinstance(state, dict) and set(state) == _KEYS):
            self.loader.load_state_dict(state)  # saved before safepoint wrapped it
            return
        self.loader.load_state_dict(state["loader"])
        _restore_rng_after_next_iterator(self.loader, state["torch_rng"])


def _restore_rng_after_next_iterator(loader: Any, rng: Any) -> None:
    """Make the loader's next ``_get_iterator()`` leave torch's generator at ``rng``.

    ``StatefulDataLoader.__iter__`` builds the resumed iterator through
    ``self._get_iterator()``; an instance attribute shadows the method for that one
    call and then removes itself.
    """
    original: Callable[[], Any] = type(loader)._get_iterator.__get__(loader)
    rng = rng if isinstance(rng, torch.Tensor) else torch.as_tensor(rng)

    def first_iterator() -> Any:
        try:
            return original()
        finally:
            loader.__dict__.pop("_get_iterator", None)
            torch.set_rng_state(rng)

    loader.__dict__["_get_iterator"] = first_iterator


def warn_if_position_lost(loader: DataLoader) -> None:
    """Log once per loader when it is saved with a sampler that has no saved position.

    Such a loader (``DataLoader(shuffle=True)``) restores its generators, but a run
    resumed mid-epoch starts that epoch over, in another order: samples are seen twice
    or never, silently.
    """
    if id(loader) in _warned or loader.sampler is None:
        return
    samplers = [loader.sampler, getattr(loader.batch_sampler, "sampler", None)]
    if any(s is not None and stateful.view(s) is not None for s in samplers):
        return
    name = type(loader.sampler).__name__
    if name in {"_InfiniteConstantSampler"}:  # an IterableDataset: no index sampler
        return
    _warned.add(id(loader))
    log.warning(
        "safepoint: a DataLoader with a %s is saved in the state, but it cannot resume "
        "mid-epoch: the sampler's position is not saved, so a resumed run starts the epoch "
        "over%s. Use sampler=safepoint.torch.ResumableSampler(dataset) instead of "
        "shuffle=True, or torchdata's StatefulDataLoader.",
        name,
        " in a new order" if "Random" in name else "",
    )


def register() -> None:
    """Wrap torchdata's ``StatefulDataLoader`` when torchdata is installed."""
    try:
        from torchdata.stateful_dataloader import StatefulDataLoader
    except ImportError:
        return
    stateful.register(StatefulDataLoader, StatefulLoaderState, over_protocol=True)


__all__ = ["StatefulLoaderState", "register", "warn_if_position_lost"]
