"""Killed writers and their successors, for the SIGKILL tests of tests/s3.

:func:`kill_round` runs one writer script until a random moment and SIGKILLs it;
:func:`take` is how a writer script waits out the lease of the one killed before it;
:func:`successor` is the test's own storage holding the root afterwards.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

from safepoint.errors import StorageError
from safepoint.storage.s3 import S3Storage

SRC = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "src"))


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


def take(storage: S3Storage, *, within: float = 15.0) -> None:
    """Lock ``storage`` (in a writer script), waiting out a killed writer's lease: a
    request it had in flight when it was killed may still land on the server."""
    deadline = time.monotonic() + within
    while True:
        try:
            storage.lock()
            return
        except StorageError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def kill_round(
    script: str, root: str, options: dict, first: int, rng: random.Random, wait: tuple[float, float]
) -> list[int]:
    """Run writer ``script`` from step ``first``, SIGKILL it once it said "ready" and a
    random time in ``wait`` passed; the steps it printed as "committed N"."""
    proc = subprocess.Popen(
        [sys.executable, script, root, json.dumps(options), str(first)],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": SRC},
    )
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
    time.sleep(rng.uniform(*wait))
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, proc.pid  # killed, not died of an error
    lines = proc.stdout.read().decode().split()
    proc.stdout.close()
    pairs = zip(lines[::2], lines[1::2], strict=True)
    return [int(v) for k, v in pairs if k == "committed"]
