"""SIGKILL of a process while it saves: nothing committed is lost, the next writer resumes.

SIGKILL at random moments of a child process that saves in a loop.

The oracle lives outside the fault: the child prints ``returned <step> <hash>`` after
each ``save()`` returns, and the parent, after each kill, checks that every listed
checkpoint verifies and that ``restore()`` gives back exactly the last returned save
or the one that was in flight (its step + 1, if its commit completed) — never
anything older, newer or partial.

Family 2: SIGKILL at random moments of a child process that saves in a loop.

Each trial forks a saver that resumes from the root (checking that what it resumed is
exactly what was saved), saves step after step with retention on, and is killed with
SIGKILL after a random delay. The parent's oracle then checks "nothing lost". The
default run makes a bounded number of kills; ``-m slow`` makes hundreds with 8-64 MiB
states.
"""

from __future__ import annotations

import importlib.util
import os
import random
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest
from faultkit import MiB, Oracle, kill_trial, leftovers, rng_for

import safepoint

pytestmark = pytest.mark.e2e  # each test SIGKILLs real saver processes

HELPER = Path(__file__).resolve().parents[1] / "helpers" / "save_loop.py"
KILLS = 50


def load_helper() -> ModuleType:
    spec = importlib.util.spec_from_file_location("save_loop", HELPER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def wait_for_start(proc: subprocess.Popen[str], timeout: float = 30.0) -> None:
    """Block until the child printed its ``start`` line (it has resumed and will save)."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, "child did not start"
    line = proc.stdout.readline()
    assert line.startswith("start "), line


def test_sigkill_loop_never_loses_or_invents_a_checkpoint(tmp_path: Path) -> None:
    helper = load_helper()
    root = tmp_path / "run"
    rng = random.Random(2024)
    last_returned: int | None = None
    last_hash: str | None = None
    returned_total = 0
    in_flight_seen = 0
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for kill in range(KILLS):
        proc = subprocess.Popen(
            [sys.executable, str(HELPER), str(root)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        try:
            wait_for_start(proc)
            time.sleep(rng.uniform(0.0, 0.25))
        finally:
            proc.send_signal(signal.SIGKILL)
            out, err = proc.communicate(timeout=30)
        assert proc.returncode == -signal.SIGKILL, err
        for line in out.splitlines():
            word, step_text, digest = line.split()
            assert word == "returned"
            step = int(step_text)
            assert last_returned is None or step > last_returned
            last_returned, last_hash = step, digest
            returned_total += 1

        # everything listed verifies; nothing half-written is listed
        reader = safepoint.CheckpointManager(root)
        listed = reader.checkpoints()
        assert all(v.ok for v in reader.verify()), [str(v.error) for v in reader.verify()]
        assert {v.name for v in reader.verify()} == {c.name for c in listed}

        ckpt = reader.restore(missing_ok=True)
        if ckpt is None:
            assert last_returned is None, f"kill {kill}: save {last_returned} returned but lost"
            continue
        assert ckpt.step is not None
        allowed = {1} if last_returned is None else {last_returned, last_returned + 1}
        assert ckpt.step in allowed, f"kill {kill}: restored {ckpt.step}, allowed {allowed}"
        expected = helper.state_for(ckpt.step)
        got = helper.state_hash(ckpt.state)
        assert got == helper.state_hash(expected)
        if ckpt.step == last_returned:
            assert got == last_hash
        else:
            # the in-flight save committed before the kill: it is durable now, and the
            # next child resumes after it, so it becomes the oracle's baseline
            in_flight_seen += 1
            last_returned, last_hash = ckpt.step, got
        assert listed[-1].step == ckpt.step  # latest listed is the one restored
    # the loop made real progress, so kills landed on saves, not only on start-up (a
    # loose bound: on a loaded machine each save is slower and fewer return)
    assert returned_total >= KILLS // 5, (returned_total, in_flight_seen)


KILLS_DEFAULT = 150
KILLS_SLOW = 400


def _run(tmp_path, request, *, kills: int, sizes: list[int], keep_last: int | None) -> Oracle:
    rng = rng_for(request.node.name)
    root = str(tmp_path / "run")
    oracle = Oracle(seed=7, nbytes=rng.choice(sizes), keep_last=keep_last)
    started = time.monotonic()
    for _ in range(kills):
        # Most kills land inside a save: saves take most of each child's life.
        kill_trial(root, oracle, delay=rng.uniform(0.0, 0.12))
    # A writer after the last kill cleans whatever the kills left and saves again.
    mgr = safepoint.CheckpointManager(root, keep=safepoint.Keep(last=keep_last or 10**6))
    step = (oracle.returned or 0) + 5
    from faultkit import make_state

    mgr.save(make_state(oracle.seed, step, oracle.nbytes), step=step)
    assert leftovers(root) == []
    print(
        f"\n{kills} SIGKILLs of a forked saver ({oracle.nbytes // MiB or 1} MiB state, "
        f"keep_last={keep_last}) in {time.monotonic() - started:.1f}s: {oracle.outcomes}; "
        f"last returned step {oracle.returned}"
    )
    return oracle


def test_random_sigkill_loses_nothing(tmp_path, request):
    oracle = _run(tmp_path, request, kills=KILLS_DEFAULT, sizes=[1 * MiB], keep_last=2)
    assert oracle.checks == KILLS_DEFAULT
    assert oracle.returned is not None and oracle.returned > 0
    assert oracle.outcomes.get("killed during a save", 0) > 0, oracle.outcomes


def test_random_sigkill_without_retention(tmp_path, request):
    oracle = _run(tmp_path, request, kills=KILLS_DEFAULT // 3, sizes=[1 * MiB], keep_last=None)
    assert oracle.checks == KILLS_DEFAULT // 3


@pytest.mark.slow
@pytest.mark.parametrize("nbytes", [8 * MiB, 64 * MiB])
def test_random_sigkill_many_large_states(tmp_path, request, nbytes):
    rng = rng_for(request.node.name)
    root = str(tmp_path / "run")
    oracle = Oracle(seed=11, nbytes=nbytes, keep_last=rng.choice([1, 2, 3]))
    budget = KILLS_SLOW // 2
    for _ in range(budget):
        kill_trial(root, oracle, delay=rng.uniform(0.0, 0.6 if nbytes > 8 * MiB else 0.25))
    assert oracle.checks == budget
    print(f"\n{budget} SIGKILLs at {nbytes // MiB} MiB: {oracle.outcomes}")
    assert os.path.isdir(root)
