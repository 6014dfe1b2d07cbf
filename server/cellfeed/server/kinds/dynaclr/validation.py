"""The validation split's sampler: VisCy main draws validation with the training sampler.

VisCy main's `MultiExperimentDataModule.val_dataloader` builds the same `FlexibleBatchSampler`
as training (same `batch_group_by`, `stratify_by`, `group_weights`, leak; temporal enrichment
off), so `loss/val` is measured on batches composed like the training ones. For the collection
and cell-index forms the server does the same; the plan is the one of epoch 0 in every epoch, so
validation batches (and their positives, seeded with epoch 0 too) stay identical across epochs.
The experiments_yaml form (app-dynaclr) keeps validation in order.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from cellfeed.server.kinds.dynaclr.sampler import FlexibleBatchSampler
from cellfeed.server.samplers.base import PlannedBatch, Sampler
from cellfeed.server.samplers.sequential import SequentialSampler

if TYPE_CHECKING:
    from cellfeed.server.kinds.dynaclr.source import DynaCLRSource

VAL_STREAM_KEY = 1  # seeds the validation plan apart from the training one (stream key 0)


class FixedEpochSampler(Sampler):
    """Plans every epoch as `epoch` of `inner`: the same batches each epoch."""

    def __init__(self, inner: Sampler, epoch: int = 0) -> None:
        self.inner = inner
        self.epoch = epoch

    def num_batches(self, world_size: int) -> int:
        return self.inner.num_batches(world_size)

    def plan(self, epoch: int, world_size: int, global_index: int) -> PlannedBatch:
        return self.inner.plan(self.epoch, world_size, global_index)


def validation_sampler(source: "DynaCLRSource", form: str) -> Sampler:
    """The val split's sampler: the training sampler's options over the val items (temporal
    enrichment off, the plan of epoch 0 every epoch) in VisCy main's forms; in order otherwise."""
    items = source.items["val"]
    B = source.config.batch_size
    if form == "experiments_yaml" or len(items) == 0:
        return SequentialSampler(len(items), B)
    sel = source.sel
    group, group_names = sel.codes(items, sel.group_columns)
    stratum, stratum_names = sel.codes(items, sel.stratify_columns)
    options = replace(
        source.options,
        temporal_enrichment=False,
        experiment_weights=_val_group_weights(source, group_names),
        condition_ratio=sel.stratum_ratio(stratum_names),
    )
    hpi = source.index.rows["hpi"][sel.item_row[items]]
    return FixedEpochSampler(FlexibleBatchSampler(group, stratum, hpi, options, stream_key=VAL_STREAM_KEY))


def _val_group_weights(source: "DynaCLRSource", names: list[str]) -> tuple[float, ...] | None:
    """The group weights over the val groups. A group only training has is not an error here (its
    weight is unused); when no val group has a weight, groups weigh by size."""
    config = source.config
    weights = config.group_weights if config.group_weights is not None else config.experiment_weights
    if weights is None:
        return None
    if not source.sel.group_columns:
        return (1.0,)  # batches are not per group: the weights only make sampling weighted, as in training
    picked = tuple(float(weights.get(n, 0.0)) for n in names)
    return picked if np.sum(picked) > 0 else None
