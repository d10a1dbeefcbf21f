"""Multi-rank checkpointing: safepoint vs torch.distributed.checkpoint on one FSDP2 state.

``python bench/distributed.py --mib 256 --ranks 2 4 --reps 3`` launches, for each rank
count, that many processes (gloo, CPU device mesh) holding an FSDP2-sharded model of
``--mib`` MiB of float32 weights (``Linear(1024, 1024)`` layers), and in each rep, in
the same run and on the same disk:

* ``safepoint save``: ``CheckpointManager.save`` (every rank writes its shards, fsync,
  vote, atomic commit); multi-rank saves are synchronous, so the stall is the save;
* ``dcp.save``; ``dcp.async_save``: stall (until the call returns) and total (until its
  future is done);
* restores: ``CheckpointManager.restore`` into the live state, ``dcp.load``.

Times are rank 0's, between barriers. Medians over the reps are printed as a Markdown
table, raw samples as JSON. The page cache is not dropped (no root here): restores read
from memory on both sides.
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
    mgr = safepoint.CheckpointManager(os.path.join(workdir, "sp"), run_log=False)

    def timed(fn: object) -> float:
        dist.barrier()
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        dist.barrier()
        return time.perf_counter() - t0

    samples: list[dict[str, float]] = []
    for rep in range(reps):
        row: dict[str, float] = {}
        row["safepoint save"] = timed(lambda rep=rep: mgr.save(state, step=rep))
        path = os.path.join(workdir, f"dcp-{rep}")
        row["dcp.save"] = timed(lambda path=path: dcp.save(state, checkpoint_id=path))
        apath = os.path.join(workdir, f"dcpa-{rep}")
        dist.barrier()
        t0 = time.perf_counter()
        fut = dcp.async_save(state, checkpoint_id=apath)
        row["dcp.async_save stall"] = time.perf_counter() - t0
        fut.result()
        dist.barrier()
        row["dcp.async_save total"] = time.perf_counter() - t0
        row["safepoint restore"] = timed(lambda: mgr.restore(state))
        row["dcp.load"] = timed(lambda path=path: dcp.load(state, checkpoint_id=path))
        samples.append(row)
        if rank == 0:
            for p in (path, apath):
                shutil.rmtree(p, ignore_errors=True)
    if rank == 0:
        print("RESULT " + json.dumps(samples))
    mgr.close()
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
    print(f"| ranks | {args.mib} MiB FSDP2 state | median | samples |")
    print("| --- | --- | --- | --- |")
    for world in args.ranks:
        samples = launch(world, args.mib, args.reps)
        for key in samples[0]:
            values = [s[key] for s in samples]
            med = statistics.median(values)
            raw = ", ".join(f"{v * 1000:.0f}" for v in values)
            print(f"| {world} | {key} | {med * 1000:.0f} ms | {raw} |", flush=True)


if __name__ == "__main__":
    main()
