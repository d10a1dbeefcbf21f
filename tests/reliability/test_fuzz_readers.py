"""Fuzzing the readers: Hypothesis mutates valid checkpoints, only documented errors come out.

Mutations: raw bytes of the manifest (caught by its self-checksum, mostly); structural
edits of the manifest's JSON, re-signed so that the validation behind the checksum is
what must refuse them; bytes of safetensors and HDF5 payloads with the manifest made to
vouch for them (size and checksum updated), so that the payload parsers see hostile
bytes. Every example is read in a forked child (a crash cannot take pytest down) under
an address-space limit (bounded memory) and an audit hook that flags any file opened
outside the checkpoint root. Restore, verify and load may succeed or raise one of
safepoint's documented reader errors; anything else (MemoryError, RecursionError,
OverflowError, KeyError, ValueError, a crash, a read outside the root) fails the test.

The default run makes a few hundred examples; ``-m fuzz`` makes tens of thousands.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import sys
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xxhash
from faultkit import Shared, fork
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import safepoint
from safepoint.ondisk.manifest import _body_digest
from safepoint_testing import examples

ALLOWED = (
    safepoint.CorruptCheckpointError,
    safepoint.IncompatibleCheckpointError,
    safepoint.IncompleteCheckpointError,
    safepoint.CheckpointNotFoundError,
    safepoint.StorageError,
)
DEFAULT_EXAMPLES = 60
FUZZ_EXAMPLES = 5000
MEMORY_MARGIN = 512 << 20
COUNTS: dict[str, int] = {}

STATE = {
    "model": {
        "w": np.linspace(-1, 1, 96, dtype=np.float32).reshape(8, 12),
        "b": np.arange(5, dtype=np.int64),
        "mask": np.array([True, False, True]),
        "z": np.array([1 + 2j, 3 - 4j], dtype=np.complex64),
        "h": np.arange(6, dtype=np.float16),
    },
    "opt": {"step": 7, "lr": float("nan"), "betas": (0.9, 0.999), 3: "int key"},
    "big": 2**80,
    "scalar": np.uint8(5),
}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> dict[str, Path]:
    out = {}
    for fmt in ("safetensors", "hdf5"):
        if fmt == "hdf5" and not _has("h5py"):
            continue
        root = tmp_path_factory.mktemp(f"fuzz-{fmt}") / "run"
        mgr = safepoint.CheckpointManager(root, format=fmt, shard_bytes=256)
        mgr.save(STATE, step=1)
        mgr.close()
        out[fmt] = root / "step-00000001"
    return out


def _has(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


# -------------------------------------------------------------------- the child read
def _vm_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def _read_all(ckpt: Path) -> None:
    mgr = safepoint.CheckpointManager(ckpt.parent)
    for op in (
        lambda: mgr.restore(checkpoint=ckpt.name),
        lambda: mgr.verify(),
        lambda: mgr.checkpoints(),
        lambda: safepoint.load(ckpt),
        lambda: safepoint.load(ckpt, as_numpy=False),
    ):
        with contextlib.suppress(*ALLOWED):
            op()


def check_in_child(ckpt: Path) -> None:
    """Read ``ckpt`` every way in a forked child; fail on anything undocumented."""
    shared = Shared()
    root = str(ckpt.parent)
    allowed_dirs = (root, sys.prefix, sys.base_prefix, "/proc", "/dev", "/sys", "/usr", "/etc/ld")

    def child() -> None:
        limit = _vm_bytes() + MEMORY_MARGIN
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        outside: list[str] = []

        def audit(event: str, args: tuple[Any, ...]) -> None:
            if event != "open" or not args or not isinstance(args[0], str | bytes):
                return
            path = os.fsdecode(args[0])
            if os.path.isabs(path):
                if not os.path.normpath(path).startswith(allowed_dirs):
                    outside.append(path)
            elif "/" in path or path in ("..", "."):
                outside.append(path)

        sys.addaudithook(audit)
        try:
            _read_all(ckpt)
        except BaseException as exc:
            shared.put({"bad": f"{type(exc).__name__}: {exc}"[:2000], "tb": traceback.format_exc()})
            os._exit(3)
        if outside:
            shared.put({"bad": f"opened outside the root: {outside[:5]}"})
            os._exit(4)
        os._exit(0)

    pid = fork(child)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        pytest.fail(f"the reader crashed with signal {os.WTERMSIG(status)} on {ckpt}")
    assert os.WEXITSTATUS(status) == 0, shared.get()


# --------------------------------------------------------------------------- mutations
def _work(pristine: Path, tmp: Path) -> Path:
    root = tmp / "run"
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    dst = root / pristine.name
    shutil.copytree(pristine, dst)
    return dst


byte_edits = st.lists(
    st.tuples(
        st.sampled_from(["flip", "set", "insert", "delete", "truncate", "splice"]),
        st.floats(0, 1, allow_nan=False),
        st.binary(min_size=1, max_size=16),
    ),
    min_size=1,
    max_size=4,
)


def _mutate_bytes(data: bytes, edits, *, region: int | None = None) -> bytes:
    buf = bytearray(data)
    for kind, where, blob in edits:
        n = len(buf) if region is None else min(region, len(buf))
        i = int(where * max(n - 1, 0))
        if kind == "flip" and buf:
            buf[i] ^= blob[0] or 1
        elif kind == "set" and buf:
            buf[i : i + len(blob)] = blob
        elif kind == "insert":
            buf[i:i] = blob
        elif kind == "delete":
            del buf[i : i + len(blob)]
        elif kind == "truncate":
            del buf[i:]
        elif kind == "splice":
            buf[i:i] = blob * 64
    return bytes(buf)


json_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 2**31, 2**63, 2**64 + 1, 10**30]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
    st.sampled_from(
        ["..", "/etc/passwd", "../x", "$tensor", "object", "V8", "<U4", "model/w", "", "a\x00b"]
    ),
)
json_value = st.recursive(
    json_scalar,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)


def _paths(node: Any, here: tuple = ()) -> list[tuple]:
    out = [here]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*here, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*here, i))
    return out


def _replace(node: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    head, rest = path[0], path[1:]
    node[head] = _replace(node[head], rest, value)
    return node


def _deep(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


def _vouch(ckpt: Path, fname: str) -> None:
    """Make the manifest vouch for the current bytes of ``fname`` and re-sign it."""
    body = json.loads((ckpt / "manifest.json").read_text())
    data = (ckpt / fname).read_bytes()
    body["files"][fname] = {"size": len(data), "xxh3_64": xxhash.xxh3_64_hexdigest(data)}
    body["checksum"] = _body_digest(body)
    (ckpt / "manifest.json").write_text(json.dumps(body))


def _count(what: str) -> None:
    COUNTS[what] = COUNTS.get(what, 0) + 1


# ------------------------------------------------------------------------------ bodies
def manifest_bytes_body(pristine, tmp, edits) -> None:
    ckpt = _work(pristine["safetensors"], tmp)
    path = ckpt / "manifest.json"
    path.write_bytes(_mutate_bytes(path.read_bytes(), edits))
    _count("manifest bytes")
    check_in_child(ckpt)


def manifest_json_body(pristine, tmp, fmt, pick, value, depth) -> None:
    if fmt not in pristine:
        return
    ckpt = _work(pristine[fmt], tmp)
    body = json.loads((ckpt / "manifest.json").read_text())
    paths = _paths(body)
    path = paths[int(pick * (len(paths) - 1))]
    if path in ((), ("checksum",)):
        path = ("tree",)
    body = _replace(body, path, _deep(depth) if depth else value)
    try:
        body["checksum"] = _body_digest(body)
    except (TypeError, ValueError, RecursionError):
        return  # not JSON-encodable by a writer: cannot be a manifest on disk
    (ckpt / "manifest.json").write_text(json.dumps(body))
    _count(f"manifest json ({fmt})")
    check_in_child(ckpt)


def payload_body(pristine, tmp, fmt, edits, header_only) -> None:
    if fmt not in pristine:
        return
    ckpt = _work(pristine[fmt], tmp)
    payloads = sorted(p.name for p in ckpt.iterdir() if p.name != "manifest.json")
    fname = payloads[len(edits) % len(payloads)]
    data = (ckpt / fname).read_bytes()
    region = 512 if header_only else None
    (ckpt / fname).write_bytes(_mutate_bytes(data, edits, region=region))
    _vouch(ckpt, fname)
    _count(f"payload bytes ({fmt})")
    check_in_child(ckpt)


HC = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]


def _settings(n: int):
    return settings(max_examples=n, deadline=None, suppress_health_check=HC, derandomize=False)


def _tests(n: int, mark=None):
    @_settings(n)
    @given(edits=byte_edits)
    def t_manifest_bytes(pristine, tmp_path, edits):
        manifest_bytes_body(pristine, tmp_path, edits)

    @_settings(n)
    @given(
        fmt=st.sampled_from(["safetensors", "hdf5"]),
        pick=st.floats(0, 1, allow_nan=False),
        value=json_value,
        depth=st.sampled_from([0, 0, 0, 0, 150, 250, 3000]),
    )
    def t_manifest_json(pristine, tmp_path, fmt, pick, value, depth):
        manifest_json_body(pristine, tmp_path, fmt, pick, value, depth)

    @_settings(n)
    @given(
        fmt=st.sampled_from(["safetensors", "hdf5"]),
        edits=byte_edits,
        header_only=st.booleans(),
    )
    def t_payload(pristine, tmp_path, fmt, edits, header_only):
        payload_body(pristine, tmp_path, fmt, edits, header_only)

    tests = (t_manifest_bytes, t_manifest_json, t_payload)
    return tuple(mark(t) for t in tests) if mark else tests


test_manifest_bytes, test_manifest_json, test_payload_bytes = _tests(examples(DEFAULT_EXAMPLES))
(
    test_manifest_bytes_long,
    test_manifest_json_long,
    test_payload_bytes_long,
) = _tests(FUZZ_EXAMPLES, pytest.mark.fuzz)


def test_zz_fuzz_cases_run():
    """Report how many mutated checkpoints the readers were fed in this session."""
    print(f"\nfuzz cases run: {sum(COUNTS.values())} {dict(sorted(COUNTS.items()))}")
    assert sum(COUNTS.values()) > 0
