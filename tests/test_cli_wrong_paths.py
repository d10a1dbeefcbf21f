"""Every subcommand, given every kind of wrong path: the right exit code and a message
that says what the path is (issue 10 item 11).

A backup check with a typo must fail (exit 3, not "0 of 0 verified"); a run root given
where one checkpoint belongs must never be called deletable; a plain file, the run log
or someone else's HDF5 file is named for what it is, not for pickles or symlinks; a
FIFO is never opened (that would hang).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

import safepoint
from safepoint.cli import main

KINDS = (
    "missing",
    "unreadable",
    "empty",
    "root",
    "checkpoint",
    "file",
    "runlog",
    "foreign",
    "fifo",
    "pickle",
)


@pytest.fixture
def paths(tmp_path):
    run = tmp_path / "run"
    mgr = safepoint.CheckpointManager(run, monitor="loss")
    for step in (1, 2):
        mgr.save({"w": np.full(3, step, np.float32)}, step=step, metrics={"loss": 1.0 / step})
    mgr.close()
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("a user's notes\n")
    os.mkfifo(tmp_path / "pipe")
    os.symlink("loop", tmp_path / "loop")  # stat fails with ELOOP
    (tmp_path / "model.pt").write_bytes(b"\x80\x04K\x01.")  # a pickle: never opened
    foreign = tmp_path / "weights.hdf5"
    try:
        import h5py
    except ImportError:  # the classification needs no h5py: it reads no manifest from it
        foreign.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(64))
    else:
        with h5py.File(foreign, "w") as f:
            f["dense/kernel"] = np.ones((2, 2), np.float32)
    return {
        "missing": tmp_path / "nope",
        "unreadable": tmp_path / "loop",
        "empty": tmp_path / "empty",
        "root": run,
        "checkpoint": run / "step-00000002",
        "file": tmp_path / "notes.txt",
        "runlog": run / "safepoint-log.jsonl",
        "foreign": foreign,
        "fifo": tmp_path / "pipe",
        "pickle": tmp_path / "model.pt",
    }


OK, CONFIG, NOT_FOUND, INCOMPATIBLE, STORAGE = 0, 2, 3, 6, 8
UNREADABLE = (STORAGE, "cannot be examined: Too many levels of symbolic links")
# For root commands, every non-root kind is a bad argument, said as what it is.
_ROOT_WRONG = {
    "unreadable": UNREADABLE,
    "checkpoint": (CONFIG, "is a checkpoint directory, not a run root"),
    "file": (CONFIG, "is a plain file, not a run root"),
    "runlog": (CONFIG, "is the run log of the run root"),
    "foreign": (CONFIG, "HDF5 file that safepoint did not write"),
    "fifo": (CONFIG, "is a FIFO (named pipe), not a run root"),
    "pickle": (CONFIG, "is a pickle file"),
}
_CKPT = {
    "missing": (NOT_FOUND, "does not exist"),
    "unreadable": UNREADABLE,
    "empty": (NOT_FOUND, "is an empty directory"),
    "root": (CONFIG, "is a run root holding 2 committed checkpoint(s), not one checkpoint"),
    "checkpoint": (OK, ""),
    "file": (INCOMPATIBLE, "is a plain file, not a safepoint checkpoint"),
    "runlog": (CONFIG, "is the run log of the run root"),
    "foreign": (INCOMPATIBLE, "HDF5 file that safepoint did not write"),
    "fifo": (CONFIG, "is a FIFO (named pipe), not a checkpoint"),
    "pickle": (INCOMPATIBLE, "never opens pickle files"),
}
EXPECTED = {
    "ls": {
        "missing": (NOT_FOUND, "does not exist"),
        "empty": (OK, "No committed checkpoints"),
        "root": (OK, "step-00000002"),
        **_ROOT_WRONG,
    },
    "verify": {
        "missing": (NOT_FOUND, "does not exist"),
        "empty": (NOT_FOUND, "No checkpoints in"),
        "root": (OK, "2 of 2 checkpoints verified"),
        "checkpoint": (OK, "1 of 1 checkpoints verified"),
        **{k: _ROOT_WRONG[k] for k in ("file", "runlog", "fifo", "unreadable")},
        "foreign": _CKPT["foreign"],
        "pickle": _CKPT["pickle"],
    },
    "log": {
        "missing": (NOT_FOUND, "does not exist"),
        "empty": (NOT_FOUND, "has no run log"),
        "root": (OK, "save"),
        **_ROOT_WRONG,
    },
    "plot": {
        "missing": (NOT_FOUND, "does not exist"),
        "empty": (NOT_FOUND, "has no run log"),
        "root": (OK, "wrote"),
        **_ROOT_WRONG,
    },
    "gc": {
        "missing": (NOT_FOUND, "does not exist"),
        "empty": (OK, "0 leftover"),
        "root": (OK, "0 leftover"),
        **_ROOT_WRONG,
    },
    "show": {**_CKPT, "checkpoint": (OK, "1 tensors")},
    "diff": {**_CKPT, "checkpoint": (OK, "identical")},
    "convert": {**_CKPT, "checkpoint": (OK, "converted")},
}


def _argv(command: str, path: str, paths: dict, tmp_path) -> list[str]:
    if command == "diff":
        return ["diff", path, str(paths["checkpoint"])]
    if command == "convert":
        return ["convert", path, "--to", "safetensors", "--out", str(tmp_path / "out")]
    if command == "plot":
        return ["plot", path, "--out", str(tmp_path / "p.svg")]
    return [command, path]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("command", sorted(EXPECTED))
def test_each_command_names_each_wrong_path_and_exits_right(
    command, kind, paths, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    code, fragment = EXPECTED[command][kind]
    before = sorted(os.listdir(tmp_path))
    got = main(_argv(command, str(paths[kind]), paths, tmp_path))
    out, err = capsys.readouterr()
    assert got == code, (out, err)
    if command == "verify" and kind in ("foreign", "pickle"):
        out, err = err, out  # a verification failure: its FAILED line is the output
        assert f"FAILED  {paths[kind].name}: " in err
    elif code != OK:
        assert out == "" and err.count("\n") == 1  # one line on stderr, no traceback
    assert fragment in (out if code == OK else err), (out, err)
    if code != OK:
        assert "Traceback" not in err
        assert "Delete" not in err and "delete" not in err  # never advise deleting
        if kind not in ("pickle",):
            assert "pickle" not in err
        assert "symlink" not in err
        assert str(paths[kind]) in err
    if kind == "missing":
        assert not os.path.lexists(paths[kind])  # gc and friends create nothing
    if command not in ("convert", "plot") or code != OK:
        assert sorted(os.listdir(tmp_path)) == before


def test_a_run_root_given_as_a_checkpoint_suggests_ls_and_a_checkpoint(paths, capsys):
    assert main(["show", str(paths["root"])]) == CONFIG
    err = capsys.readouterr().err
    assert f"safepoint ls {paths['root']}" in err
    assert f"safepoint show {paths['root'] / 'step-00000002'}" in err


def test_a_missing_checkpoint_in_a_root_is_named(paths, capsys):
    assert main(["diff", str(paths["root"] / "step-00000009"), str(paths["checkpoint"])]) == 3
    assert "No checkpoint named 'step-00000009'" in capsys.readouterr().err


def test_verify_json_of_a_missing_path_fails_too(paths, capsys):
    assert main(["verify", "--json", str(paths["missing"])]) == NOT_FOUND
    assert capsys.readouterr().out == ""


def test_a_symlink_the_user_typed_is_followed(paths, tmp_path, capsys):
    link, root_link = tmp_path / "latest", tmp_path / "run-link"
    link.symlink_to(paths["checkpoint"])
    root_link.symlink_to(paths["root"])
    assert main(["show", str(link)]) == OK
    assert main(["verify", str(link)]) == OK
    assert main(["diff", str(link), str(paths["checkpoint"])]) == OK
    assert main(["verify", str(root_link)]) == OK
    assert "symbolic link" not in capsys.readouterr().out


@pytest.mark.parametrize("bad", ["fifo", "symlink"])
def test_a_run_log_that_is_not_a_regular_file_is_never_opened(paths, tmp_path, capsys, bad):
    log = paths["root"] / "safepoint-log.jsonl"
    log.unlink()
    if bad == "fifo":
        os.mkfifo(log)  # opening it for reading would block forever
    else:
        log.symlink_to("/etc/passwd")
    for command in (["log"], ["plot", "--out", str(tmp_path / "p.svg")]):
        assert main([command[0], str(paths["root"]), *command[1:]]) == CONFIG
        err = capsys.readouterr().err
        assert "The run log" in err and ("FIFO" in err if bad == "fifo" else "symlink" in err)
    assert main(["ls", str(paths["root"])]) == OK  # the checkpoints still list


def test_a_checkpoint_whose_manifest_is_gone_is_incomplete_never_deletable(paths, capsys):
    ckpt = paths["root"] / "step-00000001"
    (ckpt / "manifest.json").unlink()
    assert main(["show", str(ckpt)]) == 4
    err = capsys.readouterr().err
    assert "no manifest.json" in err and "elete" not in err
    assert main(["verify", str(ckpt)]) == 4
    assert "FAILED  step-00000001" in capsys.readouterr().out
    assert main(["verify", str(paths["root"])]) == 4
    capsys.readouterr()
    assert main(["ls", str(paths["root"])]) == OK
    assert [ln.split()[0] for ln in capsys.readouterr().out.splitlines()[1:]] == ["step-00000002"]


def test_a_directory_renamed_away_while_classified_is_missing_not_a_crash(
    tmp_path, monkeypatch, capsys
) -> None:
    """A re-save without RENAME_EXCHANGE renames the old directory away between two
    looks at it (stat, then listdir): the CLI says "not found", it does not crash on
    the FileNotFoundError (this once failed CI's reader-race test)."""
    from safepoint.cli import pathkind

    with safepoint.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save({"w": np.ones(3)}, step=1)
    real = pathkind._classify
    calls = []

    def renamed_away(path: str, *, listing: bool) -> pathkind.PathKind:
        calls.append(path)
        if len(calls) == 1:
            raise FileNotFoundError(2, "No such file or directory", path)
        return real(path, listing=listing)

    monkeypatch.setattr(pathkind, "_classify", renamed_away)
    found = pathkind.classify(str(tmp_path / "run" / "step-00000001"))
    assert found.kind == "missing"  # no writer in flight: not looked up again
    assert main(["verify", str(tmp_path / "run" / "step-00000001")]) == 0  # next look: fine
