"""Keras 3 callbacks that checkpoint crash-safely: drop-ins for ``keras.callbacks``.

``from safepoint.keras import ModelCheckpoint, BackupAndRestore`` in place of the Keras
imports: the same arguments and messages, Keras 2 code accepted, every file committed
atomically with safepoint's manifest inside, and resumes that are bit-exact.
Importing this module imports Keras; ``import safepoint`` does not.
"""

from safepoint.keras.backup_and_restore import BackupAndRestore
from safepoint.keras.model_checkpoint import ModelCheckpoint

__all__ = ["BackupAndRestore", "ModelCheckpoint"]
