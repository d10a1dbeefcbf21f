"""Writing one checkpoint directory: validated arguments, payload, manifest, commit.

The same sequence serves ``CheckpointManager.save`` (sync or in the background) and
``safepoint convert``: stage inside the root, write the payload files, write the
manifest last, commit by rename (:meth:`Storage.commit` makes it durable). On any
failure the staging directory is removed and nothing new is listed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from safepoint.errors import ConfigError
from safepoint.ondisk.embedded import CONTAINER
from safepoint.ondisk.formats import PayloadFormat
from safepoint.ondisk.manifest import NAME as MANIFEST_NAME
from safepoint.ondisk.manifest import Manifest
from safepoint.state.metrics import clean_value
from safepoint.state.tree import TensorLeaf
from safepoint.storage.local import Storage


def int_arg(name: str, value: Any) -> int | None:
    """A non-negative int (numpy ints accepted) or None; ``ConfigError`` otherwise."""
    if value is None:
        return None
    if hasattr(value, "__index__") and not isinstance(value, bool):
        value = int(value.__index__())
        if value >= 0:
            return value
    raise ConfigError(
        f"Invalid {name}. Expected a non-negative int or None. Received: {name}={value!r}."
    )


def metrics_arg(metrics: Any) -> dict[str, Any]:
    """Metrics as a dict of str -> plain Python scalar (see ``metriccodec.clean_value``).

    numpy scalars, 0-d arrays and tensors become the Python int/float/bool they hold,
    so the manifest and the run log store exactly the value logged, NaN and inf included.
    """
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping):
        raise ConfigError(
            f"metrics must be a dict of name -> number. Received: metrics={metrics!r}."
        )
    out: dict[str, Any] = {}
    for k, v in metrics.items():
        if not isinstance(k, str):
            raise ConfigError(f"Metric names must be str. Received: {k!r}. Use str keys.")
        out[str(k)] = clean_value(k, v)
    return out


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
