"""A writer for test_s3_local_first.py: a local-first CheckpointManager on an S3 root that
saves (Keep(last=3)) until killed, printing each step once ``save()`` returned."""

from __future__ import annotations

import json
import sys

import numpy as np

import safepoint


def state_of(step: int) -> dict:
    rng = np.random.default_rng(step)
    size = (6 << 20) if step % 3 == 0 else 4000  # some uploads take a while
    return {"w": rng.standard_normal(size // 4).astype(np.float32), "meta": {"step": step}}


def main() -> None:
    root, local, options = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    first = int(sys.argv[4])
    mgr = safepoint.CheckpointManager(
        root, local_first=local, storage_options=options, keep=safepoint.Keep(last=3)
    )
    print("ready", flush=True)
    for step in range(first, first + 10_000):
        mgr.save(state_of(step), step=step)
        print(f"committed {step}", flush=True)


if __name__ == "__main__":
    main()
