"""ResumableSampler: the order, the position it saves, and what a resumed pass yields."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from torch.utils.data import DataLoader, Dataset  # noqa: E402

import safepoint  # noqa: E402
from safepoint.torch import ResumableSampler  # noqa: E402


class Counting(Dataset):
    """Item ``i`` is ``i``; every read is recorded, to prove skipped samples are not read."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.reads: list[int] = []

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        self.reads.append(i)
        return i


def _batches(loader: DataLoader, limit: int | None = None) -> list[list[int]]:
    out = []
    for i, batch in enumerate(loader):
        out.append(batch.tolist())
        if limit is not None and i + 1 == limit:
            break
    return out


def _flat(batches: list[list[int]]) -> list[int]:
    return [i for b in batches for i in b]


def test_each_epoch_is_a_permutation_from_seed_and_epoch():
    sampler = ResumableSampler(range(50), seed=3)
    first, second = list(sampler), list(sampler)
    assert sorted(first) == sorted(second) == list(range(50))
    assert first != second  # a new epoch, a new order
    assert sampler.epoch == 2
    again = ResumableSampler(range(50), seed=3)
    assert list(again) == first  # a function of (seed, epoch) only
    assert list(ResumableSampler(range(50), seed=4)) != first
    assert list(ResumableSampler(range(50), shuffle=False)) == list(range(50))


@pytest.mark.parametrize("consumed", [1, 3, 7])
def test_resume_mid_epoch_yields_the_rest_without_reading_skipped_samples(consumed):
    data = Counting(30)
    sampler = ResumableSampler(data, seed=1)
    loader = DataLoader(data, batch_size=4, sampler=sampler)
    reference = _batches(DataLoader(data, batch_size=4, sampler=ResumableSampler(data, seed=1)))
    it = iter(loader)  # a mid-epoch save happens while the loop holds its iterator
    head = [next(it).tolist() for _ in range(consumed)]
    state = sampler.state_dict()
    assert (state["epoch"], state["position"]) == (0, min(consumed * 4, 30))
    del it  # a loop that lets go of its iterator early (break) has ended that epoch
    assert (sampler.state_dict()["epoch"], sampler.state_dict()["position"]) == (1, 0)

    fresh_data = Counting(30)
    resumed = ResumableSampler(fresh_data, seed=1)
    resumed.load_state_dict(state)
    tail = _batches(DataLoader(fresh_data, batch_size=4, sampler=resumed))
    assert _flat(head + tail) == _flat(reference)
    assert sorted(fresh_data.reads) == sorted(_flat(reference)[consumed * 4 :])
    # The pass after the resumed one is the next epoch, in full.
    assert resumed.epoch == 1
    assert sorted(list(resumed)) == list(range(30))


def test_position_counts_consumed_batches_not_prefetched_ones():
    data = Counting(64)
    sampler = ResumableSampler(data, seed=2)
    loader = DataLoader(data, batch_size=4, sampler=sampler, num_workers=2, prefetch_factor=2)
    it = iter(loader)
    for _ in range(3):
        next(it)
    # The workers asked the sampler for up to 4 more batches; the loop consumed 3.
    assert sampler.state_dict()["position"] == 12
    del it


def test_a_finished_pass_saves_the_next_epoch_and_no_rng():
    sampler = ResumableSampler(range(10), seed=0)
    loader = DataLoader(range(10), batch_size=3, sampler=sampler)
    _batches(loader)
    state = sampler.state_dict()
    assert (state["epoch"], state["position"]) == (1, 0) and "torch_rng" not in state
    it = iter(loader)
    next(it)
    assert "torch_rng" in sampler.state_dict()  # mid-pass: the resume must rewind


def test_a_save_at_the_last_batch_resumes_with_an_empty_rest_of_that_epoch():
    sampler = ResumableSampler(range(8), seed=0)
    loader = DataLoader(range(8), batch_size=4, sampler=sampler)
    batches = iter(loader)
    next(batches), next(batches)
    state = sampler.state_dict()
    assert (state["epoch"], state["position"]) == (0, 8)
    resumed = ResumableSampler(range(8), seed=0)
    resumed.load_state_dict(state)
    assert list(resumed) == []  # the loop finishes epoch 0's bookkeeping
    assert sorted(resumed) == list(range(8)) and resumed.epoch == 2


def test_resumed_pass_undoes_the_dataloader_seed_draw():
    """Dropout after a resume draws what the uninterrupted run drew."""
    sampler = ResumableSampler(range(20), seed=0)
    loader = DataLoader(range(20), batch_size=5, sampler=sampler)
    torch.manual_seed(0)
    it = iter(loader)
    next(it)
    state = sampler.state_dict()
    expected_batch = next(it).tolist()
    expected = torch.rand(4)  # what the uninterrupted loop draws after batch 2

    def resume(saved: dict) -> torch.Tensor:
        resumed = ResumableSampler(range(20), seed=0)
        resumed.load_state_dict(saved)
        torch.set_rng_state(state["torch_rng"])  # what RNGState restores
        rest = iter(DataLoader(range(20), batch_size=5, sampler=resumed))  # draws a seed
        assert next(rest).tolist() == expected_batch
        return torch.rand(4)

    assert torch.equal(resume(state), expected)
    # Control: without the saved generator state the seed draw shifts every later draw.
    assert not torch.equal(resume({k: v for k, v in state.items() if k != "torch_rng"}), expected)


def test_set_epoch_keeps_the_epoch_in_progress_and_resets_another():
    sampler = ResumableSampler(range(12), seed=0)
    state = {"epoch": 2, "position": 6}
    sampler.load_state_dict(state)
    sampler.set_epoch(2)
    assert len(list(sampler)) == 6
    sampler.set_epoch(5)
    assert sampler.epoch == 5 and len(list(sampler)) == 12


@pytest.mark.parametrize("drop_last", [False, True])
def test_replicas_split_each_epoch(drop_last):
    parts = [
        list(ResumableSampler(range(10), seed=1, drop_last=drop_last, num_replicas=3, rank=r))
        for r in range(3)
    ]
    assert all(len(p) == (3 if drop_last else 4) for p in parts)
    seen = sorted(i for p in parts for i in p)
    if drop_last:
        assert len(set(seen)) == 9
    else:
        assert set(seen) == set(range(10)) and len(seen) == 12


def test_bad_arguments_and_states_are_clear_errors():
    with pytest.raises(safepoint.ConfigError, match="seed"):
        ResumableSampler(range(3), seed=-1)
    with pytest.raises(safepoint.ConfigError, match="rank"):
        ResumableSampler(range(3), num_replicas=2, rank=2)
    sampler = ResumableSampler(range(3))
    with pytest.raises(safepoint.StateMismatchError, match="position"):
        sampler.load_state_dict({"epoch": 0, "position": 9})
    with pytest.raises(safepoint.StateMismatchError, match="seed: saved 1, now 0"):
        sampler.load_state_dict({"epoch": 0, "position": 0, "seed": 1})
