"""Which Lightning is installed: ``lightning.pytorch`` (the unified package) or
``pytorch_lightning``; the classes of the first one found are subclassed."""

from __future__ import annotations

from typing import Any

try:
    import lightning.pytorch as _pl
    from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO as _BaseIO
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO as _TorchIO
    from lightning.pytorch.callbacks import ModelCheckpoint as _BaseCallback
except ImportError:
    import pytorch_lightning as _pl  # type: ignore[no-redef]
    from lightning_fabric.plugins.io.checkpoint_io import (  # type: ignore[assignment]
        CheckpointIO as _BaseIO,
    )
    from lightning_fabric.plugins.io.torch_io import (  # type: ignore[assignment]
        TorchCheckpointIO as _TorchIO,
    )
    from pytorch_lightning.callbacks import (  # type: ignore[assignment]
        ModelCheckpoint as _BaseCallback,
    )

pl: Any = _pl
BaseCheckpointIO: Any = _BaseIO
BaseModelCheckpoint: Any = _BaseCallback
TorchCheckpointIO: Any = _TorchIO

__all__ = ["BaseCheckpointIO", "BaseModelCheckpoint", "TorchCheckpointIO", "pl"]
