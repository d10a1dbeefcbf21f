"""``safepoint demo``: train, crash with SIGKILL, resume, and prove the resume exact.

The seed's network (Dense 12 -> 8 -> 1, ReLU, sigmoid, Adam, binary cross-entropy,
batch size 10, a third of the data for validation) trained in PyTorch on
scikit-learn's breast-cancer data, or on any CSV with the label in the last column
(``--csv`` takes the seed's Pima file). A little dropout makes the random generators
matter, and the data comes through a ``DataLoader`` shuffled by
:class:`safepoint.torch.ResumableSampler`, so the data order matters too.

The run is checkpointed every ``--save-every`` batches (mid-epoch, by
``safepoint.ModelCheckpoint``) and at the end of every epoch, keeping the best (by
``val_acc``) and the last. ``--crash-at-epoch N`` kills the process with SIGKILL
half-way through epoch N, between two checkpoints. Run it again and it resumes from
the last committed checkpoint, in the middle of that epoch; at the end it retrains from
scratch without any checkpointing and compares the final weights byte for byte.
SIGTERM or Ctrl-C save a checkpoint at the next batch end and exit (``save_on_signal``).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import signal
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from safepoint.callback import ModelCheckpoint
from safepoint.manager import CheckpointManager
from safepoint.monitor import is_better, metric_value
from safepoint.retention import Keep

BATCH = 10


def load_data(csv: str | None, seed: int) -> tuple[str, Any, Any, Any, Any]:
    """Standardised features and labels, split 67/33 with a fixed permutation."""
    if csv:
        data = np.loadtxt(csv, delimiter=",", dtype=np.float64)
        x, y = data[:, :-1], data[:, -1]
        label = os.path.basename(csv)
    else:
        from sklearn.datasets import load_breast_cancer

        bunch = load_breast_cancer()
        x, y = bunch.data.astype(np.float64), bunch.target.astype(np.float64)
        label = "breast-cancer data (scikit-learn)"
    order = np.random.RandomState(seed).permutation(len(x))
    x, y = x[order], y[order]
    x = (x - x.mean(axis=0)) / (x.std(axis=0) + 1e-8)
    n_val = len(x) // 3
    import torch

    as_t = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    return (
        f"{label}: {len(x)} rows, {x.shape[1]} features",
        as_t(x[n_val:]),
        as_t(y[n_val:]).unsqueeze(1),
        as_t(x[:n_val]),
        as_t(y[:n_val]).unsqueeze(1),
    )


def build(n_features: int, seed: int) -> tuple[Any, Any]:
    import torch
    from torch import nn

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(n_features, 12),
        nn.ReLU(),
        nn.Dropout(0.1),
        nn.Linear(12, 8),
        nn.ReLU(),
        nn.Linear(8, 1),
        nn.Sigmoid(),
    )
    return model, torch.optim.Adam(model.parameters(), lr=1e-3)


def make_loader(x: Any, y: Any, seed: int) -> tuple[Any, Any]:
    """A shuffled DataLoader whose position is part of the checkpointed state."""
    from torch.utils.data import DataLoader, TensorDataset

    from safepoint.torch import ResumableSampler

    dataset = TensorDataset(x, y)
    sampler = ResumableSampler(dataset, seed=seed)
    return sampler, DataLoader(dataset, batch_size=BATCH, sampler=sampler)


def new_state(model: Any, opt: Any, sampler: Any) -> dict[str, Any]:
    """Everything the loop needs to continue exactly: the progress counters included.

    ``batch`` and ``loss_sum`` describe the epoch in progress, so an epoch resumed
    half-way reports the same mean loss as an uninterrupted one.
    """
    from safepoint.torch import RNGState

    return {
        "model": model,
        "optimizer": opt,
        "sampler": sampler,
        "rng": RNGState(),
        "epoch": 0,
        "batch": 0,
        "loss_sum": 0.0,
        "history": [],
    }


def train_epoch(
    model: Any, opt: Any, loader: Any, state: dict[str, Any], on_batch: Callable[[int], None]
) -> float:
    """Train the epoch in progress (the rest of it, after a resume); return its mean loss."""
    import torch

    model.train()
    loss_fn = torch.nn.BCELoss()
    for xb, yb in loader:
        opt.zero_grad()
        loss = loss_fn(model(xb), yb)
        loss.backward()
        opt.step()
        state["loss_sum"] += loss.item() * len(xb)
        state["batch"] += 1
        on_batch(state["batch"])
    mean = state["loss_sum"] / len(loader.sampler)
    state["history"].append(mean)
    state["batch"], state["loss_sum"] = 0, 0.0
    state["epoch"] += 1
    return mean


def evaluate(model: Any, x: Any, y: Any) -> float:
    import torch

    model.eval()
    with torch.no_grad():
        return float(((model(x) > 0.5).float() == y).float().mean())


def fingerprint(model: Any) -> str:
    h = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def reference_run(n_features: int, data: tuple[Any, ...], epochs: int, seed: int) -> str:
    """The same training, uninterrupted and without checkpoints: the oracle."""
    model, opt = build(n_features, seed)
    sampler, loader = make_loader(data[0], data[1], seed)
    state = new_state(model, opt, sampler)
    for _ in range(epochs):
        train_epoch(model, opt, loader, state, lambda b: None)
        evaluate(model, data[2], data[3])
    return fingerprint(model)


def run(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(1)  # one thread: the same float sums in every run
    torch.use_deterministic_algorithms(True)
    desc, x_tr, y_tr, x_val, y_val = load_data(args.csv, args.seed)
    n_features = x_tr.shape[1]
    model, opt = build(n_features, args.seed)
    sampler, loader = make_loader(x_tr, y_tr, args.seed)
    per_epoch = len(loader)
    mgr = CheckpointManager(
        args.root, name="step-{step:06d}", monitor="val_acc", keep=Keep(last=1, best=1)
    )
    state = new_state(model, opt, sampler)
    # Mid-epoch checkpoints every N batches; its own progress is part of the state.
    every_n = ModelCheckpoint(mgr, state=state, save_freq=args.save_every)
    state["checkpointing"] = every_n
    print(
        f"safepoint demo: {desc}; network {n_features}-12-8-1 with dropout, Adam, "
        f"batch {BATCH} ({per_epoch} per epoch, shuffled by a resumable sampler), "
        f"{args.epochs} epochs; checkpoints every {args.save_every} batches and at each "
        f"epoch end in {args.root} (keep best + last)"
    )
    ckpt = mgr.restore(state, missing_ok=True)
    resumed_at = None
    if ckpt is not None:
        resumed_at = (state["epoch"] + 1, state["batch"])
        where = (
            f"{state['epoch']} of {args.epochs} epochs done"
            if state["batch"] == 0
            else f"epoch {state['epoch'] + 1}, after batch {state['batch']} of {per_epoch}"
        )
        print(
            f"Resuming from {ckpt.path}: {where} (model, optimizer, data position, RNG "
            "state and history restored)"
        )
    guard = mgr.save_on_signal(state)  # SIGTERM / Ctrl-C: save at the next batch end, exit
    best_ckpt = mgr.best()
    best = None if best_ckpt is None else metric_value(best_ckpt.metrics, "val_acc")
    for epoch in range(state["epoch"], args.epochs):
        crash = args.crash_at_epoch == epoch + 1
        every_n.on_epoch_begin(epoch)

        def on_batch(batch: int, crash: bool = crash, epoch: int = epoch) -> None:
            if crash and batch == per_epoch // 2:
                last = mgr.latest()
                print(
                    f"Epoch {epoch + 1}: simulating a crash: SIGKILL at batch {batch} of "
                    f"{per_epoch}, mid-epoch (last checkpoint: "
                    f"{last.name if last else 'none'})",
                    flush=True,
                )
                os.kill(os.getpid(), signal.SIGKILL)
            every_n.on_batch_end(batch - 1)

        loss = train_epoch(model, opt, loader, state, on_batch)
        val_acc = evaluate(model, x_val, y_val)
        name = mgr.template.format(step=every_n.step, epoch=epoch + 1, metrics={})
        path = os.path.join(args.root, name)
        best_str = "None" if best is None else f"{best:.5f}"
        if is_better(val_acc, best, "max"):
            print(
                f"Epoch {epoch + 1}: val_acc improved from {best_str} to {val_acc:.5f}, "
                f"saving model to {path}"
            )
            best = val_acc
        else:
            print(
                f"Epoch {epoch + 1}: val_acc did not improve from {best_str}, "
                f"saving last state to {path}"
            )
        mgr.save(
            state, step=every_n.step, epoch=epoch + 1, metrics={"val_acc": val_acc, "loss": loss}
        )
        sys.stdout.flush()
    guard.remove()
    kept = ", ".join(c.name for c in mgr.checkpoints())
    final = fingerprint(model)
    mgr.close()
    print(f"Training finished. Checkpoints kept: {kept}.")
    print("Checking the result against an uninterrupted run without checkpoints ...")
    expected = reference_run(n_features, (x_tr, y_tr, x_val, y_val), args.epochs, args.seed)
    if final == expected:
        how = "ran uninterrupted"
        if resumed_at is not None:
            how = f"resumed at epoch {resumed_at[0]}"
            if resumed_at[1]:
                how += f", batch {resumed_at[1] + 1}"
        print(
            f"OK: this run {how}; its final weights are bit-identical to the "
            f"uninterrupted run's (sha256 {final[:16]}...)."
        )
        return 0
    print(
        f"MISMATCH: final weights differ from the uninterrupted run ({final[:16]} vs "
        f"{expected[:16]}).",
        file=sys.stderr,
    )
    return 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", default="runs/demo", help="checkpoint root (default runs/demo)")
    parser.add_argument("--epochs", type=int, default=40, help="epochs to train (default 40)")
    parser.add_argument(
        "--crash-at-epoch",
        type=int,
        default=None,
        metavar="N",
        help="kill this process with SIGKILL half-way through epoch N",
    )
    parser.add_argument(
        "--save-every",
        type=int,
        default=10,
        metavar="N",
        help="checkpoint every N batches, mid-epoch (default 10)",
    )
    parser.add_argument(
        "--csv",
        default=None,
        metavar="PATH",
        help="train on a CSV whose last column is the 0/1 label (e.g. the "
        "seed's pima-indians-diabetes.csv) instead of the breast-cancer data",
    )
    parser.add_argument("--seed", type=int, default=7, help="random seed (default 7)")


__all__ = [
    "BATCH",
    "add_arguments",
    "build",
    "evaluate",
    "fingerprint",
    "load_data",
    "make_loader",
    "new_state",
    "reference_run",
    "run",
    "train_epoch",
]
