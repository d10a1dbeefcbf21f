"""The next writer after a killed one, for the SIGKILL tests of tests/s3."""

from __future__ import annotations

import time

from safepoint.errors import StorageError
from safepoint.storage.s3 import S3Storage


def successor(root: str, options: dict, *, within: float = 15.0) -> S3Storage:
    """A storage holding ``root``'s lease, once the killed writer's (a short ttl) lapsed.

    Cleanup runs with no grace period (``stale_after=-1``): nothing else writes.
    """
    storage = S3Storage(root, options, stale_after=-1.0)
    deadline = time.monotonic() + within
    while True:
        try:
            storage.lock()
            return storage
        except StorageError as exc:
            assert "leased by another writer" in str(exc)
            assert time.monotonic() < deadline
            time.sleep(0.1)
