"""safepoint: crash-safe, pickle-free checkpointing for deep-learning training.

``import safepoint`` loads numpy, safetensors and xxhash only; framework adapters
(``safepoint.torch``, ``safepoint.keras``) and the HDF5 format import their
frameworks when used.
"""

from .callback import ModelCheckpoint
from .checkpoint import Checkpoint, Verification
from .errors import (
    CheckpointNotFoundError,
    ConfigError,
    CorruptCheckpointError,
    IncompatibleCheckpointError,
    IncompleteCheckpointError,
    SafepointError,
    StateMismatchError,
    StateMismatchWarning,
    StorageError,
)
from .manager import CheckpointManager
from .reader import load
from .retention import Keep
from .rng import RNGState
from .version import __version__

__all__ = [
    "Checkpoint",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "ConfigError",
    "CorruptCheckpointError",
    "IncompatibleCheckpointError",
    "IncompleteCheckpointError",
    "Keep",
    "ModelCheckpoint",
    "RNGState",
    "SafepointError",
    "StateMismatchError",
    "StateMismatchWarning",
    "StorageError",
    "Verification",
    "__version__",
    "load",
]
