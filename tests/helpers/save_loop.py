"""Child process for the SIGKILL test: resume from the latest checkpoint, then save forever.

Usage: ``python save_loop.py ROOT``. Each state is 1-4 MiB whose bytes depend only on
the step, so the parent can recompute what any step must hold. After each ``save()``
returns, the child prints ``returned <step> <hash>`` and flushes: the parent's oracle
of what is durable. The parent kills this process with SIGKILL at random moments.
"""

from __future__ import annotations

import sys

import numpy as np
import xxhash

import safepoint

MIB = 1 << 20


def state_for(step: int) -> dict[str, object]:
    """The state saved at ``step``: sizes and bytes are a pure function of the step."""
    rng = np.random.default_rng(step)
    size = MIB + (step * 397 % 3) * MIB + step % 4096
    return {
        "blob": np.frombuffer(rng.bytes(size), dtype=np.uint8),
        "weights": rng.standard_normal((64, 64)).astype(np.float32),
        "step": step,
    }


def state_hash(state: dict[str, object]) -> str:
    h = xxhash.xxh3_64()
    for key in ("blob", "weights"):
        h.update(np.ascontiguousarray(state[key]).tobytes())  # type: ignore[call-overload]
    h.update(str(state["step"]).encode())
    return h.hexdigest()


def main(root: str) -> None:
    mgr = safepoint.CheckpointManager(root, keep=safepoint.Keep(last=2))
    latest = mgr.latest()
    step = 1 if latest is None else int(latest.step or 0) + 1
    print(f"start {step}", flush=True)
    while True:
        state = state_for(step)
        mgr.save(state, step=step)
        print(f"returned {step} {state_hash(state)}", flush=True)
        step += 1


if __name__ == "__main__":
    main(sys.argv[1])
