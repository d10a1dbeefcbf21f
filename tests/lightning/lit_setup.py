"""The tiny LightningModule, data and trainer shared by the Lightning tests."""

from __future__ import annotations

import os
import signal
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from safepoint.lightning import ModelCheckpoint
from safepoint.torch import ResumableSampler


class Model(pl.LightningModule):
    def __init__(self, lr: float = 0.05, width: int = 8) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(4, width), torch.nn.Dropout(0.2), torch.nn.Linear(width, 1)
        )

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def data(shuffle: bool = True) -> DataLoader:
    """64 samples in batches of 8: 8 steps per epoch, shuffled by a ResumableSampler."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=gen)
    ds = TensorDataset(x, x.sum(1, keepdim=True))
    sampler = ResumableSampler(ds, seed=0) if shuffle else None
    return DataLoader(ds, batch_size=8, sampler=sampler)


def trainer(dirpath: Any, epochs: int = 3, callbacks: list[Any] | None = None, **kw: Any) -> Any:
    checkpoint = ModelCheckpoint(dirpath=str(dirpath), **kw)
    return pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        enable_progress_bar=False,
        logger=False,
        enable_model_summary=False,
        callbacks=[checkpoint, *(callbacks or [])],
    )


class KillAt(pl.Callback):
    """SIGKILL this process after optimizer step ``at`` (a real crash mid-epoch)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
        if trainer.global_step == self.at:
            os.kill(os.getpid(), signal.SIGKILL)


class StopAt(pl.Callback):
    """End fit after optimizer step ``at``, as an interruption would."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
        if trainer.global_step == self.at:
            trainer.should_stop = True


def weights(model: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
