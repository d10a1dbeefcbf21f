"""A writer for test_s3_sigkill.py: saves and prunes on an S3 root until it is killed."""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys

from safepoint.storage.s3 import S3Storage


def main() -> None:
    root, options, first = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
    storage = S3Storage(root, options, lease_ttl=0.2)
    storage.lock()
    print("ready", flush=True)
    rng = random.Random(os.getpid())
    for step in range(first, first + 10_000):
        payload = rng.randbytes(rng.choice([100, 70_000, 6 << 20]))
        staged = storage.stage(f"step-{step:06d}")
        writer = storage.open_write(f"{staged}/model.bin")
        writer.write([memoryview(payload)])
        writer.close()
        record = {"sha256": hashlib.sha256(payload).hexdigest(), "size": len(payload)}
        storage.write_file(f"{staged}/manifest.json", json.dumps(record).encode(), stage="manifest")
        storage.commit(staged, f"step-{step:06d}")
        names = storage.list_names()
        for old in names[:-2]:
            storage.remove(old)


if __name__ == "__main__":
    main()
