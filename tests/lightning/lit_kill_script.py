"""Fit the tiny model with safepoint's ModelCheckpoint every 3 steps; optionally SIGKILL
itself at a step, or resume from last.ckpt; print the final weights' digest."""

from __future__ import annotations

import sys

import pytorch_lightning as pl
from lit_setup import KillAt, Model, data, trainer


def main() -> None:
    dirpath, mode = sys.argv[1], sys.argv[2]
    pl.seed_everything(0, verbose=False)
    model = Model()
    extra = [KillAt(int(sys.argv[3]))] if mode == "kill" else []
    t = trainer(dirpath, epochs=3, callbacks=extra, every_n_train_steps=3, save_top_k=-1,
                save_last=True)  # fmt: skip
    t.fit(model, data(), ckpt_path="last" if mode == "resume" else None)
    print("weights", sum(p.double().sum().item() for p in model.parameters()).hex())


if __name__ == "__main__":
    main()
