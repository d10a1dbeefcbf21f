"""``safepoint demo``: train, crash with SIGKILL, resume, and prove the resume exact.

The seed's network (Dense 12 -> 8 -> 1, ReLU, sigmoid, Adam, binary cross-entropy,
batch size 10, a third of the data for validation) trained in PyTorch on
scikit-learn's breast-cancer data, or on any CSV with the label in the last column
(``--csv`` takes the seed's Pima file). A little dropout makes the random generators
matter. Every epoch is checkpointed, keeping the best (by ``val_acc``) and the last.

``--crash-at-epoch N`` kills the process with SIGKILL half-way through epoch N. Run it
again and it resumes from the last committed checkpoint; at the end it retrains from
scratch without any checkpointing and compares the final weights byte for byte.
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

from .manager import CheckpointManager
from .monitor import is_better, metric_value
from .retention import Keep
from .rng import RNGState

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


def train_epoch(model: Any, opt: Any, x: Any, y: Any, on_batch: Callable[[int], None]) -> float:
    import torch

    model.train()
    loss_fn = torch.nn.BCELoss()
    perm = torch.randperm(len(x))
    total = 0.0
    for batch, start in enumerate(range(0, len(x), BATCH)):
        idx = perm[start : start + BATCH]
        opt.zero_grad()
        loss = loss_fn(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        total += loss.item() * len(idx)
        on_batch(batch)
    return total / len(x)


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
    for _ in range(epochs):
        train_epoch(model, opt, data[0], data[1], lambda b: None)
        evaluate(model, data[2], data[3])
    return fingerprint(model)


def run(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(1)  # one thread: the same float sums in every run
    torch.use_deterministic_algorithms(True)
    desc, x_tr, y_tr, x_val, y_val = load_data(args.csv, args.seed)
    n_features = x_tr.shape[1]
    model, opt = build(n_features, args.seed)
    mgr = CheckpointManager(
        args.root, name="epoch-{epoch:03d}", monitor="val_acc", keep=Keep(last=1, best=1)
    )
    state: dict[str, Any] = {"model": model, "optimizer": opt, "rng": RNGState(), "history": []}
    print(
        f"safepoint demo: {desc}; network {n_features}-12-8-1 with dropout, Adam, "
        f"batch {BATCH}, {args.epochs} epochs; checkpoints in {args.root} (keep best + last)"
    )
    ckpt = mgr.restore(state, missing_ok=True)
    start = 0
    if ckpt is not None:
        start = int(ckpt.epoch or 0)
        print(
            f"Resuming from {ckpt.path}: {start} of {args.epochs} epochs done, "
            f"val_acc {ckpt.metrics.get('val_acc', float('nan')):.5f} "
            "(model, optimizer, RNG state and history restored)"
        )
    best_ckpt = mgr.best()
    best = None if best_ckpt is None else metric_value(best_ckpt.metrics, "val_acc")
    for epoch in range(start, args.epochs):
        crash = args.crash_at_epoch == epoch + 1

        def on_batch(batch: int, crash: bool = crash, epoch: int = epoch) -> None:
            if crash and batch == (len(x_tr) // BATCH) // 2:
                print(
                    f"Epoch {epoch + 1}: simulating a crash: SIGKILL at batch {batch + 1}, "
                    "mid-epoch",
                    flush=True,
                )
                os.kill(os.getpid(), signal.SIGKILL)

        loss = train_epoch(model, opt, x_tr, y_tr, on_batch)
        val_acc = evaluate(model, x_val, y_val)
        state["history"].append(loss)
        name = f"epoch-{epoch + 1:03d}"
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
        mgr.save(state, step=epoch + 1, epoch=epoch + 1, metrics={"val_acc": val_acc, "loss": loss})
        sys.stdout.flush()
    kept = ", ".join(c.name for c in mgr.checkpoints())
    final = fingerprint(model)
    mgr.close()
    print(f"Training finished. Checkpoints kept: {kept}.")
    print("Checking the result against an uninterrupted run without checkpoints ...")
    expected = reference_run(n_features, (x_tr, y_tr, x_val, y_val), args.epochs, args.seed)
    if final == expected:
        how = f"resumed at epoch {start + 1}" if ckpt is not None else "ran uninterrupted"
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
        "--csv",
        default=None,
        metavar="PATH",
        help="train on a CSV whose last column is the 0/1 label (e.g. the "
        "seed's pima-indians-diabetes.csv) instead of the breast-cancer data",
    )
    parser.add_argument("--seed", type=int, default=7, help="random seed (default 7)")
