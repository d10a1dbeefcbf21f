"""A real PyTorch training loop, run as a subprocess by the resume tests.

A small MLP with dropout on synthetic data, a shuffled DataLoader over a
``ResumableSampler``, Adam, StepLR and a CPU ``GradScaler`` under bfloat16 autocast,
checkpointed every 5 batches by ``safepoint.ModelCheckpoint`` and guarded by
``save_on_signal``. It resumes from its root when run again. At the end it writes the
final model, optimizer, scheduler, scaler and loss history to ``--out`` (a safepoint
root), which the tests compare byte for byte with an uninterrupted run's.

``--kill-at N`` sends SIGKILL to itself right after step N's optimizer step, before the
step is checkpointed; ``--sleep`` slows each step so a parent can signal it mid-epoch.
Every step prints ``step N`` so the parent can follow.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import safepoint
from safepoint.torch import ResumableSampler, RNGState

EPOCHS = 3
SAMPLES = 300
BATCH = 16  # 19 batches per epoch, the last one partial


def build(workers: int) -> tuple[dict, DataLoader]:
    torch.manual_seed(1234)
    g = torch.Generator().manual_seed(99)
    x = torch.randn(SAMPLES, 16, generator=g)
    y = (x[:, :4].sum(dim=1, keepdim=True) > 0).float()
    dataset = TensorDataset(x, y)
    model = nn.Sequential(
        nn.Linear(16, 32),
        nn.ReLU(),
        nn.Dropout(0.3),
        nn.Linear(32, 16),
        nn.ReLU(),
        nn.Linear(16, 1),
    )
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    scaler = torch.amp.GradScaler("cpu")
    sampler = ResumableSampler(dataset, seed=5)
    loader = DataLoader(dataset, batch_size=BATCH, sampler=sampler, num_workers=workers)
    state = {
        "model": model,
        "optimizer": opt,
        "scheduler": sched,
        "scaler": scaler,
        "sampler": sampler,
        "rng": RNGState(),
        "epoch": 0,
        "history": [],
    }
    return state, loader


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--root", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--kill-at", type=int, default=None)
    p.add_argument("--sleep", type=float, default=0.0)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    state, loader = build(args.workers)
    model, opt, scaler = state["model"], state["optimizer"], state["scaler"]
    mgr = safepoint.CheckpointManager(args.root, keep=safepoint.Keep(last=2))
    callback = safepoint.ModelCheckpoint(mgr, state=state, save_freq=5)
    state["callback"] = callback
    ckpt = mgr.restore(state, missing_ok=True)
    if ckpt is not None:
        print(f"resumed {ckpt.name} at step {callback.step}", flush=True)
    mgr.save_on_signal(state)
    loss_fn = nn.BCEWithLogitsLoss()
    for epoch in range(state["epoch"], EPOCHS):
        model.train()
        for batch, (x, y) in enumerate(loader):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(x)
            loss = loss_fn(out.float(), y)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            state["history"].append(loss.item())
            step = len(state["history"])
            print(f"step {step}", flush=True)
            if step == args.kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            if args.sleep:
                time.sleep(args.sleep)
            callback.on_batch_end(batch, {"loss": loss.item()})
        state["scheduler"].step()
        state["epoch"] = epoch + 1
    final = {k: state[k] for k in ("model", "optimizer", "scheduler", "scaler", "history")}
    with safepoint.CheckpointManager(args.out) as out:
        out.save(final, step=len(state["history"]))
    mgr.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
