"""safepoint.lightning: Lightning's ModelCheckpoint and CheckpointIO with safepoint files."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import zipfile

import pytest
import pytorch_lightning as pl
import torch
from lit_setup import Model, StopAt, data, trainer, weights

import safepoint
from safepoint.cli import main
from safepoint.errors import ConfigError, CorruptCheckpointError, IncompatibleCheckpointError
from safepoint.lightning import CheckpointIO, load_from_checkpoint

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.abspath(os.path.join(HERE, "..", "..", "src"))


class Opaque:
    """An arbitrary object: what pickle would store and safepoint refuses to."""


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def fit(dirpath, epochs=3, stop=None, ckpt_path=None, **kw):
    pl.seed_everything(0, verbose=False)
    model = Model()
    t = trainer(dirpath, epochs, callbacks=[StopAt(stop)] if stop else [], **kw)
    t.fit(model, data(), data(shuffle=False), ckpt_path=ckpt_path)
    return t, model


def test_top_k_and_last_leave_only_ckpt_files_with_lightnings_attributes(tmp_path):
    t, _ = fit(tmp_path, monitor="val_loss", save_top_k=2, save_last=True)
    cb = t.checkpoint_callback
    names = sorted(os.listdir(tmp_path))
    assert len(names) == 3 and "last.ckpt" in names and all(n.endswith(".ckpt") for n in names)
    assert os.path.isfile(cb.best_model_path) and os.path.isfile(cb.kth_best_model_path)
    assert sorted(cb.best_k_models) == sorted(str(tmp_path / n) for n in names if n != "last.ckpt")
    assert cb.last_model_path == str(tmp_path / "last.ckpt")
    assert cb.best_model_score == min(cb.best_k_models.values())
    assert set(cb.state_dict()) >= {"best_model_path", "best_model_score", "best_k_models"}
    with zipfile.ZipFile(tmp_path / "last.ckpt") as z:  # a zip of JSON and raw bytes
        assert sorted(z.namelist()) == ["safepoint-manifest.json", "state.json", "tensors.bin"]
    ckpt = safepoint.load(tmp_path / "last.ckpt", as_numpy=False)  # Lightning's dict
    assert {"epoch", "global_step", "state_dict", "optimizer_states", "callbacks", "loops"} <= set(
        ckpt
    )
    assert ckpt["global_step"] == 24 and ckpt["hyper_parameters"] == {"lr": 0.05, "width": 8}
    assert all(v.ok for v in safepoint.CheckpointManager(tmp_path).verify())


# Lightning cannot see that the loader's ResumableSampler resumes; safepoint's callback does.
@pytest.mark.filterwarnings("ignore:.*ended before the epoch ended.*")
def test_fit_resumes_from_last_mid_epoch_bit_exactly(tmp_path):
    _, full = fit(tmp_path / "full", every_n_train_steps=3, save_last=True)
    fit(tmp_path / "run", stop=11, every_n_train_steps=3, save_last=True)  # step 11 of 24
    assert safepoint.load(tmp_path / "run" / "last.ckpt")["global_step"] == 9
    t, resumed = fit(tmp_path / "run", ckpt_path="last", every_n_train_steps=3, save_last=True)
    assert t.global_step == 24
    assert _same(weights(resumed), weights(full))


def test_filename_templates_and_every_n_train_steps(tmp_path):
    fit(tmp_path / "a", epochs=1, filename="{epoch}-{val_loss:.2f}", monitor="val_loss",
        save_top_k=-1)  # fmt: skip
    (name,) = os.listdir(tmp_path / "a")
    assert name.startswith("epoch=0-val_loss=") and name.endswith(".ckpt")
    fit(tmp_path / "b", epochs=1, filename="{epoch}-{step}", auto_insert_metric_name=False,
        every_n_train_steps=3, save_top_k=-1)  # fmt: skip
    assert sorted(os.listdir(tmp_path / "b")) == ["0-3.ckpt", "0-6.ckpt"]
    assert main(["ls", str(tmp_path / "b")]) == 0


def test_a_value_that_cannot_be_encoded_is_refused_naming_its_key(tmp_path):
    pl.seed_everything(0, verbose=False)
    model = Model()
    model.hparams["schedule"] = Opaque()  # picklable, so Lightning keeps it; not JSON
    t = trainer(tmp_path, epochs=1)
    with pytest.raises(ConfigError, match="hyper_parameters/schedule"):
        t.fit(model, data())
    assert os.listdir(tmp_path) == []  # nothing partial


def test_the_plugin_commits_trainer_save_checkpoint_and_detects_damage(tmp_path):
    pl.seed_everything(0, verbose=False)
    model = Model()
    t = pl.Trainer(max_epochs=1, accelerator="cpu", enable_progress_bar=False, logger=False,
                   enable_checkpointing=False, plugins=[CheckpointIO()])  # fmt: skip
    t.fit(model, data())
    path = tmp_path / "manual.ckpt"
    t.save_checkpoint(path)
    back = load_from_checkpoint(Model, path)
    assert _same(weights(back), weights(model)) and back.hparams.lr == 0.05
    raw = bytearray(path.read_bytes())
    raw[raw.index(b"tensors.bin") + 200] ^= 1  # a byte inside the tensors
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptCheckpointError):
        CheckpointIO().load_checkpoint(path)


def test_lightnings_own_pickled_ckpt_is_never_opened(tmp_path):
    path = tmp_path / "theirs.ckpt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(IncompatibleCheckpointError, match="pickle"):
        safepoint.load(path)
    assert main(["verify", str(path)]) == 6


def test_test_with_ckpt_path_best_reads_the_best_file(tmp_path):
    t, model = fit(tmp_path, monitor="val_loss", save_top_k=1)
    best = t.checkpoint_callback.best_model_path
    results = t.validate(model, data(shuffle=False), ckpt_path="best", verbose=False)
    assert results and os.path.basename(best) in os.listdir(tmp_path)


@pytest.mark.e2e
def test_sigkill_mid_epoch_then_resume_ends_bit_identical(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, HERE])}
    script = os.path.join(HERE, "lit_kill_script.py")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, script, *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)

    full = run(str(tmp_path / "full"), "full")
    assert full.returncode == 0, full.stderr
    killed = run(str(tmp_path / "run"), "kill", "11")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert safepoint.load(tmp_path / "run" / "last.ckpt")["global_step"] == 9
    resumed = run(str(tmp_path / "run"), "resume")
    assert resumed.returncode == 0, resumed.stderr
    digest = [line for line in full.stdout.splitlines() if line.startswith("weights")]
    assert digest and digest[0] in resumed.stdout.splitlines()


def test_another_checkpoint_io_is_not_silently_replaced(tmp_path):
    from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

    class Theirs(TorchCheckpointIO):
        pass

    pl.seed_everything(0, verbose=False)
    t = pl.Trainer(max_epochs=1, accelerator="cpu", enable_progress_bar=False, logger=False,
                   plugins=[Theirs()],
                   callbacks=[trainer(tmp_path).checkpoint_callback])  # fmt: skip
    with pytest.raises(ConfigError, match=r"safepoint\.lightning\.CheckpointIO"):
        t.fit(Model(), data())


def test_a_save_before_setup_and_a_static_link_are_safepoint_files(tmp_path):
    # Lightning's own suite calls these directly, before any setup: neither may fall
    # back to torch.save (a pickle) nor to a symlink that retention could leave dangling.
    from safepoint.lightning import ModelCheckpoint

    mc = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    mc.CHECKPOINT_NAME_LAST = "{foo}-last"
    t = pl.Trainer(callbacks=[mc], accelerator="cpu", logger=False, enable_progress_bar=False)
    t.strategy.connect(Model())
    mc._save_last_checkpoint(t, {"foo": torch.tensor(1)})
    assert os.listdir(tmp_path) == ["foo=1-last.ckpt"]
    full = str(tmp_path / "foo=1-last.ckpt")
    assert safepoint.load(full)["callbacks"][mc.state_key]["last_model_path"] == full
    ModelCheckpoint._link_checkpoint(t, full, str(tmp_path / "copy.ckpt"))
    assert not os.path.islink(tmp_path / "copy.ckpt")
    assert safepoint.load(tmp_path / "copy.ckpt")["global_step"] == 0
    assert sorted(os.listdir(tmp_path)) == ["copy.ckpt", "foo=1-last.ckpt"]
