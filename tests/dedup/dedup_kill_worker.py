"""Child process of test_dedup_sigkill: dedup saves with retention, forever (until killed).

Every checkpoint's content is a function of its step, so the parent can check each
listed checkpoint bit-exactly after a SIGKILL at a random point.
"""

from __future__ import annotations

import sys

import numpy as np

import safepoint


def state_for(step: int) -> dict[str, np.ndarray]:
    frozen = np.arange(64 * 1024, dtype=np.float32)  # the same bytes at every step
    live = np.full(16 * 1024, step, dtype=np.float32)
    other = np.full(8 * 1024, step % 3, dtype=np.int32)  # repeats: shared with older steps
    return {"frozen": frozen, "live": live, "other": other}


def main(root: str, start: int, async_save: bool) -> None:
    with safepoint.CheckpointManager(
        root, dedup=True, keep=safepoint.Keep(last=3), async_save=async_save
    ) as mgr:
        step = start
        while True:
            mgr.save(state_for(step), step=step)
            step += 1


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1")
