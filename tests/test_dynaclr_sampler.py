"""The flexible sampler: permutation epochs, DDP shares, purity, leak, balance, temporal focus."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from cellfeed.server.errors import CellfeedError
from cellfeed.server.kinds.dynaclr.sampler import FlexibleBatchSampler, FlexibleOptions
from cellfeed.server.samplers.sequential import SequentialSampler

B = 10


@pytest.fixture(scope="module")
def items():
    """3 experiments (300, 200, 100 items) x conditions (2, 3, 2), HPI 0, 2, ..., 48."""
    rng = np.random.default_rng(0)
    sizes, n_conditions = (300, 200, 100), (2, 3, 2)
    experiment = np.concatenate([np.full(n, e) for e, n in enumerate(sizes)])
    condition = np.concatenate([rng.integers(0, k, n) for k, n in zip(n_conditions, sizes)])
    hpi = rng.choice(np.arange(0, 50, 2.0), len(experiment))
    return experiment, condition, hpi


def _sampler(items, **options) -> FlexibleBatchSampler:
    return FlexibleBatchSampler(*items, FlexibleOptions(batch_size=B, **options))


def _epoch(sampler, epoch=0, world_size=1) -> list[np.ndarray]:
    n = sampler.num_batches(world_size)
    return [sampler.batch(epoch, rank, world_size, k).items for k in range(n) for rank in range(world_size)]


def test_unweighted_epoch_is_a_permutation(items):
    sampler = _sampler(items, experiment_aware=False, condition_balanced=False)
    assert sampler.num_batches(1) == 60
    drawn = np.concatenate(_epoch(sampler))
    assert sorted(drawn.tolist()) == list(range(600))


def test_experiment_aware_epoch_is_a_permutation_of_pure_batches(items):
    experiment = items[0]
    sampler = _sampler(items, experiment_aware=True, condition_balanced=False)
    batches = _epoch(sampler)
    assert all(len(set(experiment[b])) == 1 for b in batches)
    assert sorted(np.concatenate(batches).tolist()) == list(range(600))
    assert Counter(int(experiment[b[0]]) for b in batches) == {0: 30, 1: 20, 2: 10}


def test_padding_is_declared_when_a_pool_does_not_fill_its_last_batch():
    experiment = np.array([0] * 25 + [1] * 10)
    sampler = FlexibleBatchSampler(
        experiment, np.zeros(35), np.zeros(35), FlexibleOptions(batch_size=B, condition_balanced=False)
    )
    plan, padding = sampler.epoch_items(0, 1)
    assert plan.shape == (4, B)
    assert padding.sum() == 5  # 25 items in 3 batches: 5 repeats, all from experiment 0
    assert set(experiment[plan[padding]]) == {0}
    assert sorted(set(plan[~padding].ravel().tolist())) == list(range(35))


@pytest.mark.parametrize(
    "options, exact",
    [({"experiment_aware": False, "condition_balanced": False}, True), ({}, False), ({"temporal_enrichment": True}, False)],
)
def test_ddp_ranks_get_equal_disjoint_shares(items, options, exact):
    sampler = _sampler(items, **options)
    whole = _epoch(sampler, world_size=1)
    for world in (2, 3, 4):
        per_rank = sampler.num_batches(world)
        shares = [[sampler.batch(5, r, world, k).global_index for k in range(per_rank)] for r in range(world)]
        flat = [j for share in shares for j in share]
        assert len(set(flat)) == len(flat) == per_rank * world >= len(whole)  # disjoint, equal, complete
        assert all(j % world == r for r, share in enumerate(shares) for j in share)
    if not exact:
        return
    # Unweighted: rank shares of items are disjoint apart from declared padding.
    world = 4
    seen: list[int] = []
    for r in range(world):
        for k in range(sampler.num_batches(world)):
            b = sampler.batch(0, r, world, k)
            seen += b.items[~b.padding].tolist()
    assert len(seen) == len(set(seen))


def test_determinism_by_seed_and_epoch(items):
    a, b = _sampler(items), _sampler(items)
    assert all((x == y).all() for x, y in zip(_epoch(a, 3), _epoch(b, 3)))
    assert not all((x == y).all() for x, y in zip(_epoch(a, 3), _epoch(a, 4)))
    other = FlexibleBatchSampler(*items, FlexibleOptions(batch_size=B, seed=1))
    assert not all((x == y).all() for x, y in zip(_epoch(a, 3), _epoch(other, 3)))


def test_experiment_purity_and_leak_size(items):
    experiment = items[0]
    pure = _sampler(items, condition_balanced=False, experiment_weights=(1.0, 1.0, 1.0))
    assert all(len(set(experiment[b])) == 1 for b in _epoch(pure))
    leaky = _sampler(items, condition_balanced=False, leaky=0.3)
    for batch in _epoch(leaky):
        main, leak = batch[:7], batch[7:]
        assert len(set(experiment[main])) == 1
        assert len(leak) == 3 and not set(experiment[leak]) & set(experiment[main])


def test_experiment_weights_pick_experiments(items):
    experiment = items[0]
    sampler = _sampler(items, condition_balanced=False, experiment_weights=(0.0, 1.0, 3.0))
    picks = Counter(int(experiment[b[0]]) for e in range(4) for b in _epoch(sampler, e))
    assert picks[0] == 0
    assert 2.0 < picks[2] / picks[1] < 4.5
    with pytest.raises(CellfeedError, match="zero weight to every experiment"):
        _sampler(items, experiment_weights=(0.0, 0.0, 0.0))


def test_condition_balance_and_ratio(items):
    experiment, condition, _ = items
    balanced = _sampler(items)
    for batch in _epoch(balanced):
        counts = Counter(condition[batch].tolist())
        k = 3 if experiment[batch[0]] == 1 else 2
        assert len(counts) == k and max(counts.values()) - min(counts.values()) <= 1
    ratio = _sampler(items, experiment_aware=False, condition_ratio=(0.8, 0.2, 0.0))
    for batch in _epoch(ratio):
        assert Counter(condition[batch].tolist()) == {0: 8, 1: 2}


def test_weighted_epochs_still_cover_evenly(items):
    """Draws run through each pool before repeating: weights that match the data cover it exactly."""
    sampler = _sampler(items, experiment_aware=False, temporal_enrichment=True, temporal_global_fraction=1.0)
    counts = np.bincount(np.concatenate(_epoch(sampler)), minlength=600)
    assert counts.max() <= 3 and (counts == 0).sum() < 600 * 0.2
    uniform = _sampler(items, experiment_aware=False, condition_balanced=False, experiment_weights=(1.0, 1.0, 1.0))
    assert (np.bincount(np.concatenate(_epoch(uniform)), minlength=600) == 1).all()


def test_temporal_focus(items):
    _, condition, hpi = items
    focused = _sampler(
        items, condition_balanced=False, temporal_enrichment=True, temporal_window_hours=2.0, temporal_global_fraction=0.0
    )
    for batch in _epoch(focused):
        assert np.ptp(hpi[batch]) <= 4.0 + 1e-9
    mixed = _sampler(
        items, condition_balanced=False, temporal_enrichment=True, temporal_window_hours=2.0, temporal_global_fraction=0.5
    )
    spans = [np.ptp(hpi[b]) for b in _epoch(mixed)]
    assert np.mean(spans) > 10


def test_temporal_focus_and_condition_balance_apply_together(items):
    experiment, condition, hpi = items
    sampler = _sampler(items, temporal_enrichment=True, temporal_window_hours=2.0, temporal_global_fraction=0.0)
    for batch in _epoch(sampler):
        counts = Counter(condition[batch].tolist())
        assert max(counts.values()) - min(counts.values()) <= 1
        assert np.ptp(hpi[batch]) <= 4.0 + 1e-9


def test_sequential_batches_and_declared_padding():
    sampler = SequentialSampler(25, B)
    assert sampler.num_batches(1) == 3 and sampler.num_batches(2) == 2
    solo = [sampler.batch(0, 0, 1, k) for k in range(3)]
    assert [b.items.tolist() for b in solo] == [list(range(0, 10)), list(range(10, 20)), list(range(20, 25))]
    assert not any(b.padding.any() for b in solo)
    pair = [sampler.batch(7, r, 2, k) for k in range(2) for r in range(2)]
    assert [b.global_index for b in pair] == [0, 1, 2, 3]
    assert pair[3].padding.all() and pair[3].items.tolist() == list(range(10))
    assert np.concatenate([b.items[~b.padding] for b in pair]).tolist() == list(range(25))
