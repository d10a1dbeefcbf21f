"""A training loop over torchdata's ``StatefulDataLoader``, run as a subprocess by
``test_stateful_loader.py``: dropout on, shuffling, ``RNGState`` in the state,
checkpointed every 5 batches. ``--kill-at N`` SIGKILLs itself after step N's optimizer
step; run again, it resumes from its root. At the end the final model, optimizer and
loss history go to ``--out`` (a safepoint root) for a bit-for-bit comparison.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

import torch
from torch import nn
from torch.utils.data import TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader

import safepoint
from safepoint.torch import RNGState

EPOCHS = 3
SAMPLES = 190
BATCH = 19  # 10 batches per epoch: the save at step 10 is an epoch's last batch


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--root", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--kill-at", type=int, default=None)
    p.add_argument("--rng-first", action="store_true", help="RNGState before the loader")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(1234)
    g = torch.Generator().manual_seed(99)
    x = torch.randn(SAMPLES, 8, generator=g)
    y = (x[:, :3].sum(dim=1, keepdim=True) > 0).float()
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 1))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    loader = StatefulDataLoader(
        TensorDataset(x, y), batch_size=BATCH, shuffle=True, num_workers=args.workers
    )
    state: dict = {"model": model, "optimizer": opt}
    if args.rng_first:
        state["rng"] = RNGState()
    state["loader"] = loader
    state["rng"] = RNGState()
    state.update(epoch=0, history=[])
    mgr = safepoint.CheckpointManager(args.root, keep=safepoint.Keep(last=2))
    callback = safepoint.ModelCheckpoint(mgr, state=state, save_freq=5)
    state["callback"] = callback
    ckpt = mgr.restore(state, missing_ok=True)
    if ckpt is not None:
        print(f"resumed {ckpt.name} at step {callback.step}", flush=True)
    loss_fn = nn.BCEWithLogitsLoss()
    for epoch in range(state["epoch"], EPOCHS):
        callback.on_epoch_begin(epoch)
        for batch, (xb, yb) in enumerate(loader):
            opt.zero_grad()
            loss = loss_fn(model(xb), yb)
            loss.backward()
            opt.step()
            state["history"].append(loss.item())
            step = len(state["history"])
            print(f"step {step}", flush=True)
            if step == args.kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            callback.on_batch_end(batch, {"loss": loss.item()})
        state["epoch"] = epoch + 1
    with safepoint.CheckpointManager(args.out) as out:
        out.save({"model": model, "optimizer": opt, "history": state["history"]}, step=1)
    mgr.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
