"""``safepoint.lightning.ModelCheckpoint``: Lightning's callback, with safepoint files.

The subclass keeps every argument, attribute, message and decision of Lightning's
``ModelCheckpoint`` (which checkpoints to keep, their names, ``best_model_path``...)
and changes how files are written and removed: at ``setup`` it puts
:class:`~safepoint.lightning.CheckpointIO` on the trainer's strategy (in place of the
default ``TorchCheckpointIO``), so each save is an atomic, checksummed commit and each
removal one rename. ``save_last="link"`` writes a full ``last.ckpt`` instead of a
symlink: a link would dangle once top-k retention removed its target.

Exact resume. Lightning restores weights, optimizers, schedulers and its loops, but
not the random generators or where a shuffling sampler was in its epoch. This callback
adds both to every checkpoint (key ``"safepoint"``: python/numpy/torch RNG states, and
the state of each :class:`safepoint.torch.ResumableSampler` of the training loaders)
and puts them back when a fit resumes, so a run resumed mid-epoch with a
``ResumableSampler`` ends bit-identical to one that never stopped.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from safepoint.errors import ConfigError
from safepoint.lightning.checkpoint_io import CheckpointIO
from safepoint.lightning.framework import BaseModelCheckpoint, TorchCheckpointIO
from safepoint.torch import ResumableSampler, RNGState

log = logging.getLogger("safepoint")

#: The checkpoint key of what this callback adds: RNG states and sampler positions.
KEY = "safepoint"


def install(trainer: Any) -> CheckpointIO:
    """Make ``trainer`` write and read checkpoints through safepoint; return the plugin."""
    strategy = trainer.strategy
    current = strategy.checkpoint_io
    if isinstance(current, CheckpointIO):
        return current
    if type(current) is not TorchCheckpointIO:
        raise ConfigError(
            "safepoint.lightning.ModelCheckpoint replaces the trainer's default "
            "TorchCheckpointIO, but this trainer has another one. Expected the default. "
            f"Received: checkpoint_io={type(current).__name__}. Pass "
            "plugins=[safepoint.lightning.CheckpointIO()] instead of your plugin, or use "
            "Lightning's own ModelCheckpoint with it."
        )
    plugin = CheckpointIO()
    strategy.checkpoint_io = plugin
    return plugin


def _samplers(trainer: Any) -> list[ResumableSampler]:
    """The ResumableSamplers of the trainer's training loaders, in a stable order."""
    loaders = trainer.fit_loop._combined_loader
    flat = [] if loaders is None else loaders.flattened
    found = []
    for loader in flat:
        for candidate in (getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)):
            inner = getattr(candidate, "sampler", candidate)
            if isinstance(inner, ResumableSampler) and inner not in found:
                found.append(inner)
    return found


class ModelCheckpoint(BaseModelCheckpoint):  # type: ignore[misc]
    """Lightning's ``ModelCheckpoint`` (same arguments), writing safepoint files."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._resume: dict[str, Any] | None = None

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        install(trainer)
        super().setup(trainer, pl_module, stage)

    def _save_checkpoint(self, trainer: Any, filepath: str) -> None:
        """Lightning's save, with the plugin installed first: a save called before
        ``setup`` (Lightning's tests call ``_save_last_checkpoint`` directly) must not
        fall back to ``torch.save``."""
        install(trainer)
        super()._save_checkpoint(trainer, filepath)

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        checkpoint[KEY] = {
            "rng": RNGState().state_dict(),
            "samplers": [s.state_dict() for s in _samplers(trainer)],
        }

    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(trainer, pl_module, checkpoint)
        extra = checkpoint.get(KEY)
        self._resume = extra if isinstance(extra, dict) else None

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        """Put the generators and samplers back just before the first resumed batch."""
        super().on_train_start(trainer, pl_module)
        resume, self._resume = self._resume, None
        if resume is None:
            return
        samplers = _samplers(trainer)
        saved = resume.get("samplers") or []
        if len(saved) != len(samplers):
            log.warning(
                "safepoint: the checkpoint holds %d ResumableSampler state(s), the training "
                "loaders have %d: their positions are not restored (resume is not exact).",
                len(saved),
                len(samplers),
            )
        else:
            for sampler, state in zip(samplers, saved, strict=True):
                sampler.load_state_dict(state)
        RNGState().load_state_dict(resume["rng"])

    @staticmethod
    def _link_checkpoint(trainer: Any, filepath: str, linkpath: str) -> None:
        """A full copy, committed, in place of Lightning's symlink (a static method, as
        Lightning's: its tests call ``ModelCheckpoint._link_checkpoint(trainer, ...)``)."""
        if trainer.is_global_zero and os.path.abspath(filepath) != os.path.abspath(linkpath):
            plugin = install(trainer)
            plugin.save_checkpoint(plugin.load_checkpoint(filepath), linkpath)
        trainer.strategy.barrier()


__all__ = ["KEY", "ModelCheckpoint", "install"]
