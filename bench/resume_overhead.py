"""What exact resumes cost a training loop when nothing is saved.

* ``ModelCheckpoint.on_batch_end`` on a batch that does not save (``save_freq=N`` with N
  far away, and ``save_freq="epoch"``), without and with a ``save_on_signal`` guard
  installed (the guard adds one timestamp per call). Target: < 20 us per call.
* Capturing the state that makes a resume exact, per save: ``safepoint.torch.RNGState``
  (Python, NumPy, torch CPU [+ CUDA]), a ``ResumableSampler`` in the middle of a
  DataLoader pass (position + torch generator), both together through the state-tree
  codec (``flatten``: what ``save()`` does before writing), and building the sampler's
  permutation at the start of an epoch (1M samples).

Each figure is the median over ``--reps`` repetitions of a timed loop of ``--calls``
calls (``time.perf_counter_ns``), divided by the number of calls.

    python bench/resume_overhead.py
    python bench/resume_overhead.py --calls 20000 --reps 5
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
from torch.utils.data import DataLoader

import safepoint
from safepoint.state.tree import flatten
from safepoint.torch import ResumableSampler, RNGState


def per_call_us(fn: Callable[[], object], calls: int, reps: int) -> float:
    """Median over ``reps`` of the mean time of one call of ``fn``, in microseconds."""
    for _ in range(min(calls, 1000)):  # warm caches and lazy imports
        fn()
    samples = []
    for _ in range(reps):
        start = time.perf_counter_ns()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter_ns() - start) / calls / 1000)
    return statistics.median(samples)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=100_000)
    p.add_argument("--reps", type=int, default=7)
    args = p.parse_args()
    calls, reps = args.calls, args.reps
    rows: list[tuple[str, float]] = []

    with tempfile.TemporaryDirectory() as root:
        mgr = safepoint.CheckpointManager(root)
        state = {"x": 0}
        every_n = safepoint.ModelCheckpoint(mgr, state=state, save_freq=10**12)
        per_epoch = safepoint.ModelCheckpoint(mgr, state=state, save_freq="epoch")
        logs = {"loss": 0.25, "accuracy": 0.5}

        def batch_end_n() -> object:
            return every_n.on_batch_end(3, logs)

        def batch_end_epoch() -> object:
            return per_epoch.on_batch_end(3, logs)

        rows.append(("on_batch_end, save_freq=N, no save", per_call_us(batch_end_n, calls, reps)))
        rows.append(("on_batch_end, save_freq='epoch'", per_call_us(batch_end_epoch, calls, reps)))
        with mgr.save_on_signal(state):
            guarded = per_call_us(batch_end_n, calls, reps)
        rows.append(("on_batch_end, save_freq=N, guard installed", guarded))
        mgr.close()
    assert every_n.last_saved is None and per_epoch.last_saved is None  # nothing was saved

    few = max(calls // 20, 100)
    rng = RNGState()
    rows.append(("RNGState().state_dict()", per_call_us(rng.state_dict, few, reps)))
    data = list(range(50_000))
    sampler = ResumableSampler(data, seed=0)
    loader = DataLoader(data, batch_size=32, sampler=sampler)
    it = iter(loader)
    for _ in range(100):
        next(it)  # mid-pass: the sampler saves its position and torch's generator
    assert "torch_rng" in sampler.state_dict()
    rows.append(
        ("ResumableSampler.state_dict(), mid-pass", per_call_us(sampler.state_dict, few, reps))
    )
    both = {"rng": rng, "sampler": sampler}
    rows.append(
        (
            "flatten(rng + sampler): what save() captures",
            per_call_us(lambda: flatten(both), few, reps),
        )
    )
    big = ResumableSampler(range(1_000_000), seed=0)
    rows.append(
        (
            "epoch permutation, 1M samples (once per epoch)",
            per_call_us(lambda: big._order(3), 3, reps),
        )
    )
    del it

    print(
        f"# resume overhead (python {platform.python_version()}, torch {torch.__version__}, "
        f"{platform.machine()}, {calls} calls x {reps} reps)"
    )
    print("| measurement | per call |")
    print("| --- | ---: |")
    for name, us in rows:
        print(f"| {name} | {us:,.2f} us |")


if __name__ == "__main__":
    main()
