"""``safepoint.load`` and every inspecting CLI command on ``s3://`` locations."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

import safepoint
from safepoint.cli import main
from safepoint.errors import CheckpointNotFoundError, ConfigError

s3 = pytest.importorskip("safepoint.storage.s3")
sys.path.insert(0, os.path.dirname(__file__))
from racing import race  # noqa: E402


def _run(s3_root: str, options, steps=(1, 2, 3)) -> dict[int, dict]:
    """Save one state per step (losses 0.3, 0.1, 0.2: step 2 is the best)."""
    states = {}
    mgr = safepoint.CheckpointManager(s3_root, storage_options=options, monitor="loss")
    for step, loss in zip(steps, (0.3, 0.1, 0.2), strict=False):
        states[step] = {"w": np.full((64, 3), step, dtype=np.float32), "meta": {"s": f"é${step}"}}
        mgr.save(states[step], step=step, metrics={"loss": loss})
    mgr.close()
    return states


def _payload_key(storage, name: str) -> str:
    found = safepoint.CheckpointManager(storage).catalog.manifest(name)
    fname = sorted(found.files)[0]
    return storage._key(f"{name}/{fname}")


def test_load_reads_a_checkpoint_url_with_options_or_the_environment(s3_env, s3_root):
    states = _run(s3_root, s3_env.options)
    names = [c.name for c in safepoint.CheckpointManager(s3_root).checkpoints()]
    got = safepoint.load(f"{s3_root}/{names[1]}", storage_options=s3_env.options)
    assert got["w"].tobytes() == states[2]["w"].tobytes() and got["meta"] == states[2]["meta"]
    lazy = safepoint.load(f"{s3_root}/{names[0]}/", mmap=True)  # AWS_* variables; a slash
    assert lazy["w"].tobytes() == states[1]["w"].tobytes()


def test_load_names_what_is_wrong_with_a_url(s3_env, s3_root, tmp_path):
    _run(s3_root, None)
    with pytest.raises(CheckpointNotFoundError, match="safepoint ls"):
        safepoint.load(f"{s3_root}/step-00000099")
    with pytest.raises(ConfigError, match="names no checkpoint"):
        safepoint.load(f"s3://{s3_env.bucket}")
    with pytest.raises(ConfigError, match="Unsupported URL scheme"):
        safepoint.load("gs://bucket/run/step-1")
    with pytest.raises(ConfigError, match="object-store"):
        safepoint.load(tmp_path / "x", storage_options={"region": "x"})
    with pytest.raises(ConfigError, match=r"'\.\.' components"):
        safepoint.load(f"{s3_root}/../x")  # refused before any request


def test_ls_show_diff_verify_log_plot_and_gc_on_a_bucket(s3_env, s3_root, tmp_path, capsys):
    _run(s3_root, None)
    names = [c.name for c in safepoint.CheckpointManager(s3_root).checkpoints()]
    assert main(["ls", s3_root, "--monitor", "loss"]) == 0
    out = capsys.readouterr().out
    assert all(n in out for n in names) and out.count("(best)") == 1
    assert main(["ls", s3_root, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [i["step"] for i in listed] == [1, 2, 3] and all(i["bytes"] > 768 for i in listed)
    assert main(["show", f"{s3_root}/{names[0]}"]) == 0
    out = capsys.readouterr().out
    assert f"checkpoint {s3_root}/{names[0]}" in out and "w" in out
    assert main(["diff", f"{s3_root}/{names[0]}", f"{s3_root}/{names[0]}"]) == 0
    assert main(["diff", f"{s3_root}/{names[0]}", f"{s3_root}/{names[1]}"]) == 1
    capsys.readouterr()
    assert main(["verify", s3_root, "--deep"]) == 0
    assert "3 of 3 checkpoints verified." in capsys.readouterr().out
    assert main(["verify", f"{s3_root}/{names[2]}"]) == 0
    assert f"ok      {names[2]}" in capsys.readouterr().out
    assert main(["log", s3_root, "--json"]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [e["step"] for e in events if e["event"] == "save"] == [1, 2, 3]
    svg = tmp_path / "m.svg"
    assert main(["plot", s3_root, "--out", str(svg)]) == 0
    assert "loss" in svg.read_text()
    assert main(["gc", s3_root]) == 0
    assert "0 leftover" in capsys.readouterr().out
    assert len(safepoint.CheckpointManager(s3_root).checkpoints()) == 3  # gc kept them all


def test_verify_names_a_damaged_object_and_restore_falls_back(s3_env, s3_root, capsys):
    states = _run(s3_root, None)
    storage = s3.open_root(s3_root)
    newest = safepoint.CheckpointManager(storage).checkpoints()[-1].name
    key = _payload_key(storage, newest)
    data, _, _ = storage.client.get(key)
    broken = bytearray(data)
    broken[-1] ^= 0x40
    storage.client.put(key, bytes(broken), stage="test")
    assert main(["verify", s3_root]) == 5
    out = capsys.readouterr().out
    assert f"FAILED  {newest}" in out and "2 of 3 checkpoints verified." in out
    assert main(["verify", f"{s3_root}/{newest}"]) == 5
    back = safepoint.CheckpointManager(s3_root).restore()
    assert back is not None and back.step == 2
    assert back.state["w"].tobytes() == states[2]["w"].tobytes()


def test_the_cli_explains_urls_that_name_the_wrong_thing(s3_env, s3_root, capsys):
    _run(s3_root, None)
    name = safepoint.CheckpointManager(s3_root).checkpoints()[0].name
    assert main(["show", s3_root]) == 2  # a root, not one checkpoint
    assert "safepoint ls" in capsys.readouterr().err
    assert main(["ls", f"{s3_root}/{name}"]) == 2  # a checkpoint, not a root
    assert main(["show", f"{s3_root}/nothing-here"]) == 3
    assert "misspelt" in capsys.readouterr().err
    assert main(["ls", f"{s3_root}-empty"]) == 0
    assert "No committed checkpoints" in capsys.readouterr().out
    assert main(["convert", f"{s3_root}/{name}", "--to", "hdf5", "--out", f"{s3_root}/x"]) == 2
    assert "local --out" in capsys.readouterr().err
    assert main(["ls", "gs://bucket/run"]) == 2


def test_convert_brings_a_bucket_checkpoint_to_a_local_disk(s3_env, s3_root, tmp_path, capsys):
    states = _run(s3_root, None)
    name = safepoint.CheckpointManager(s3_root).checkpoints()[1].name
    out = tmp_path / "copy"
    assert main(["convert", f"{s3_root}/{name}", "--to", "hdf5", "--out", str(out)]) == 0
    assert f"converted {s3_root}/{name} -> {out} (hdf5)" in capsys.readouterr().out
    back = safepoint.load(out)
    assert back["w"].tobytes() == states[2]["w"].tobytes() and back["meta"] == states[2]["meta"]
    assert safepoint.CheckpointManager(str(tmp_path)).catalog.manifest("copy").payload == "hdf5"


def test_wrong_credentials_are_a_storage_error_not_a_missing_root(
    s3_env, s3_root, monkeypatch, capsys
):
    _run(s3_root, None)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-0123456789")
    assert main(["ls", s3_root]) == 8
    assert "StorageError" in capsys.readouterr().err


def test_a_reader_racing_resaves_of_a_directory_checkpoint_never_sees_damage(s3_env, s3_root):
    mgr = safepoint.CheckpointManager(s3_root, name="latest")
    mgr.save({"w": np.zeros(50_000, dtype=np.float32)}, step=0)
    try:
        loads = race(
            lambda: safepoint.load(f"{s3_root}/latest")["w"],
            lambda value: bool((value == value[0]).all()),  # one version, whole
            lambda step: mgr.save({"w": np.full(50_000, step, dtype=np.float32)}, step=step),
            saves=30,
        )
    finally:
        mgr.close()
    assert loads > 0
