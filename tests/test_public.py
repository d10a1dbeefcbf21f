"""The public surface: exports, import weight, and the exception tree DESIGN.md fixes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import safepoint

#: Names DESIGN.md shows at the top level of ``safepoint`` for the core engine.
DESIGN_NAMES = {
    "CheckpointManager",
    "Checkpoint",
    "Keep",
    "RNGState",
    "load",
    "SafepointError",
    "ConfigError",
    "CheckpointNotFoundError",
    "IncompleteCheckpointError",
    "CorruptCheckpointError",
    "IncompatibleCheckpointError",
    "StateMismatchError",
    "StorageError",
}


def test_all_is_sorted_and_complete() -> None:
    assert list(safepoint.__all__) == sorted(safepoint.__all__)
    assert len(set(safepoint.__all__)) == len(safepoint.__all__)
    assert set(safepoint.__all__) >= DESIGN_NAMES
    for name in safepoint.__all__:
        assert hasattr(safepoint, name), name
    public = {
        n
        for n, v in vars(safepoint).items()
        if not n.startswith("_") and not isinstance(v, type(sys)) and n != "annotations"
    }
    assert public <= set(safepoint.__all__), public - set(safepoint.__all__)


def test_import_is_framework_free() -> None:
    code = (
        "import json, sys, safepoint\n"
        "mgr = safepoint.CheckpointManager\n"
        "print(json.dumps(sorted(m for m in ('torch', 'keras', 'h5py', 's3fs', 'tensorflow', "
        "'jax') if m in sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert json.loads(out.stdout) == []


def test_saving_and_loading_numpy_stays_framework_free(tmp_path: object) -> None:
    code = (
        "import json, sys, numpy as np, safepoint\n"
        f"m = safepoint.CheckpointManager({str(tmp_path)!r}, monitor='val_loss')\n"
        "m.save({'w': np.ones(3), 'rng': safepoint.RNGState()}, step=1, "
        "metrics={'val_loss': 0.5})\n"
        "m.restore({'w': np.zeros(3), 'rng': safepoint.RNGState()})\n"
        "m.verify(); m.close()\n"
        "print(json.dumps(sorted(x for x in ('torch', 'keras', 'h5py') if x in sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert json.loads(out.stdout) == []


@pytest.mark.parametrize(
    ("name", "builtin"),
    [
        ("ConfigError", ValueError),
        ("CheckpointNotFoundError", FileNotFoundError),
        ("StorageError", OSError),
        ("IncompleteCheckpointError", Exception),
        ("CorruptCheckpointError", Exception),
        ("IncompatibleCheckpointError", Exception),
        ("StateMismatchError", Exception),
    ],
)
def test_error_tree(name: str, builtin: type) -> None:
    cls = getattr(safepoint, name)
    assert issubclass(cls, safepoint.SafepointError)
    assert issubclass(cls, builtin)
    assert isinstance(cls.exit_code, int) and cls.exit_code not in (0, 1)


def test_exit_codes_are_distinct() -> None:
    classes = [getattr(safepoint, n) for n in safepoint.__all__ if n.endswith("Error")]
    codes = [c.exit_code for c in classes if c is not safepoint.SafepointError]
    assert len(codes) == len(set(codes))


def test_storage_error_is_a_real_oserror() -> None:
    err = safepoint.StorageError("disk full", errno=28, stage="write")
    assert err.errno == 28 and err.stage == "write" and str(err) == "disk full"
    with pytest.raises(OSError):
        raise err


def test_version_is_a_string() -> None:
    assert isinstance(safepoint.__version__, str) and safepoint.__version__[0].isdigit()


def test_numpy_load_of_a_dtype_numpy_cannot_spell_says_how(tmp_path):
    """float4_e2m1fn_x2 has no numpy or ml_dtypes type: the error points to torch tensors."""
    torch = pytest.importorskip("torch")
    packed = torch.arange(4, dtype=torch.uint8).view(torch.float4_e2m1fn_x2)
    mgr = safepoint.CheckpointManager(tmp_path / "run")
    ckpt = mgr.save({"c": packed}, step=1)
    with pytest.raises(safepoint.IncompatibleCheckpointError, match="as_numpy=False"):
        safepoint.load(ckpt.path)
    back = safepoint.load(ckpt.path, as_numpy=False)["c"]
    assert back.dtype == torch.float4_e2m1fn_x2
    assert torch.equal(back.view(torch.uint8), packed.view(torch.uint8))


def test_retention_failure_message_says_the_new_checkpoint_is_committed(tmp_path):
    from safepoint_testing import fail_at, faulty_manager

    failing_delete = fail_at("retention", times=None)
    mgr = faulty_manager(tmp_path / "run", failing_delete, keep=safepoint.Keep(last=1))
    mgr.save({"x": 1}, step=1)
    with pytest.raises(safepoint.StorageError, match="new checkpoint was committed") as exc:
        mgr.save({"x": 2}, step=2)
    assert exc.value.stage == "retention"
    assert mgr.latest().step == 2


def test_every_module_states_its_interface() -> None:
    """Internal modules declare ``__all__`` (or are private), so that an internal like
    the payload writer's chunk pool does not look as public as ``safepoint.load``.

    Read from the source, not imported: the adapters' frameworks need not be loaded.
    """
    import ast
    from pathlib import Path

    package = Path(safepoint.__file__).parent
    missing, stale = [], []
    for path in sorted(package.rglob("*.py")):
        if path.name.startswith("_") and path.name != "__init__.py":
            continue
        tree = ast.parse(path.read_text())
        defined: set[str] = set()
        declared: list[str] | None = None
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                defined.add(node.name)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                defined.update((a.asname or a.name).split(".")[0] for a in node.names)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    if isinstance(target, ast.Name):
                        defined.add(target.id)
                        if target.id == "__all__" and node.value is not None:
                            declared = list(ast.literal_eval(node.value))
        where = str(path.relative_to(package))
        if declared is None:
            if path.read_text().strip():
                missing.append(where)
            continue
        stale += [f"{where}:{name}" for name in declared if name not in defined]
        stale += [
            f"{where}:{name}" for name in declared if name.startswith("_") and name != "__version__"
        ]
    assert not missing, f"modules without __all__: {missing}"
    assert not stale, f"__all__ names that are missing or private: {stale}"
