"""Control draws: each item's S controls come from its own pool, distinct unless the pool is small."""

from __future__ import annotations

import numpy as np
import pytest

from cellfeed.server.kinds.perturbation.layout import FileLayout, Group
from cellfeed.server.kinds.perturbation.sampler import ControlPools


def _pools(sizes: list[int]) -> tuple[ControlPools, list[np.ndarray]]:
    """One file per pool size; pool p holds rows p*10_000 + 0..size-1."""
    groups, layouts, pools = [], [], []
    for p, size in enumerate(sizes):
        rows = np.arange(size, dtype=np.int64) + p * 10_000
        pools.append(rows)
        layouts.append(FileLayout(spec=None, h5=None, groups=[], control_span=(0, 0), control_rows={"ct": rows}))
        groups.append(Group(file=p, cell_type="ct", target="t", rows=np.array([0]), batches=np.array(["b"]), split="train"))
    return ControlPools(groups, layouts), pools


@pytest.mark.parametrize("sizes", [[5000, 2000], [40, 100], [8, 3000], [1, 32 * 32]])
def test_each_item_draws_from_its_own_pool_without_replacement_when_it_can(sizes):
    S = 32
    pools, rows = _pools(sizes)
    group = np.random.default_rng(0).integers(0, len(sizes), 200)
    out = pools.draw(np.random.default_rng(1), group, S)
    assert out.shape == (200, S)
    for item, g in zip(out, group):
        assert np.isin(item, rows[g]).all()
        if sizes[g] >= S:
            assert len(np.unique(item)) == S


def test_draws_are_seeded_and_cover_the_pool():
    pools, rows = _pools([3000])
    group = np.zeros(500, dtype=np.int64)
    a = pools.draw(np.random.default_rng(7), group, 32)
    np.testing.assert_array_equal(a, pools.draw(np.random.default_rng(7), group, 32))
    assert not np.array_equal(a, pools.draw(np.random.default_rng(8), group, 32))
    # 16,000 uniform draws from 3,000 rows leave almost none unseen (expected ~14)
    assert len(np.setdiff1d(rows[0], a)) < 60
