"""Family 2: SIGKILL at random moments of a child process that saves in a loop.

Each trial forks a saver that resumes from the root (checking that what it resumed is
exactly what was saved), saves step after step with retention on, and is killed with
SIGKILL after a random delay. The parent's oracle then checks "nothing lost". The
default run makes a bounded number of kills; ``-m slow`` makes hundreds with 8-64 MiB
states.
"""

from __future__ import annotations

import os
import time

import pytest
from faultkit import MiB, Oracle, kill_trial, leftovers, rng_for

import safepoint

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
