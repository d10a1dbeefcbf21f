"""``CheckpointManager``'s arguments, checked before anything is touched.

Each function returns the value the manager keeps, or raises ``ConfigError`` naming the
argument, what was expected and how to fix it: a typo in a long run's setup must fail
at once, not at the first save hours later.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from safepoint.catalog.series import refuse_checkpoint_root
from safepoint.errors import ConfigError
from safepoint.retention import Keep
from safepoint.state.metrics import clean_value
from safepoint.storage.local import LocalStorage
from safepoint.storage.protocol import Storage
from safepoint.storage.staging import default_cap
from safepoint.storage.urls import is_url, open_url


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
    """Metrics as a dict of str -> plain Python scalar (see ``state.metrics.clean_value``).

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


def storage_for(
    root: Any, storage_options: Mapping[str, Any] | None = None, local_first: Any = None
) -> Storage:
    """The storage of ``root``: a local directory for a path, an S3 bucket for an
    ``s3://BUCKET/PREFIX`` URL (``storage_options`` or the ``AWS_*`` variables configure
    it; ``local_first``: committed in that local directory first, then uploaded), or
    the given ``Storage``."""
    if local_first is not None:
        return _local_first(root, storage_options, local_first)
    if isinstance(root, str | os.PathLike):
        text = str(os.fspath(root))
        if is_url(text):
            return open_url(text, storage_options)
        if storage_options is not None:
            raise ConfigError(
                "storage_options configure object-store roots only. Expected an s3:// root "
                f"with them. Received: root={text!r}. Drop storage_options for a local path."
            )
        refuse_checkpoint_root(text)
        return LocalStorage(text)
    if hasattr(root, "list_names"):
        return root  # type: ignore[no-any-return]
    raise ConfigError(f"root must be a path or a Storage. Received: root={root!r}.")


def _local_first(root: Any, storage_options: Mapping[str, Any] | None, local: Any) -> Storage:
    from safepoint.storage.localfirst import open_local_first

    text = str(os.fspath(root)) if isinstance(root, str | os.PathLike) else None
    if text is None or not is_url(text):
        raise ConfigError(
            "local_first commits to a local directory first and uploads to an object-store "
            f"root. Expected an s3:// root with it. Received: root={root!r}. Drop "
            "local_first for a local root (it is local already)."
        )
    if not isinstance(local, str | os.PathLike) or is_url(str(os.fspath(local))):
        raise ConfigError(
            "local_first must be a local directory path. Expected a path such as "
            f"'/nvme/ckpt'. Received: local_first={local!r}. Pass a directory on a local disk."
        )
    refuse_checkpoint_root(str(os.fspath(local)))
    return open_local_first(str(os.fspath(local)), open_url(text, storage_options))


def keep_policy(keep: Any, monitor: str | None) -> Keep | None:
    if keep is not None and not isinstance(keep, Keep):
        raise ConfigError(f"keep must be a safepoint.Keep or None. Received: keep={keep!r}.")
    if keep is not None and keep.best and monitor is None:
        raise ConfigError(
            f"keep={keep!r} keeps the best checkpoints but no monitor was given. Pass "
            "monitor='val_loss' (or another metric), or drop best= from Keep."
        )
    return keep


def flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be True or False. Received: {value!r}.")
    return value


def staging_bytes(value: Any) -> int:
    """``max_staging_bytes``: ``None`` is half the physical memory."""
    if value is None:
        return default_cap()
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(
            "max_staging_bytes must be a non-negative int or None (half the physical "
            f"memory). Received: max_staging_bytes={value!r}."
        )
    return value


def shard_size(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"shard_bytes must be a positive int. Received: {value!r}.")
    return value


__all__ = [
    "flag",
    "int_arg",
    "keep_policy",
    "metrics_arg",
    "shard_size",
    "staging_bytes",
    "storage_for",
]
