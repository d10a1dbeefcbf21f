"""PyTorch Lightning: checkpoints that are committed atomically, checksummed, pickle-free.

``from safepoint.lightning import ModelCheckpoint`` instead of Lightning's is the whole
change: every ``.ckpt`` Lightning writes (``ModelCheckpoint``, ``trainer.save_checkpoint``)
becomes one sealed safepoint file, and ``trainer.fit(ckpt_path="last" | "best" | path)``
reads it back. ``Trainer(plugins=[CheckpointIO()])`` does the same without the callback.
See docs/lightning.md.
"""

from safepoint.lightning.checkpoint_io import CheckpointIO, load_from_checkpoint
from safepoint.lightning.model_checkpoint import ModelCheckpoint

__all__ = ["CheckpointIO", "ModelCheckpoint", "load_from_checkpoint"]
