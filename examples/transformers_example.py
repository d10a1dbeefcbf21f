"""Hugging Face Trainer with safepoint: the only change is the import of Trainer.

    python examples/transformers_example.py [OUTPUT_DIR]    # default runs/transformers

Trains a tiny GPT-2 (built from a config: no download) on random tokens for 2 epochs,
checkpointing every 5 steps. Stop it at any moment (Ctrl-C, kill -9) and run it again:
it resumes from the newest checkpoint that verifies and ends with the same weights.
"""

import sys

import torch

from safepoint.transformers import Trainer  # instead of: from transformers import Trainer
from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

out = sys.argv[1] if len(sys.argv) > 1 else "runs/transformers"
gen = torch.Generator().manual_seed(0)
data = []
for _ in range(256):
    ids = torch.randint(0, 64, (16,), generator=gen)
    data.append({"input_ids": ids, "labels": ids.clone()})
torch.manual_seed(0)
config = GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=64, n_positions=32,
                    bos_token_id=0, eos_token_id=0)  # fmt: skip
args = TrainingArguments(output_dir=out, per_device_train_batch_size=8, num_train_epochs=2,
                         save_strategy="steps", save_steps=5, save_total_limit=2,
                         report_to=[], use_cpu=True, seed=1, disable_tqdm=True)  # fmt: skip
trainer = Trainer(model=GPT2LMHeadModel(config), args=args, train_dataset=data)
# True: the newest checkpoint that verifies (a damaged one is skipped, with a warning).
trainer.train(resume_from_checkpoint=bool(trainer.checkpoint_manager.checkpoints()) or None)
print("checkpoints:", [c.name for c in trainer.checkpoint_manager.checkpoints()])
print("weights:", sum(p.double().sum().item() for p in trainer.model.parameters()).hex())
