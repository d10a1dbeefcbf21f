"""Which Lightning is installed: ``lightning.pytorch`` (the unified package) or
``pytorch_lightning``; the classes of the first one found are subclassed."""

from __future__ import annotations

from typing import Any

try:
    import lightning.pytorch as pl
    from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO as BaseCheckpointIO
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
    from lightning.pytorch.callbacks import ModelCheckpoint as BaseModelCheckpoint
except ImportError:
    import pytorch_lightning as pl
    from lightning_fabric.plugins.io.checkpoint_io import CheckpointIO as BaseCheckpointIO
    from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
    from pytorch_lightning.callbacks import ModelCheckpoint as BaseModelCheckpoint

LightningModule: Any = pl.LightningModule
Trainer: Any = pl.Trainer

__all__ = [
    "BaseCheckpointIO",
    "BaseModelCheckpoint",
    "LightningModule",
    "TorchCheckpointIO",
    "Trainer",
    "pl",
]
