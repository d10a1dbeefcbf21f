"""The tiny model, data and arguments shared by the Trainer tests and their subprocess."""

from __future__ import annotations

from typing import Any

import torch

from transformers import GPT2Config, GPT2LMHeadModel, TrainerCallback, TrainingArguments


def dataset(n: int = 64, seq: int = 16, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 64, (seq,), generator=gen)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


def model() -> GPT2LMHeadModel:
    """Two layers, dropout on (the default 0.1): resuming must restore the RNG too."""
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2,
        n_head=2,
        n_embd=32,
        vocab_size=64,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config)


def arguments(out: str, **kw: Any) -> TrainingArguments:
    """16 optimizer steps over 2 epochs of 8 steps; a checkpoint every 5 steps."""
    base: dict[str, Any] = {
        "output_dir": out,
        "per_device_train_batch_size": 8,
        "num_train_epochs": 2,
        "save_strategy": "steps",
        "save_steps": 5,
        "report_to": [],
        "use_cpu": True,
        "dataloader_num_workers": 0,
        "seed": 1,
        "logging_steps": 100,
        "disable_tqdm": True,
    }
    return TrainingArguments(**{**base, **kw})


class StopAt(TrainerCallback):
    """End training (as an interruption would) after optimizer step ``at``."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            control.should_training_stop = True


def weights(trainer: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
