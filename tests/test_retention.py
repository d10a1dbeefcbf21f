"""Retention: what ``Keep(last=, best=, every=)`` leaves on disk after every save.

The expected set is computed by an independent model of the policy, so the property
test checks the manager against the documented rules, not against itself: the newest
and the best (finite metric) checkpoints always survive, NaN and missing metrics never
count as best, and order comes from ``seq`` — not names, not mtimes.
"""

from __future__ import annotations

import itertools
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import safepoint

_counter = itertools.count()


@dataclass
class Saved:
    seq: int
    step: int
    metric: float | None  # None: missing from the metrics

    @property
    def name(self) -> str:
        return f"step-{self.step:08d}"


def expected_keep(saved: list[Saved], keep: safepoint.Keep, mode: str) -> set[str]:
    """The documented policy, spelled out independently of safepoint.retention."""
    newest = max(saved, key=lambda s: s.seq)
    names = {newest.name}
    by_seq = sorted(saved, key=lambda s: s.seq)
    if keep.last:
        names |= {s.name for s in by_seq[-keep.last :]}
    if keep.every:
        names |= {s.name for s in saved if s.step % keep.every == 0}
    finite = [s for s in by_seq if s.metric is not None and math.isfinite(s.metric)]
    sign = 1 if mode == "min" else -1
    finite.sort(key=lambda s: (sign * s.metric, s.seq))  # type: ignore[operator]
    names |= {s.name for s in finite[: max(keep.best or 0, 1)]}
    return names


def best_finite(saved: list[Saved], mode: str) -> Saved | None:
    finite = [s for s in saved if s.metric is not None and math.isfinite(s.metric)]
    if not finite:
        return None
    pick = min if mode == "min" else max
    value = pick(s.metric for s in finite)  # type: ignore[type-var]
    return min((s for s in finite if s.metric == value), key=lambda s: s.seq)


metric_values = st.one_of(
    st.none(),
    st.just(math.nan),
    st.sampled_from([math.inf, -math.inf]),
    st.floats(min_value=-10, max_value=10, allow_nan=False),
    st.sampled_from([0.5, 0.25]),  # ties
)
# Keep() needs at least one field: draw from the three shapes that guarantee one.
keeps = st.one_of(
    st.builds(safepoint.Keep, last=st.integers(1, 3), best=st.none(), every=st.none()),
    st.builds(
        safepoint.Keep,
        last=st.one_of(st.none(), st.integers(1, 3)),
        best=st.integers(1, 3),
        every=st.one_of(st.none(), st.integers(1, 4)),
    ),
    st.builds(
        safepoint.Keep,
        last=st.one_of(st.none(), st.integers(1, 3)),
        best=st.none(),
        every=st.integers(1, 4),
    ),
)


@settings(max_examples=100)
@given(
    keep=keeps,
    mode=st.sampled_from(["min", "max"]),
    metrics=st.lists(metric_values, min_size=1, max_size=9),
    gaps=st.lists(st.integers(1, 3), min_size=9, max_size=9),
)
def test_retention_keeps_exactly_the_policy_set(
    tmp_path: Path,
    keep: safepoint.Keep,
    mode: str,
    metrics: list[float | None],
    gaps: list[int],
) -> None:
    root = tmp_path / f"r{next(_counter)}"
    mgr = safepoint.CheckpointManager(root, monitor="score", mode=mode, keep=keep)
    saved: list[Saved] = []
    step = 0
    for i, metric in enumerate(metrics):
        step += gaps[i]
        values = {} if metric is None else {"score": metric}
        ckpt = mgr.save({"w": np.full(4, step, dtype=np.int32)}, step=step, metrics=values)
        saved.append(Saved(ckpt.seq, step, metric))
        expected = expected_keep(saved, keep, mode)
        on_disk = {c.name for c in mgr.checkpoints()}
        assert on_disk == expected
        assert {p.name for p in root.iterdir() if p.is_dir()} == expected  # nothing hidden
        saved = [s for s in saved if s.name in expected]
        # the newest and the best finite one are always there
        assert ckpt.name in on_disk
        latest = mgr.latest()
        assert latest is not None and latest.name == ckpt.name
        best = best_finite(saved, mode)
        mgr_best = mgr.best()
        if best is None:
            assert mgr_best is None  # NaN / inf / missing never count as best
        else:
            assert mgr_best is not None and mgr_best.name == best.name
    mgr.close()


def test_nan_and_missing_never_become_best(tmp_path: Path) -> None:
    with safepoint.CheckpointManager(
        tmp_path / "run", monitor="val_loss", keep=safepoint.Keep(last=1, best=1)
    ) as mgr:
        mgr.save({"x": 1}, step=1, metrics={"val_loss": 0.9})
        mgr.save({"x": 2}, step=2, metrics={"val_loss": math.nan})
        mgr.save({"x": 3}, step=3, metrics={})
        mgr.save({"x": 4}, step=4, metrics={"val_loss": -math.inf})
        mgr.save({"x": 5}, step=5, metrics={"val_loss": math.nan})
        assert [c.step for c in mgr.checkpoints()] == [1, 5]
        best = mgr.restore(checkpoint="best")
    assert best is not None and best.step == 1 and best.state == {"x": 1}


def test_keep_last_one_with_worsening_metric_keeps_best(tmp_path: Path) -> None:
    with safepoint.CheckpointManager(
        tmp_path / "run", monitor="val_acc", keep=safepoint.Keep(last=1)
    ) as mgr:
        for step, acc in enumerate([0.9, 0.8, 0.7, 0.6], start=1):
            mgr.save({"x": step}, step=step, metrics={"val_acc": acc})
            assert [c.step for c in mgr.checkpoints()] == sorted({1, step})


def test_order_comes_from_seq_not_names_or_mtimes(tmp_path: Path) -> None:
    root = tmp_path / "run"
    keep = safepoint.Keep(last=2)
    with safepoint.CheckpointManager(root, keep=keep, name="ckpt-{step}") as mgr:
        for step in (9, 10, 8):  # a resumed run: lexical and numeric order disagree
            mgr.save({"x": step}, step=step)
        assert [c.step for c in mgr.checkpoints()] == [10, 8]
    # shuffle mtimes: the oldest checkpoint looks newest, the newest looks ancient
    for i, name in enumerate(["ckpt-10", "ckpt-8"]):
        stamp = 2_000_000_000 - i * 1_000_000
        for dirpath, _, files in os.walk(root / name):
            for f in files:
                os.utime(os.path.join(dirpath, f), (stamp, stamp))
            os.utime(dirpath, (stamp, stamp))
    # and rename the directories so names sort the other way (cp -r, manual tidy-up)
    os.rename(root / "ckpt-10", root / "zz-old")
    os.rename(root / "ckpt-8", root / "aa-new")
    with safepoint.CheckpointManager(root, keep=keep, name="ckpt-{step}") as mgr:
        assert [c.name for c in mgr.checkpoints()] == ["zz-old", "aa-new"]
        latest = mgr.restore()
        assert latest is not None and latest.name == "aa-new" and latest.state == {"x": 8}
        mgr.save({"x": 1}, step=1)  # retention must drop the oldest by seq: zz-old
        assert [c.name for c in mgr.checkpoints()] == ["aa-new", "ckpt-1"]


def test_every_keeps_multiples(tmp_path: Path) -> None:
    with safepoint.CheckpointManager(tmp_path / "run", keep=safepoint.Keep(last=1, every=3)) as mgr:
        for step in range(1, 11):
            mgr.save({"x": step}, step=step)
        assert [c.step for c in mgr.checkpoints()] == [3, 6, 9, 10]


def test_random_mtimes_do_not_change_retention(tmp_path: Path) -> None:
    """Touching files between saves (backup tools do) never changes what is kept."""
    rng = random.Random(7)
    root = tmp_path / "run"
    keep = safepoint.Keep(last=2, best=1)
    saved: list[Saved] = []
    with safepoint.CheckpointManager(root, monitor="loss", keep=keep) as mgr:
        for step in range(1, 9):
            loss = rng.random()
            ckpt = mgr.save({"x": step}, step=step, metrics={"loss": loss})
            saved.append(Saved(ckpt.seq, step, loss))
            expected = expected_keep(saved, keep, "min")
            saved = [s for s in saved if s.name in expected]
            assert {c.name for c in mgr.checkpoints()} == expected
            for p in root.iterdir():
                stamp = rng.randint(1, 2_000_000_000)
                os.utime(p, (stamp, stamp))
