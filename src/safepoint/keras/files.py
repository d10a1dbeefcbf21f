"""Keras checkpoint files: which format a path asks for, and how each one is written.

The suffix decides, as in Keras (plus Keras 2's HDF5 suffixes, which Keras 3 refuses):

=============  =================  =====================================================
suffix         save_weights_only  written with
=============  =================  =====================================================
``.keras``     False              ``model.save`` (Keras 3 zip: config + weights)
``.weights.h5`` True              ``model.save_weights`` (Keras 3 weights)
``.h5/.hdf5``  False              Keras' legacy HDF5 model (config, weights, optimizer)
``.h5/.hdf5``  True               Keras' legacy HDF5 weights
=============  =================  =====================================================

Every one of them is read back by ``model.load_weights(path)`` (and the two model
formats by ``keras.models.load_model``). The writers write to the path they are
given; ``CheckpointManager.save_file`` gives them a staging path and commits the result.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from safepoint.errors import ConfigError

KERAS = "keras-v3"
WEIGHTS = "keras-weights-h5"
LEGACY_MODEL = "keras-legacy-h5-model"
LEGACY_WEIGHTS = "keras-legacy-h5-weights"


def layout_for(filepath: str, save_weights_only: bool) -> str:
    """The file layout ``filepath`` asks for; ``ConfigError`` when it contradicts the flag."""
    if filepath.endswith(".weights.h5"):
        if save_weights_only:
            return WEIGHTS
        raise ConfigError(
            "The filepath ends in `.weights.h5` (Keras weights format) but "
            "save_weights_only=False asks for the whole model. Expected `.keras`, `.h5` or "
            f"`.hdf5` for a model. Received: filepath={filepath}. Pass "
            "save_weights_only=True, or end the filepath in `.keras`."
        )
    if filepath.endswith((".h5", ".hdf5")):
        return LEGACY_WEIGHTS if save_weights_only else LEGACY_MODEL
    if filepath.endswith(".keras"):
        if not save_weights_only:
            return KERAS
        raise ConfigError(
            "When using `save_weights_only=True` in `ModelCheckpoint`, the filepath provided "
            "must end in `.weights.h5` (Keras weights format) or `.h5`/`.hdf5` (legacy HDF5 "
            f"weights). Received: filepath={filepath}. Use a `.weights.h5` name, or pass "
            "save_weights_only=False to save the whole model as `.keras`."
        )
    wanted = (
        "`.weights.h5`, `.h5` or `.hdf5`" if save_weights_only else "`.keras`, `.h5` or `.hdf5`"
    )
    raise ConfigError(
        f"The filepath provided must end in {wanted} (save_weights_only={save_weights_only}). "
        f"Received: filepath={filepath}. Add one of those suffixes."
    )


def writer(model: Any, layout: str) -> Callable[[str], None]:
    """A function writing ``model`` in ``layout`` to the path it is given."""
    if layout == KERAS:
        return lambda path: model.save(path, overwrite=True)
    if layout == WEIGHTS:
        return lambda path: model.save_weights(path, overwrite=True)

    def write_legacy(path: str) -> None:
        import h5py
        from keras.src.legacy.saving import legacy_h5_format

        with h5py.File(path, "w") as h5:
            if layout == LEGACY_MODEL:
                legacy_h5_format.save_model_to_hdf5(model, h5, include_optimizer=True)
            else:
                legacy_h5_format.save_weights_to_hdf5_group(h5, model)

    return write_legacy


__all__ = ["KERAS", "LEGACY_MODEL", "LEGACY_WEIGHTS", "WEIGHTS", "layout_for", "writer"]
