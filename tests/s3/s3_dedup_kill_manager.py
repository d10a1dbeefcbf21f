"""A writer for test_s3_dedup_sigkill.py: a dedup CheckpointManager on an S3 root that
saves (and prunes, Keep(last=2)) until it is killed, printing each committed step.

The state meets every verdict of the dedup plan: a frozen base (a blob,
linked by hint after the first save), an EMA equal to it updated in place (hashed,
found), a head that changes every step (own file), and a numpy array that repeats
every third step (hashed; sometimes a blob an older checkpoint stored).
"""

from __future__ import annotations

import json
import sys
from typing import Any

import numpy as np
import torch
from lease_wait import take

import safepoint
from safepoint.storage.s3 import S3Storage

FROZEN = 1 << 20  # float32 elements: 4 MiB


class Run:
    def __init__(self) -> None:
        self.frozen = torch.arange(FROZEN, dtype=torch.float32)
        self.ema = self.frozen.clone()
        self.head = torch.zeros(4096)

    def state(self, step: int) -> dict[str, Any]:
        self.head.fill_(float(step))
        self.ema.mul_(1.0)
        return {
            "frozen": self.frozen,
            "ema": self.ema,
            "head": self.head,
            "other": np.full(2048, step % 3, dtype=np.int32),
            "step": step,
        }


def main() -> None:
    root, options, first = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
    storage = S3Storage(root, options, lease_ttl=0.2)
    take(storage)  # waits out the killed writer's lease
    mgr = safepoint.CheckpointManager(storage, dedup=True, keep=safepoint.Keep(last=2))
    run = Run()
    print("ready", flush=True)
    for step in range(first, first + 10_000):
        mgr.save(run.state(step), step=step)
        print(f"committed {step}", flush=True)


if __name__ == "__main__":
    main()
