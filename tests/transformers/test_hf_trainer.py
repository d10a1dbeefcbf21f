"""safepoint.transformers.Trainer: exact resume, no pickle, retention that keeps the
newest and the best, a damaged checkpoint skipped, from_pretrained files unchanged."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from hf_setup import StopAt, arguments, dataset, model, weights
from safetensors.torch import load_file

import safepoint
from safepoint.transformers import Trainer
from transformers import GPT2LMHeadModel

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.abspath(os.path.join(HERE, "..", "..", "src"))


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[str, torch.Tensor]:
    out = tmp_path_factory.mktemp("full")
    trainer = Trainer(model=model(), args=arguments(str(out)), train_dataset=dataset())
    trainer.train()
    return weights(trainer)


def _interrupted(out, at: int = 10, **kw) -> Trainer:
    trainer = Trainer(
        model=model(),
        args=arguments(str(out), **kw),
        train_dataset=dataset(),
        callbacks=[StopAt(at)],
    )
    trainer.train()
    return trainer


def test_a_run_stopped_mid_epoch_resumes_bit_exactly(uninterrupted, tmp_path):
    _interrupted(tmp_path, at=10)  # step 10 of 16: the middle of the second epoch
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith("checkpoint-")) == [
        "checkpoint-10",
        "checkpoint-5",
    ]
    resumed = Trainer(model=model(), args=arguments(str(tmp_path)), train_dataset=dataset())
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 16
    assert _same(weights(resumed), uninterrupted)


def test_resume_from_an_explicit_path_and_from_a_damaged_newest(uninterrupted, tmp_path, caplog):
    _interrupted(tmp_path, at=10)
    explicit = Trainer(model=model(), args=arguments(str(tmp_path)), train_dataset=dataset())
    explicit.train(resume_from_checkpoint=str(tmp_path / "checkpoint-5"))
    assert _same(weights(explicit), uninterrupted)
    payload = tmp_path / "checkpoint-16" / "model-00000.safetensors"
    data = bytearray(payload.read_bytes())
    data[-3] ^= 0x10  # one flipped bit in the newest checkpoint's tensors
    payload.write_bytes(bytes(data))
    again = Trainer(model=model(), args=arguments(str(tmp_path)), train_dataset=dataset())
    again.train(resume_from_checkpoint=True)  # skips checkpoint-16, resumes from 15
    assert "skipping checkpoint-16" in caplog.text
    assert _same(weights(again), uninterrupted)


def test_no_pickle_is_written_and_the_checkpoint_reads_without_transformers(tmp_path):
    _interrupted(tmp_path, at=5)
    names = [f for _, _, files in os.walk(tmp_path) for f in files]
    assert not [f for f in names if f.endswith((".pt", ".pth", ".bin", ".pkl"))], names
    tree = safepoint.load(tmp_path / "checkpoint-5")
    assert {"model", "optimizer", "scheduler", "rng", "trainer_state"} <= set(tree)
    state = json.loads(tree["trainer_state"])
    assert state["global_step"] == 5 and state["max_steps"] == 16
    assert tree["model"]["transformer.wte.weight"].shape == (64, 32)
    assert all(v.ok for v in safepoint.CheckpointManager(tmp_path).verify())


def test_retention_keeps_the_newest_and_the_best(tmp_path):
    args = arguments(
        str(tmp_path),
        save_steps=2,
        eval_strategy="steps",
        eval_steps=2,
        save_total_limit=1,
        load_best_model_at_end=True,
        metric_for_best_model="loss",
        greater_is_better=True,  # the highest eval loss: an early step, not the newest
    )
    trainer = Trainer(
        model=model(), args=args, train_dataset=dataset(), eval_dataset=dataset(16, seed=1)
    )
    trainer.train()
    kept = sorted(c.step for c in trainer.checkpoint_manager.checkpoints())
    best = trainer.state.best_global_step
    assert best != 16 and kept == sorted({best, 16})
    assert trainer.state.best_model_checkpoint == str(tmp_path / f"checkpoint-{best}")
    best_weights = safepoint.load(tmp_path / f"checkpoint-{best}", as_numpy=False)["model"]
    assert _same(weights(trainer), best_weights)  # load_best_model_at_end loaded it
    assert trainer.args.save_total_limit is None and args.save_total_limit == 1


def test_save_model_still_writes_what_from_pretrained_reads(tmp_path):
    trainer = _interrupted(tmp_path / "run", at=5)
    trainer.save_model(str(tmp_path / "export"))
    assert (tmp_path / "export" / "model.safetensors").is_file()
    back = GPT2LMHeadModel.from_pretrained(str(tmp_path / "export"))
    assert _same(
        {k: v for k, v in back.state_dict().items()},
        {k: v for k, v in weights(trainer).items()},
    )


def test_resume_true_without_checkpoints_is_the_trainers_error(tmp_path):
    trainer = Trainer(model=model(), args=arguments(str(tmp_path)), train_dataset=dataset())
    with pytest.raises(ValueError, match="No valid checkpoint found"):
        trainer.train(resume_from_checkpoint=True)


def _script(workdir, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, HERE])}
    cmd = [sys.executable, os.path.join(HERE, "hf_kill_script.py"), "--dir", str(workdir), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.e2e
def test_sigkill_mid_epoch_then_resume_ends_bit_identical(tmp_path):
    full = _script(tmp_path / "full", "--out", str(tmp_path / "full.safetensors"))
    assert full.returncode == 0, full.stderr
    killed = _script(tmp_path / "run", "--kill-at", "11")  # step 11 of 16: epoch 2, batch 3
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert [c.step for c in safepoint.CheckpointManager(tmp_path / "run").checkpoints()] == [
        3,
        6,
        9,
    ]
    resumed = _script(tmp_path / "run", "--resume", "--out", str(tmp_path / "resumed.safetensors"))
    assert resumed.returncode == 0, resumed.stderr
    a = load_file(str(tmp_path / "full.safetensors"))
    b = load_file(str(tmp_path / "resumed.safetensors"))
    assert _same(a, b)
