"""ResumableSampler.resplit: the global sample order continues on another world size."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from safepoint.errors import StateMismatchError  # noqa: E402
from safepoint.torch.sampler import ResumableSampler  # noqa: E402

DATA = list(range(48))


def _global_order(world: int, take: int, states: list | None = None) -> tuple[list, list]:
    samplers = [ResumableSampler(DATA, seed=3, num_replicas=world, rank=r) for r in range(world)]
    if states is not None:
        for s, st in zip(samplers, states, strict=True):
            s.load_state_dict(st)
    its = [iter(s) for s in samplers]
    seen = []
    for _ in range(take):
        seen += [next(it) for it in its]  # one sample per rank per step, rank order
    return seen, [s.state_dict() for s in samplers]


@pytest.mark.parametrize(("old", "new"), [(4, 2), (2, 4), (4, 3), (3, 1)])
def test_resplit_continues_the_global_order(old: int, new: int) -> None:
    straight, _ = _global_order(1, 48)
    steps = 12 // old * 2  # consumed 24 samples: divisible by 1, 2, 3, 4
    head, saved = _global_order(old, steps)
    states = [ResumableSampler.resplit(saved, r, new) for r in range(new)]
    tail, _ = _global_order(new, (48 - len(head)) // new, states)
    assert head + tail == straight


def test_resplit_refuses_an_uneven_continuation() -> None:
    _, saved = _global_order(2, 3)  # 6 consumed: 4 ranks cannot continue evenly
    with pytest.raises(StateMismatchError, match="same global batch"):
        ResumableSampler.resplit(saved, 0, 4)
