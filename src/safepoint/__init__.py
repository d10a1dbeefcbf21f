"""safepoint: crash-safe, pickle-free checkpointing for deep-learning training.

``import safepoint`` loads numpy, safetensors and xxhash only; framework adapters
(``safepoint.torch``, ``safepoint.keras``) and the HDF5 format import their
frameworks when used.
"""

from safepoint.callback import ModelCheckpoint
from safepoint.catalog.reader import load
from safepoint.checkpoint import Checkpoint, Verification
from safepoint.errors import (
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
from safepoint.manager import CheckpointManager
from safepoint.retention import Keep
from safepoint.state.rng import RNGState
from safepoint.version import __version__

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
