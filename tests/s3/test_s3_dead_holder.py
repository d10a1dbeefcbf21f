"""A lease whose holder provably died on this machine is taken over at once; any doubt
(a live holder, another boot, another pid namespace, an old lease) waits for expiry."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from safepoint.errors import StorageError

s3 = pytest.importorskip("safepoint.storage.s3")
from safepoint.storage.s3 import lease  # noqa: E402

HOLD = """
import json, sys, time
from safepoint.storage.s3 import S3Storage
storage = S3Storage(sys.argv[1], json.loads(sys.argv[2]))  # the default 60 s lease
storage.lock()
print("held", flush=True)
time.sleep(600)
"""
SRC = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "src"))


def _holder(root: str, options: dict) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, root, json.dumps(options)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": SRC},
    )
    assert proc.stdout is not None and proc.stdout.readline() == "held\n"
    return proc


@pytest.mark.e2e
def test_a_killed_holder_on_this_machine_is_taken_over_at_once(s3_server, s3_root):
    proc = _holder(s3_root, s3_server.options)
    successor = s3.S3Storage(s3_root, s3_server.options)
    try:
        with pytest.raises(StorageError, match="leased by another writer") as info:
            successor.lock()  # alive: refused, although on this machine
        assert "this very process" not in str(info.value)  # another process
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        began = time.monotonic()
        successor.lock()  # dead: no 60 s wait
        assert time.monotonic() - began < 10
        assert successor._lease.held
    finally:
        successor.unlock()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()


def test_only_proof_of_death_counts(monkeypatch):
    me = lease._process_identity(os.getpid())
    if not me:
        pytest.skip("needs Linux /proc")
    host = __import__("socket").gethostname()
    dead_pid = 2**22 + 12345  # above the default pid_max: never a live process
    dead = {"pid": dead_pid, "host": host, **me}
    assert lease._holder_died(dead)
    assert not lease._holder_died({**dead, "pid": os.getpid()})  # alive (same start time)
    assert not lease._holder_died({**dead, "host": "elsewhere"})
    assert not lease._holder_died({**dead, "boot": "another-boot"})
    assert not lease._holder_died({**dead, "pidns": me["pidns"] + 1})
    assert not lease._holder_died({"pid": dead_pid, "host": host})  # an old lease: no identity
    assert not lease._holder_died({**dead, "pid": True})
    assert not lease._holder_died({**dead, "pid": -1})
    # Our pid, but a start time of another process: ours was reused, the holder is gone.
    assert lease._holder_died({**dead, "pid": os.getpid(), "start": "1"})
