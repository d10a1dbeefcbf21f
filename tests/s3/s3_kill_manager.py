"""A writer for test_s3_manager_sigkill.py: a CheckpointManager on an S3 root that saves
(and prunes, Keep(last=2, best=1)) until it is killed. It prints each committed step."""

from __future__ import annotations

import json
import sys

import numpy as np
from lease_wait import take

import safepoint
from safepoint.storage.s3 import S3Storage


def loss_of(step: int) -> float:
    """A deterministic, bumpy loss: new bests now and then, never in order."""
    return ((step * 7919) % 101) / 100 + 1.0 / (step + 1)


def state_of(step: int) -> dict:
    rng = np.random.default_rng(step)
    size = (20 << 20) if step % 4 == 0 else 1000  # every 4th save: a multipart upload
    return {
        "w": rng.standard_normal(size // 4).astype(np.float32),
        "b": np.full(3, step, dtype=np.int64),
        "meta": {"step": step, "text": f"ü${step}"},
    }


def main() -> None:
    root, options, first = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
    storage = S3Storage(root, options, lease_ttl=0.2)
    # Take the lease before saying ready, waiting out one left by a killed writer: a
    # request it had in flight when it was killed may still land on the server.
    take(storage)  # waits out the killed writer's lease
    mgr = safepoint.CheckpointManager(
        storage, monitor="loss", mode="min", keep=safepoint.Keep(last=2, best=1)
    )
    print("ready", flush=True)
    for step in range(first, first + 10_000):
        mgr.save(state_of(step), step=step, metrics={"loss": loss_of(step)})
        print(f"committed {step}", flush=True)


if __name__ == "__main__":
    main()
