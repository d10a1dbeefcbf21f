"""A checkpoint directory: writing one (payload files, manifest, commit).

The same sequence serves ``CheckpointManager.save`` (sync or in the background) and
``safepoint convert``: stage inside the root, write the payload files, write the
manifest last, commit by rename (:meth:`Storage.commit` makes it durable). On any
failure the staging directory is removed and nothing new is listed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from safepoint.formats import PayloadFormat
from safepoint.ondisk.container import CONTAINER
from safepoint.ondisk.manifest import NAME as MANIFEST_NAME
from safepoint.ondisk.manifest import Manifest
from safepoint.state.tree import TensorLeaf
from safepoint.storage.local import Storage


def write_checkpoint(
    storage: Storage,
    fmt: PayloadFormat,
    draft: Manifest,
    leaves: Sequence[TensorLeaf],
    *,
    shard_bytes: int,
    images: Sequence[np.ndarray] | None = None,
) -> Manifest:
    """Commit ``draft`` (a manifest without files) with the payload of ``leaves``.

    ``images``: the payload files already laid out in memory (async saves, see
    ``snapshot.py``), written as they are.
    """
    staged = storage.stage(draft.name)
    try:
        files, locations = fmt.write(
            storage, staged, leaves, shard_bytes=shard_bytes, images=images
        )
        manifest = replace(
            draft,
            files=files,
            tensors={leaf.key: {**leaf.entry(), **locations[leaf.key]} for leaf in leaves},
            payload=fmt.name,
            extra={**draft.extra, CONTAINER: "directory"},
        )
        storage.write_file(f"{staged}/{MANIFEST_NAME}", manifest.to_bytes(), stage="manifest")
        storage.commit(staged, draft.name)
    except BaseException:
        storage.discard(staged)
        raise
    return manifest


__all__ = ["write_checkpoint"]
