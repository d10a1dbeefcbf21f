"""Same-name re-saves without an atomic swap or hard links (issue 10 item 5): a kill
between the two renames leaves the old checkpoint in a trash entry; the next writer
puts it back. Nothing committed is ever deleted."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import safepoint

#: Run in a child: commit v1 under a fixed name, then re-save it as on a file system
#: without RENAME_EXCHANGE (and, for files, without hard links), killed by SIGKILL right
#: after the old checkpoint was moved into its trash entry.
_CHILD = textwrap.dedent(
    """
    import errno, os, signal, sys
    import numpy as np
    import safepoint, safepoint.storage.local as st

    root, kind = sys.argv[1], sys.argv[2]
    mgr = safepoint.CheckpointManager(root)

    def save(value):
        if kind == "dir":
            return mgr.save({"w": np.full(4, value, np.float32)}, step=int(value))
        import h5py
        from safepoint.catalog import singlefile

        def write(path):
            with h5py.File(path, "w") as f:
                f["w"] = np.full(4, value, np.float32)

        return mgr.save_file("w.h5", write, step=int(value), epoch=1, metrics={},
                               layout="keras-legacy-h5-weights")

    save(1.0)
    import safepoint.storage.commit as tx; tx._exchange = lambda *a: False

    def no_link(*a, **k):
        raise OSError(errno.EPERM, "hard links not supported (injected)")

    os.link = no_link
    real = os.rename

    def rename(src, dst, *a, **k):
        real(src, dst, *a, **k)
        parts = (os.path.basename(dst), os.path.basename(os.path.dirname(dst)))
        if any(p.startswith(".trash-") for p in parts):
            os.kill(os.getpid(), signal.SIGKILL)

    os.rename = rename
    save(2.0)
    print("not killed")
    """
)


def _values(root: Path, name: str) -> list[float]:
    ckpt = safepoint.CheckpointManager(root).restore(checkpoint=name)
    assert ckpt is not None
    weights = ckpt.state["w"]  # type: ignore[index]
    return [float(x) for x in np.asarray(weights).reshape(-1)]


@pytest.mark.e2e
@pytest.mark.parametrize("resume", [False, True], ids=["save-first", "restore-first"])
@pytest.mark.parametrize("kind", ["dir", "file"])
def test_a_kill_between_the_two_renames_loses_nothing(
    tmp_path: Path, kind: str, resume: bool
) -> None:
    if kind == "file":
        pytest.importorskip("h5py")
    root = tmp_path / "run"
    name = "step-00000001" if kind == "dir" else "w.h5"
    if kind == "dir":  # a fixed name, so the second save replaces the first
        script = _CHILD.replace(
            "safepoint.CheckpointManager(root)",
            "safepoint.CheckpointManager(root, name='step-00000001')",
        )
    else:
        script = _CHILD
    proc = subprocess.run(
        [sys.executable, "-c", script, str(root), kind], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == -9, proc.stderr
    assert name not in os.listdir(root)  # the name is missing: the old one is in the trash
    assert safepoint.CheckpointManager(root).checkpoints() == []
    if resume:  # a restarted run restores before its first save: it must find v1
        resumed = safepoint.CheckpointManager(root).restore(missing_ok=True)
        assert resumed is not None and resumed.name == name and resumed.step == 1
    with safepoint.CheckpointManager(root, name="next-{step}") as mgr:
        mgr.save({"w": np.zeros(2, np.float32)}, step=3)  # recovery runs before cleanup
        assert [c.name for c in mgr.checkpoints()] == [name, "next-3"]
    assert _values(root, name) == [1.0] * 4
    assert sorted(n for n in os.listdir(root) if n.startswith(".")) == []


def test_single_file_re_saves_work_without_hard_links(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    h5py = pytest.importorskip("h5py")

    def no_link(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EPERM, "hard links not supported (injected)")

    monkeypatch.setattr(os, "link", no_link)
    with safepoint.CheckpointManager(tmp_path) as mgr:
        for value in (1.0, 2.0, 3.0):

            def write(path: str, value: float = value) -> None:
                with h5py.File(path, "w") as f:
                    f["w"] = np.full(4, value, np.float32)

            mgr.save_file(
                "w.h5", write, step=int(value), epoch=1, metrics={},
                layout="keras-legacy-h5-weights",
            )  # fmt: skip
    assert _values(tmp_path, "w.h5") == [3.0] * 4
    assert sorted(os.listdir(tmp_path)) == ["safepoint-log.jsonl", "w.h5"]


_PLAIN_CHILD = (
    _CHILD[: _CHILD.index("import safepoint.storage.commit as tx")]
    + "save(2.0)\nprint('not killed')\n"
)


@pytest.mark.e2e
@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
@pytest.mark.parametrize("kind", ["dir", "file"])
def test_real_syscall_faults_no_renameat2_no_link_and_a_kill(tmp_path: Path, kind: str) -> None:
    """The same with real faults: strace refuses renameat2 (EINVAL, as NFS/CIFS/FUSE
    do) and hard links (EPERM), and SIGKILLs the child at its third rename(): the
    second rename of the re-save, after the old checkpoint went to the trash."""
    if kind == "file":
        pytest.importorskip("h5py")
    root = tmp_path / "run"
    name = "step-00000001" if kind == "dir" else "w.h5"
    script = _PLAIN_CHILD.replace(
        "safepoint.CheckpointManager(root)",
        "safepoint.CheckpointManager(root, name='step-00000001')"
        if kind == "dir"
        else "safepoint.CheckpointManager(root)",
    )
    strace = [
        "strace", "-f", "-qq", "-o", str(tmp_path / "strace.log"),
        "-e", "trace=rename,renameat2,linkat",
        "-e", "inject=renameat2:error=EINVAL",
        "-e", "inject=linkat:error=EPERM",
        "-e", "inject=rename:signal=KILL:when=3",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}  # no .pyc renames to count
    proc = subprocess.run(
        [*strace, sys.executable, "-c", script, str(root), kind],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode in (-9, 137), (proc.returncode, proc.stdout, proc.stderr)
    traced = (tmp_path / "strace.log").read_text()
    refused = "renameat2(" if kind == "dir" else "linkat("
    assert any(refused in line and "(INJECTED)" in line for line in traced.splitlines()), traced
    assert name not in os.listdir(root), os.listdir(root)
    resumed = safepoint.CheckpointManager(root).restore(missing_ok=True)
    assert resumed is not None and resumed.name == name and resumed.step == 1
    with safepoint.CheckpointManager(root, name="next-{step}") as mgr:
        mgr.save({"w": np.zeros(2, np.float32)}, step=3)
    assert _values(root, name) == [1.0] * 4
    assert [n for n in os.listdir(root) if n.startswith(".")] == []
