"""Time per checkpoint: Lightning's own file I/O vs safepoint's, on the same trainer state.

A LightningModule of ``--mib`` MiB of float32 parameters (a stack of linear layers) is
fitted for one step with Adam (so the optimizer state exists: a checkpoint is about 3x
the parameters), then ``trainer.save_checkpoint`` runs ``--reps`` times through each
``CheckpointIO`` in alternation, into separate folders on the same disk: Lightning's
default ``TorchCheckpointIO`` (``torch.save``: a pickle in a zip, no fsync) and
``safepoint.lightning.CheckpointIO`` (a sealed tree zip, checksummed, fsynced, renamed
into place). This is exactly what ``ModelCheckpoint`` costs per file. Medians, and the
ratio safepoint / Lightning (below 1 is faster).

    python bench/lightning_overhead.py               # 256 MiB of parameters, 5 reps
    python bench/lightning_overhead.py --mib 32 --reps 3
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
import warnings

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from torch.utils.data import DataLoader, TensorDataset

from safepoint.lightning import CheckpointIO


class Stack(pl.LightningModule):
    def __init__(self, mib: int) -> None:
        super().__init__()
        width = 1024
        layers = max(1, (mib << 20) // (width * width * 4))
        self.net = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return self.net(x).square().mean()

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-4)


def fitted(plugin, mib: int):
    model = Stack(mib)
    trainer = pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False,
                         plugins=[plugin])  # fmt: skip
    trainer.fit(model, DataLoader(TensorDataset(torch.randn(8, 1024)), batch_size=8))
    return trainer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    runs = {
        "Lightning TorchCheckpointIO": fitted(TorchCheckpointIO(), args.mib),
        "safepoint.lightning.CheckpointIO": fitted(CheckpointIO(), args.mib),
    }
    times: dict[str, list[float]] = {k: [] for k in runs}
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        for rep in range(args.reps):
            order = list(runs) if rep % 2 == 0 else list(reversed(runs))
            for i, name in enumerate(order):
                path = os.path.join(tmp, f"{i}-{rep % 2}", f"step-{rep}.ckpt")
                os.makedirs(os.path.dirname(path), exist_ok=True)
                began = time.perf_counter()
                runs[name].save_checkpoint(path)
                times[name].append(time.perf_counter() - began)
        size = os.path.getsize(path)
    base = statistics.median(times["Lightning TorchCheckpointIO"])
    print(f"checkpoint: {size / 2**20:.0f} MiB; {args.reps} reps; medians")
    print("| CheckpointIO | per checkpoint | vs Lightning |")
    print("| --- | --- | --- |")
    for name, samples in times.items():
        med = statistics.median(samples)
        print(f"| {name} | {med * 1000:.0f} ms | {med / base:.2f}x |")
    print("raw samples (s):", {k: [round(x, 3) for x in v] for k, v in times.items()})


if __name__ == "__main__":
    main()
