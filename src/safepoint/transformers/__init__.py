"""Hugging Face ``transformers``: a ``Trainer`` whose checkpoints are safepoint's.

``from safepoint.transformers import Trainer`` is the only change to a training
script: same arguments, same ``checkpoint-<step>`` names in ``output_dir``, but every
checkpoint is committed atomically, checksummed and pickle-free, retention never
deletes the newest or the best, and ``train(resume_from_checkpoint=True)`` skips a
damaged newest checkpoint. See docs/transformers.md.
"""

from safepoint.transformers.trainer import Trainer

__all__ = ["Trainer"]
