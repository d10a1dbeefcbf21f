"""Train with safepoint's Trainer; SIGKILL itself after step --kill-at, or finish and
write the final weights (a safetensors file) to --out."""

from __future__ import annotations

import argparse
import os
import signal

from hf_setup import arguments, dataset, model
from safetensors.torch import save_file

from safepoint.transformers import Trainer
from transformers import TrainerCallback


class Kill(TrainerCallback):
    def __init__(self, at: int) -> None:
        self.at = at

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--out")
    ap.add_argument("--kill-at", type=int)
    ap.add_argument("--resume", action="store_true")
    a = ap.parse_args()
    callbacks = [Kill(a.kill_at)] if a.kill_at else []
    trainer = Trainer(
        model=model(), args=arguments(a.dir, save_steps=3), train_dataset=dataset(),
        callbacks=callbacks,
    )  # fmt: skip
    trainer.train(resume_from_checkpoint=True if a.resume else None)
    if a.out:
        state = {k: v.contiguous() for k, v in trainer.model.state_dict().items()}
        state.pop("lm_head.weight", None)  # tied to the embedding
        save_file(state, a.out)


if __name__ == "__main__":
    main()
