"""One rank of the multi-rank tests: ``python dist_worker.py MODE ROOT OUT`` with torch's
env:// variables (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) set by the test.

Modes: ``train`` (FSDP2 run of STEPS steps, saves at SAVE_AT, writes the final weights),
``resume`` (restores the latest checkpoint and finishes the same run), ``snapshot``
(saves the state once and writes the full state it saved), ``load`` (restores onto this
world size and writes the full state it got), ``dcpload`` (loads a DCP checkpoint of
DCP_DIR), ``hang`` (a save where rank KILL_RANK waits to be killed before the vote),
``async`` (an async save: the state is dumped and trained on while it is written; with
FAIL_WRITE=1 rank 1's background write fails), ``hangcommit`` (a good save at step 2,
then a save at step 4 whose rank 0 waits to be killed inside its commit, or with
KILL_AT=write while writing its file, before the vote).
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import safepoint
import safepoint.distributed
from safepoint.distributed import PerRank, reseed
from safepoint.torch import RNGState

STEPS, SAVE_AT = 6, 3


def build(world: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(1234)
    # 7 and 5 rows: uneven shards over 2, 3 and 4 ranks
    model = torch.nn.Sequential(torch.nn.Linear(6, 7), torch.nn.Dropout(0.2), torch.nn.Linear(7, 5))
    if world > 1 and not os.environ.get("DDP"):
        mesh = init_device_mesh("cpu", (world,))
        for layer in (model[0], model[2]):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    optim = torch.optim.AdamW(model.parameters(), lr=0.05)
    return model, optim


def state_of(model: torch.nn.Module, optim: torch.optim.Optimizer, step: int) -> dict:
    model_sd, optim_sd = get_state_dict(model, optim)
    return {
        "model": model_sd,
        "optim": optim_sd,
        "rng": PerRank(RNGState(), reseed(99)),
        "step": step,
        "table": np.full((2, 3), float(step)),  # a plain numpy leaf, replicated
    }


def train_step(model: torch.nn.Module, optim: torch.optim.Optimizer) -> None:
    x = torch.randn(4, 6)  # per-rank data from per-rank RNG
    loss = model(x).pow(2).mean()
    optim.zero_grad()
    loss.backward()
    optim.step()


def full(value: object) -> object:
    if isinstance(value, DTensor):
        return value.full_tensor()
    return value


def dump(state: dict, path: str) -> None:
    arrays = {}

    def walk(prefix: str, node: object) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}/{k}", v)
        elif isinstance(node, torch.Tensor):
            arrays[prefix] = full(node).detach().cpu().numpy()

    walk("", {"model": state["model"], "optim": state["optim"]["state"]})
    if "table" in state:
        arrays["/table"] = state["table"]
    if int(os.environ.get("RANK", "0")) == 0:
        np.savez(path, **arrays)


def main() -> None:
    mode, root, out = sys.argv[1:4]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        dist.init_process_group("gloo")
    torch.manual_seed(100 + rank)
    model, optim = build(world)
    timeout = float(os.environ.get("SP_TIMEOUT", "60"))
    group = safepoint.distributed.Collective(timeout=timeout) if world > 1 else None
    mgr = safepoint.CheckpointManager(root, run_log=False, group=group, async_save=mode == "async")
    if mode == "train":
        for step in range(1, STEPS + 1):
            train_step(model, optim)
            if step == SAVE_AT:
                mgr.save(state_of(model, optim, step), step=step)
        dump(state_of(model, optim, STEPS), out)
    elif mode == "resume":
        state = state_of(model, optim, 0)
        mgr.restore(state)
        set_state_dict(
            model, optim, model_state_dict=state["model"], optim_state_dict=state["optim"]
        )
        for _ in range(state["step"] + 1, STEPS + 1):
            train_step(model, optim)
        dump(state_of(model, optim, STEPS), out)
    elif mode == "snapshot":
        for _ in range(2):
            train_step(model, optim)
        step = int(os.environ.get("SP_STEP", "2"))
        for _ in range(step - 2):
            train_step(model, optim)
        state = state_of(model, optim, step)
        fail = os.environ.get("FAIL")
        if fail and rank == 1:
            state["extra"] = object() if fail == "value" else torch.zeros(3)
        elif fail:
            state["extra"] = torch.zeros(2)
        try:
            mgr.save(state, step=step)
        except safepoint.SafepointError as exc:
            if not fail:
                raise
            with open(out + f".err{rank}", "w") as f:
                f.write(f"{type(exc).__name__}: {exc}")
            return
        if "DCP_DIR" in os.environ:
            dcp.save(
                {"model": state["model"], "optim": state["optim"]},
                checkpoint_id=os.environ["DCP_DIR"],
            )
        dump(state, out)
    elif mode == "load":
        state = state_of(model, optim, 0)
        mgr.restore(state)
        dump(state, out)
    elif mode == "dcpload":
        state = state_of(model, optim, 0)
        ref = {"model": state["model"], "optim": state["optim"]}
        dcp.load(ref, checkpoint_id=os.environ["DCP_DIR"])
        set_state_dict(model, optim, model_state_dict=ref["model"], optim_state_dict=ref["optim"])
        theirs = state_of(model, optim, 0)
        del theirs["table"]  # DCP loaded only the model and optimizer
        dump(theirs, out)
    elif mode == "hang":
        kill = int(os.environ["KILL_RANK"])
        for _ in range(2):
            train_step(model, optim)
        if rank == kill:
            open(out + f".ready{rank}", "w").close()
            time.sleep(600)
        started = time.monotonic()
        try:
            mgr.save(state_of(model, optim, 2), step=2)
        except safepoint.StorageError as exc:
            with open(out + f".err{rank}", "w") as f:
                f.write(f"{time.monotonic() - started:.1f} {exc}")
    elif mode == "async":
        if os.environ.get("FAIL_WRITE") and rank == 1:

            def broken(*args: object, **kwargs: object) -> object:
                raise OSError(28, "No space left on device (injected)")

            safepoint.distributed.saving.write_boxes = broken  # type: ignore[assignment]
        for _ in range(2):
            train_step(model, optim)
        state = state_of(model, optim, 2)
        started = time.monotonic()
        mgr.save(state, step=2)  # returns once the snapshot is taken
        dump(state, out)  # collectives on the default group while the save is written
        train_step(model, optim)  # changes the live tensors: not what is saved
        try:
            mgr.wait()
        except safepoint.SafepointError as exc:
            with open(out + f".err{rank}", "w") as f:
                f.write(f"{type(exc).__name__}: {exc}")
        with open(out + f".took{rank}", "w") as f:
            f.write(f"{time.monotonic() - started:.1f}")
    elif mode == "hangcommit":
        for _ in range(2):
            train_step(model, optim)
        mgr.save(state_of(model, optim, 2), step=2)
        if rank == 0:

            def stuck(*args: object) -> object:
                open(out + ".ready0", "w").close()
                time.sleep(600)
                raise AssertionError("not killed")

            if os.environ.get("KILL_AT") == "write":  # before the vote
                safepoint.distributed.saving.write_boxes = stuck  # type: ignore[assignment]
            else:  # the manifest is staged, not renamed
                mgr.storage.commit = stuck  # type: ignore[method-assign]
        train_step(model, optim)
        started = time.monotonic()
        try:
            mgr.save(state_of(model, optim, 4), step=4)
        except safepoint.StorageError as exc:
            with open(out + f".err{rank}", "w") as f:
                f.write(f"{time.monotonic() - started:.1f} {exc}")
    mgr.close()
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
