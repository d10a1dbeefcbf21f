"""What a URL given to the CLI names: a run root in a bucket, or one of its checkpoints.

An object store has no directories, so the local look (``stat``, ``listdir``) becomes
listings: a prefix whose names include committed checkpoints is a run root; a prefix
that is itself a committed checkpoint of its parent is a checkpoint; a prefix with
neither is empty (S3 cannot tell an empty prefix from a typo: the message says both).
Endpoint and credentials come from the ``AWS_*`` variables, as for the manager.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from safepoint.catalog.index import Catalog
from safepoint.errors import ConfigError
from safepoint.storage.local import LocalStorage
from safepoint.storage.urls import is_url, open_url, split_url

if TYPE_CHECKING:
    from safepoint.storage.protocol import Storage

__all__ = ["classify_url", "storage_at"]


def storage_at(path: str) -> Storage:
    """The storage of the root ``path``: a bucket prefix for a URL, else a directory."""
    return open_url(path) if is_url(path) else LocalStorage(path)


def _checkpoint_of_parent(url: str) -> bool:
    """Whether ``url`` is a committed checkpoint of the root one level up."""
    try:
        root, name = split_url(url)
    except ConfigError:  # s3://BUCKET: there is no level up
        return False
    return open_url(root).is_dir(name)


def classify_url(url: str, *, listing: bool) -> tuple[str, str, int]:
    """``(kind, detail, count)`` of a URL for :func:`safepoint.cli.pathkind.classify`:
    kind ``root``, ``checkpoint`` or ``empty``.

    Opening the location checks endpoint, credentials and bucket first, so a wrong one
    is reported as such (``StorageError``), not as a missing checkpoint.
    """
    storage = open_url(url)
    names = storage.list_names()
    if names:
        if not listing:
            return "root", "", 0
        listed = Catalog(storage).checkpoints()
        if listed:
            return "root", listed[-1].name, len(listed)
        return "root", "", 0  # every checkpoint damaged: still a run root
    if _checkpoint_of_parent(url):
        return "checkpoint", "directory", 0
    if storage.read_log():
        return "root", "", 0  # a run whose checkpoints were all deleted
    return "empty", "", 0
