"""``safepoint.lightning.CheckpointIO``: Lightning's checkpoint file I/O, through safepoint.

Lightning hands its plugin a checkpoint dict and a path ``dirpath/<name>.ckpt``. This
plugin commits it with :meth:`safepoint.CheckpointManager.save_file` on ``dirpath`` as
a state tree zip (:mod:`safepoint.formats.treezip`): tensors as raw bytes, everything
else as safepoint's JSON, the manifest sealed inside, fsynced and renamed into place.
A value the tree codec cannot encode (a lambda in the hyper-parameters) fails the save
with a ``ConfigError`` naming its key; nothing is pickled and nothing partial appears.
The managers write no run log, so ``dirpath`` holds nothing but the ``.ckpt`` files.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import torch

import safepoint
from safepoint.errors import CheckpointNotFoundError
from safepoint.formats import treezip
from safepoint.lightning.framework import BaseCheckpointIO


def _split(path: Any) -> tuple[str, str]:
    full = os.path.abspath(os.fspath(path))
    return os.path.dirname(full), os.path.basename(full)


def _number(value: Any) -> int | None:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


class CheckpointIO(BaseCheckpointIO):  # type: ignore[misc]
    """Lightning ``CheckpointIO`` plugin: ``Trainer(plugins=[CheckpointIO()])``."""

    def __init__(self) -> None:
        super().__init__()
        self._managers: dict[str, safepoint.CheckpointManager] = {}
        self._mutex = threading.Lock()

    def manager(self, dirpath: str) -> safepoint.CheckpointManager:
        """The manager of ``dirpath`` (one per folder, kept for the plugin's life)."""
        with self._mutex:
            found = self._managers.get(dirpath)
            if found is None:
                found = safepoint.CheckpointManager(dirpath, run_log=False)
                self._managers[dirpath] = found
            return found

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(
                "`Trainer.save_checkpoint(..., storage_options=...)` with `storage_options` arg"
                f" is not supported for `{type(self).__name__}`. Please implement your custom "
                "`CheckpointIO` to define how you'd like to use `storage_options`."
            )
        root, name = _split(path)
        os.makedirs(root, exist_ok=True)
        self.manager(root).save_file(
            name,
            lambda staged: treezip.write(staged, checkpoint),
            step=_number(checkpoint.get("global_step")),
            epoch=_number(checkpoint.get("epoch")),
            layout=treezip.LAYOUT,
        )

    def load_checkpoint(
        self, path: Any, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        del weights_only  # nothing here is ever unpickled: every load is "weights only"
        full = os.path.abspath(os.fspath(path))
        if not os.path.exists(full):
            raise FileNotFoundError(f"Checkpoint file not found: {full}")
        loaded: dict[str, Any] = safepoint.load(full, as_numpy=False)
        if isinstance(map_location, str | torch.device):
            return _move(loaded, torch.device(map_location))
        return loaded

    def remove_checkpoint(self, path: Any) -> None:
        root, name = _split(path)
        if not os.path.lexists(os.path.join(root, name)):
            return
        mgr = self.manager(root)
        try:
            mgr.delete(name, reason="lightning")
        except CheckpointNotFoundError:  # not one of ours (or gone): Lightning's own way
            if os.path.isfile(os.path.join(root, name)):
                os.remove(os.path.join(root, name))
        finally:
            mgr.release_lock()

    def teardown(self) -> None:
        with self._mutex:
            managers, self._managers = list(self._managers.values()), {}
        for mgr in managers:
            mgr.close()


def _move(node: Any, device: torch.device) -> Any:
    if isinstance(node, torch.Tensor):
        return node.to(device)
    if isinstance(node, dict):
        return type(node)((k, _move(v, device)) for k, v in node.items())
    if isinstance(node, list | tuple):
        return type(node)(_move(v, device) for v in node)
    return node


def load_from_checkpoint(cls: Any, path: Any, **kwargs: Any) -> Any:
    """``cls.load_from_checkpoint(path)`` for a safepoint ``.ckpt``: Lightning's own
    classmethod reads files with ``torch.load`` (pickle), which safepoint files are not.

    Builds ``cls(**hyper_parameters, **kwargs)`` and loads the weights strictly.
    """
    checkpoint = CheckpointIO().load_checkpoint(path)
    params = {**dict(checkpoint.get("hyper_parameters") or {}), **kwargs}
    model = cls(**params)
    model.on_load_checkpoint(checkpoint)
    model.load_state_dict(checkpoint["state_dict"])
    return model


__all__ = ["CheckpointIO", "load_from_checkpoint"]
