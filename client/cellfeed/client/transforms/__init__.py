"""Batched, device-side transforms for DynaCLR batches (channels as `ch_i` keys of a batch dict).

Each works on a whole batch at once: tensors [B, 1, Z, Y, X] per channel key, statistics [B]
under `norm_meta`. Wrap a per-sample MONAI dictionary transform in `PerSample`.
"""

from cellfeed.client.transforms.channel_dropout import ChannelDropout
from cellfeed.client.transforms.crop import BatchedCenterSpatialCropd
from cellfeed.client.transforms.normalize import NormalizeSampled
from cellfeed.client.transforms.per_sample import PerSample

__all__ = ["BatchedCenterSpatialCropd", "ChannelDropout", "NormalizeSampled", "PerSample"]
