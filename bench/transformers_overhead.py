"""Time per checkpoint: the Hugging Face Trainer's own save vs safepoint's Trainer.

One GPT-2 built from a config (``--embd``, ``--layers``; no hub), trained for one step
so that AdamW has its state, then checkpointed ``--reps`` times by each Trainer in
alternation, into separate output directories on the same disk. Both write the model,
optimizer, scheduler, RNG and trainer state; transformers writes loose files
(safetensors + pickles, no fsync); safepoint commits one checksummed, fsynced
directory atomically. Medians, and the ratio safepoint / transformers (below 1 is
faster).

    python bench/transformers_overhead.py                # ~100 M parameters, 5 reps
    python bench/transformers_overhead.py --embd 256 --layers 2 --reps 3
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time

import torch

import transformers
from safepoint.transformers import Trainer as SafepointTrainer
from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments


def build(embd: int, layers: int) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(
        GPT2Config(n_layer=layers, n_head=8, n_embd=embd, vocab_size=8192, n_positions=128)
    )


def trainer(cls: type, out: str, embd: int, layers: int) -> transformers.Trainer:
    ids = torch.randint(0, 8192, (8, 64))
    data = [{"input_ids": row, "labels": row.clone()} for row in ids]
    args = TrainingArguments(
        output_dir=out, per_device_train_batch_size=8, max_steps=1, save_strategy="no",
        report_to=[], use_cpu=True, disable_tqdm=True, logging_steps=100,
    )  # fmt: skip
    t = cls(model=build(embd, layers), args=args, train_dataset=data)
    t.train()  # one step: AdamW state exists, as in a real run
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--embd", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    transformers.logging.set_verbosity_error()
    logging.getLogger("safepoint").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        runs = {
            "transformers.Trainer": trainer(
                transformers.Trainer, f"{tmp}/hf", args.embd, args.layers
            ),
            "safepoint.transformers.Trainer": trainer(
                SafepointTrainer, f"{tmp}/sp", args.embd, args.layers
            ),
        }
        params = sum(p.numel() for p in runs["transformers.Trainer"].model.parameters())
        times: dict[str, list[float]] = {k: [] for k in runs}
        for rep in range(args.reps):
            order = list(runs) if rep % 2 == 0 else list(reversed(runs))
            for name in order:
                t = runs[name]
                t.state.global_step = rep + 1
                began = time.perf_counter()
                t._save_checkpoint(t.model, trial=None)
                times[name].append(time.perf_counter() - began)
        size = sum(
            os.path.getsize(os.path.join(d, f))
            for d, _, fs in os.walk(f"{tmp}/sp/checkpoint-1")
            for f in fs
        )
    hf = statistics.median(times["transformers.Trainer"])
    sp = statistics.median(times["safepoint.transformers.Trainer"])
    print(f"model: {params / 1e6:.0f} M parameters; checkpoint {size / 2**20:.0f} MiB; "
          f"{args.reps} reps, medians")  # fmt: skip
    print("| trainer | per checkpoint | vs transformers |")
    print("| --- | --- | --- |")
    print(f"| transformers.Trainer (no fsync, pickles) | {hf * 1000:.0f} ms | 1.00x |")
    label = "safepoint.transformers.Trainer (fsynced, atomic)"
    print(f"| {label} | {sp * 1000:.0f} ms | {sp / hf:.2f}x |")
    print("raw samples (s):", {k: [round(x, 3) for x in v] for k, v in times.items()})


if __name__ == "__main__":
    main()
