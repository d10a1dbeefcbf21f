"""The run log on S3: one small object per event, read back in time order.

S3 has no append, and rewriting one log object per event would cost a GET and a PUT of
the whole log each time (and lose events to a race). So each event is its own object,
``.sp-log/<time in ns, 20 digits>-<pid><random>.json``, written with ``If-None-Match: *``;
keys sort in time order. Like the local log it is informational: checkpoints are listed
from their records, never from the log.
"""

from __future__ import annotations

import os
import secrets
import time
from concurrent.futures import ThreadPoolExecutor

from safepoint.storage.s3.client import S3Client

LOG_PREFIX = ".sp-log"
#: ``read`` returns at most this many events (the newest): one GET each.
LOG_READ_EVENTS = 10_000


def append(client: S3Client, line: str) -> None:
    data = (line.rstrip("\n") + "\n").encode()
    tag = f"{os.getpid() % 100000:05d}{secrets.token_hex(4)}"
    key = f"{LOG_PREFIX}/{time.time_ns():020d}-{tag}.json"
    client.put(key, data, stage="log", mode="create")


def read(client: S3Client) -> bytes:
    """The newest ``LOG_READ_EVENTS`` events, oldest first, one line each."""
    keys = sorted(m["path"] for m in client.list_all(f"{LOG_PREFIX}/"))[-LOG_READ_EVENTS:]

    def fetch(key: str) -> bytes:
        try:
            data = client.get(key)[0]
        except FileNotFoundError:  # pruned by hand meanwhile
            return b""
        return data if data.endswith(b"\n") else data + b"\n"

    with ThreadPoolExecutor(max_workers=16) as pool:
        return b"".join(pool.map(fetch, keys))


__all__ = ["LOG_PREFIX", "append", "read"]
