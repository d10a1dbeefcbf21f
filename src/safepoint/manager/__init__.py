"""``CheckpointManager``: names a save, orders it, commits it, prunes, restores.

The class lives in :mod:`.core`; the modules beside it are its parts, split by
concept: constructor arguments (:mod:`.options`), run-log records (:mod:`.history`),
retention and deletion (:mod:`.pruning`), committing framework files
(:mod:`.file_saving`, :mod:`.staged_file`) and the root's writer lock
(:mod:`.writer_lock`).
"""

from safepoint.manager.core import CheckpointManager

__all__ = ["CheckpointManager"]
