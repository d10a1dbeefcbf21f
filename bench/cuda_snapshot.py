"""The CUDA snapshot path of async saves: pinned staging, overlap with GPU compute.

For a session lent a GPU machine (see the device notes in the tool library): one short
script, ~4-8 GiB of float32 parameters on the GPU. It measures, in the same run:

* the device-to-host copy of the state into pinned memory allocated up front (the
  machine's limit for a snapshot) and into ordinary pageable memory;
* ``CheckpointManager(async_save=True).save()`` every few steps of a GPU training
  step (matmuls): the time ``save()`` takes to return (the stall, first save apart),
  whether the staging memory was page-locked, and the step time while the background
  persist runs against the step time without checkpoints;
* correctness: the last checkpoint is read back and compared bit for bit with a host
  copy of the state taken at that save.

``--device cpu`` runs the same code on the CPU (the smoke test does, with tiny sizes);
CUDA numbers only mean something on a GPU. Exits with status 2 when CUDA is asked for
and absent.

    python bench/cuda_snapshot.py --gib 4 --dir /tmp/safepoint-cuda     # on the GPU machine
    python bench/cuda_snapshot.py --device cpu --gib 0.01 --saves 2      # smoke
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time

import torch

import safepoint


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_state(gib: float, count: int, device: torch.device) -> dict[str, torch.Tensor]:
    per = max(1024, int(gib * (1 << 30)) // 4 // count)
    gen = torch.Generator(device=device).manual_seed(0)
    return {f"layer{i:03d}": torch.rand(per, generator=gen, device=device) for i in range(count)}


def copy_limit(state: dict[str, torch.Tensor], pinned: bool, reps: int = 3) -> float:
    """Seconds to copy the state device->host into host memory allocated beforehand."""
    dst = {
        k: torch.empty(v.shape, dtype=v.dtype, pin_memory=pinned).fill_(0) for k, v in state.items()
    }
    device = next(iter(state.values())).device
    times = []
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        for k, v in state.items():
            dst[k].copy_(v, non_blocking=pinned)
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


class Step:
    """A GPU training step: ``reps`` matmuls of two 4096x4096 matrices, then an update."""

    def __init__(self, device: torch.device, ms: float) -> None:
        n = 4096 if device.type == "cuda" else 256
        self.a = torch.randn(n, n, device=device)
        self.b = torch.randn(n, n, device=device)
        self.device = device
        sync(device)
        t = time.perf_counter()
        for _ in range(10):
            self.a @ self.b
        sync(device)
        self.reps = max(1, round(ms / 1e3 / ((time.perf_counter() - t) / 10)))

    def __call__(self, state: dict[str, torch.Tensor], i: int) -> float:
        t = time.perf_counter()
        for _ in range(self.reps):
            self.a @ self.b
        layer = list(state.values())[i % len(state)]
        layer[:1].add_(1.0)
        sync(self.device)
        return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--gib", type=float, default=4.0)
    ap.add_argument("--count", type=int, default=64)
    ap.add_argument("--saves", type=int, default=5)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--step-ms", type=float, default=50.0)
    ap.add_argument("--dir", default="/tmp/safepoint-cuda")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("cuda_snapshot.py: CUDA is not available here; use --device cpu", file=sys.stderr)
        sys.exit(2)
    state = make_state(args.gib, args.count, device)
    size = sum(v.numel() * v.element_size() for v in state.values())
    pinned_s = copy_limit(state, pinned=device.type == "cuda")
    pageable_s = copy_limit(state, pinned=False)
    step = Step(device, args.step_ms)
    plain = [step(state, i) for i in range(args.every)]  # step time without checkpoints

    root = os.path.join(args.dir, "run")
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    stalls, during, expected = [], [], {}
    with safepoint.CheckpointManager(root, keep=safepoint.Keep(last=1), async_save=True) as mgr:
        for n in range(args.saves):
            for i in range(args.every):
                took = step(state, i)
                if n and i < args.every // 2:  # steps right after a save: persist running
                    during.append(took)
            t = time.perf_counter()
            mgr.save({"model": state}, step=n)
            stalls.append(time.perf_counter() - t)
            expected = {k: v.detach().to("cpu", copy=True) for k, v in state.items()}
        mgr.wait()
        pinned = mgr._staging._pinned
        latest = mgr.checkpoints()[-1]
    loaded = safepoint.load(latest.path, as_numpy=False)["model"]
    identical = all(torch.equal(loaded[k], expected[k]) for k in expected)
    shutil.rmtree(root, ignore_errors=True)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"# cuda_snapshot: {size / (1 << 30):.2f} GiB in {len(state)} tensors on {name}, "
        f"torch {torch.__version__}, {args.saves} saves every {args.every} steps\n"
    )
    kind = "pinned" if device.type == "cuda" else "pageable (no pinning on CPU)"
    print(f"device->host copy into {kind} memory: {pinned_s * 1e3:.0f} ms")
    print(f"device->host copy into pageable memory: {pageable_s * 1e3:.0f} ms")
    print(f"staging memory page-locked by safepoint: {pinned}")
    steady = statistics.median(stalls[1:]) if len(stalls) > 1 else stalls[0]
    print(
        f"save() stall: first {stalls[0] * 1e3:.0f} ms, then median {steady * 1e3:.0f} ms "
        f"({steady / pinned_s:.2f}x the first copy above)"
    )
    base = statistics.median(plain)
    if during:
        slow = statistics.median(during)
        print(
            f"step time: {base * 1e3:.1f} ms without checkpoints, {slow * 1e3:.1f} ms while a "
            f"persist runs ({100 * (slow - base) / base:+.1f}%)"
        )
    print(f"restored bytes identical to the state at the last save: {identical}")
    if not identical:
        sys.exit(1)


if __name__ == "__main__":
    main()
