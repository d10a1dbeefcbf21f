"""What holds a checkpoint: a directory, one HDF5 file, or a ``.keras`` zip.

Manifests written since issue 11 record it (``extra["container"]``); older ones say it
through their single-file record, or, having none, are directories.
"""

from __future__ import annotations

from safepoint.ondisk.embedded import KEY
from safepoint.ondisk.manifest import Manifest

#: ``extra[CONTAINER]``: what holds a checkpoint -- ``"directory"`` (payload files and
#: ``manifest.json``), ``"hdf5"`` (one HDF5 file) or ``"zip"`` (a ``.keras`` zip, whose
#: weights are an HDF5 member: its ``payload`` is ``"hdf5"``). Recorded since issue 11;
#: :func:`container_of` infers it for manifests written before.
CONTAINER = "container"
CONTAINERS = ("directory", "hdf5", "zip")


def container_of(found: Manifest) -> str:
    """``"directory"``, ``"hdf5"`` or ``"zip"``: what holds the checkpoint of ``found``.

    Read from ``extra["container"]``; a manifest written before that field existed
    says it through its single-file record (or, having none, is a directory).
    """
    recorded = found.extra.get(CONTAINER)
    if recorded in CONTAINERS:
        return str(recorded)
    record = found.extra.get(KEY)
    if isinstance(record, dict) and record.get("container") in ("hdf5", "zip"):
        return str(record["container"])
    return "directory"


__all__ = ["CONTAINER", "CONTAINERS", "container_of"]
