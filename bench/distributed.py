"""Multi-rank checkpointing: safepoint vs torch.distributed.checkpoint on one FSDP2 state.

``python bench/distributed.py --mib 256 --ranks 2 4 --reps 3`` launches, for each rank
count, that many processes (gloo, CPU device mesh) holding an FSDP2-sharded model of
``--mib`` MiB of float32 weights (``Linear(1024, 1024)`` layers), and in each rep, in
the same run and on the same disk:

* ``safepoint save``: ``CheckpointManager.save`` (every rank writes its shards, fsync,
  vote, atomic commit), synchronous: the stall is the save; ``dcp.save``;
* ``safepoint async save`` (``async_save=True``) and ``dcp.async_save``: stall (until
  the call returns) and total (until ``wait()`` returns / the future is done);
* restores into the live state, ``CheckpointManager.restore`` and ``dcp.load``, cold
  (rank 0 writes back and drops the checkpoint's files from the page cache first,
  ``posix_fadvise(DONTNEED)``: read from the disk) and warm (right after: read from the
  page cache).

Times are rank 0's, between barriers; medians over the reps are printed as a Markdown
table. Extra memory: the largest, over ranks and reps, peak resident memory above the
start of the operation (Linux ``VmHWM``, reset through ``/proc/self/clear_refs``); for
the async saves it spans the call and the background write, and safepoint's includes
its staging memory the first time it is allocated (it is kept for the next saves).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any


def evict(path: str) -> None:
    """Drop ``path``'s files from the page cache (written back first): a cold read."""
    for folder, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


class PeakRSS:
    """Peak resident memory above the start, over a span (Linux: VmHWM reset by clear_refs)."""

    def __enter__(self) -> PeakRSS:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        self.base = _status("VmRSS")
        self.extra = 0
        return self

    def __exit__(self, *exc: object) -> None:
        self.extra = max(0, _status("VmHWM") - self.base)


def rank_main(mib: int, reps: int, workdir: str) -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import safepoint
    import safepoint.distributed

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    layers = [torch.nn.Linear(1024, 1024, bias=False) for _ in range(max(1, mib // 4))]
    model = torch.nn.Sequential(*layers)
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    state = {"model": get_state_dict(model, [])[0]}
    sp_root = os.path.join(workdir, "sp")
    mgr = safepoint.CheckpointManager(sp_root, run_log=False)
    amgr = safepoint.CheckpointManager(os.path.join(workdir, "spa"), run_log=False, async_save=True)
    times: dict[str, float] = {}
    memory: dict[str, float] = {}

    def timed(label: str, fn: Any, *, cold: str | None = None) -> None:
        if cold is not None and rank == 0:
            evict(cold)
        dist.barrier()
        with PeakRSS() as peak:
            t0 = time.perf_counter()
            fn()
            dist.barrier()
            times[label] = time.perf_counter() - t0
        memory[label] = peak.extra

    def stall(label: str, start: Any, finish: Any) -> None:
        dist.barrier()
        with PeakRSS() as peak:
            t0 = time.perf_counter()
            handle = start()
            times[label + " stall"] = time.perf_counter() - t0
            finish(handle)
            dist.barrier()
            times[label + " total"] = time.perf_counter() - t0
        memory[label] = peak.extra

    samples: list[dict[str, Any]] = []
    for rep in range(reps):
        times.clear()
        memory.clear()
        timed("safepoint save", lambda rep=rep: mgr.save(state, step=rep))
        path = os.path.join(workdir, f"dcp-{rep}")
        timed("dcp.save", lambda path=path: dcp.save(state, checkpoint_id=path))
        stall(
            "safepoint async save",
            lambda rep=rep: amgr.save(state, step=rep),
            lambda _: amgr.wait(),
        )
        apath = os.path.join(workdir, f"dcpa-{rep}")
        stall(
            "dcp.async_save",
            lambda apath=apath: dcp.async_save(state, checkpoint_id=apath),
            lambda fut: fut.result(),
        )
        latest = os.path.join(sp_root, f"step-{rep:08d}")
        timed("safepoint restore (cold)", lambda: mgr.restore(state), cold=latest)
        timed("dcp.load (cold)", lambda path=path: dcp.load(state, checkpoint_id=path), cold=path)
        timed("safepoint restore (warm)", lambda: mgr.restore(state))
        timed("dcp.load (warm)", lambda path=path: dcp.load(state, checkpoint_id=path))
        # every rank's extra memory; the table shows the largest
        labels = sorted(memory)
        mine = torch.tensor([memory[k] for k in labels], dtype=torch.float64)
        every = [torch.zeros_like(mine) for _ in range(world)]
        dist.all_gather(every, mine)
        peak = torch.stack(every).max(dim=0).values.tolist()
        samples.append({"times": dict(times), "memory": dict(zip(labels, peak, strict=True))})
        if rank == 0:
            for p in (path, apath):
                shutil.rmtree(p, ignore_errors=True)
    if rank == 0:
        print("RESULT " + json.dumps(samples))
    mgr.close()
    amgr.close()
    dist.destroy_process_group()


def launch(world: int, mib: int, reps: int) -> list[dict[str, float]]:
    workdir = tempfile.mkdtemp(prefix="sp-dist-bench-", dir=os.environ.get("BENCH_DIR"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    procs = []
    for rank in range(world):
        env = {
            **os.environ,
            "RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "OMP_NUM_THREADS": "1",
        }
        cmd = [sys.executable, __file__, "--rank-main", str(mib), str(reps), workdir]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True))
    outs = [p.communicate()[0] for p in procs]
    shutil.rmtree(workdir, ignore_errors=True)
    if any(p.returncode for p in procs):
        raise SystemExit(f"a rank failed: {[p.returncode for p in procs]}")
    line = next(x for x in outs[0].splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])  # type: ignore[no-any-return]


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--rank-main":
        rank_main(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
        return
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    print(f"| ranks | {args.mib} MiB FSDP2 state | median | samples (ms) | extra memory per rank |")
    print("| --- | --- | --- | --- | --- |")
    for world in args.ranks:
        samples = launch(world, args.mib, args.reps)
        for key in samples[0]["times"]:
            values = [s["times"][key] for s in samples]
            med = statistics.median(values)
            raw = ", ".join(f"{v * 1000:.0f}" for v in values)
            label = key.removesuffix(" stall").removesuffix(" total")
            mem = [s["memory"][label] for s in samples if label in s["memory"]]
            extra = f"{max(mem) / 2**20:.0f} MiB" if mem and not key.endswith(" stall") else ""
            print(f"| {world} | {key} | {med * 1000:.0f} ms | {raw} | {extra} |", flush=True)


if __name__ == "__main__":
    main()
