"""PyTorch Lightning with safepoint: the only change is where ModelCheckpoint comes from.

    python examples/lightning_example.py [DIRPATH]    # default runs/lightning

Fits a tiny regression model for 3 epochs, checkpointing every 3 steps and keeping
last.ckpt. Stop it at any moment (Ctrl-C, kill -9) and run it again: fit resumes from
last.ckpt and ends with the same weights as a run that never stopped.
"""

import os
import sys

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from safepoint.lightning import ModelCheckpoint  # instead of pytorch_lightning.callbacks
from safepoint.torch import ResumableSampler  # a shuffle whose position is checkpointed


class Model(pl.LightningModule):
    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Dropout(0.2),
                                       torch.nn.Linear(16, 1))  # fmt: skip

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


dirpath = sys.argv[1] if len(sys.argv) > 1 else "runs/lightning"
pl.seed_everything(0, verbose=False)
x = torch.randn(512, 4, generator=torch.Generator().manual_seed(0))
data = TensorDataset(x, x.sum(1, keepdim=True))
loader = DataLoader(data, batch_size=16, sampler=ResumableSampler(data, seed=0))
checkpoint = ModelCheckpoint(dirpath=dirpath, every_n_train_steps=3, save_top_k=2,
                             monitor="step", mode="max", save_last=True)  # fmt: skip
trainer = pl.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_progress_bar=False,
                     callbacks=[checkpoint])  # fmt: skip
model = Model()
last = os.path.join(dirpath, "last.ckpt")
trainer.fit(model, loader, ckpt_path=last if os.path.exists(last) else None)
print("files:", sorted(os.listdir(dirpath)))
print("weights:", sum(p.double().sum().item() for p in model.parameters()).hex())
