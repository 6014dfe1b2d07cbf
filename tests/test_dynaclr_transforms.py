"""Client-side batched transforms: channel dropout, per-sample normalisation, centre crop, PerSample."""

from __future__ import annotations

import torch
from monai.transforms import RandFlipd

from cellfeed.client.transforms import (
    BatchedCenterSpatialCropd,
    ChannelDropout,
    NormalizeSampled,
    PerSample,
)


def test_channel_dropout_zeroes_listed_channels_only_in_training():
    x = torch.ones(16, 2, 3, 8, 8)
    drop = ChannelDropout(channels=[1], p=1.0)
    out = drop(x)
    assert (out[:, 1] == 0).all() and (out[:, 0] == 1).all()
    assert (x == 1).all()  # input untouched
    drop.eval()
    assert drop(x) is x
    half = ChannelDropout(channels=[0, 1], p=0.5)
    out = half(torch.ones(400, 2, 1, 2, 2), generator=torch.Generator().manual_seed(0))
    zeroed = (out.flatten(2).sum(-1) == 0).float().mean(0)
    assert ((zeroed > 0.4) & (zeroed < 0.6)).all()
    assert ChannelDropout(p=0.0)(x) is x


def test_dropped_channels_are_exactly_zero_even_where_the_input_is_nan_or_inf():
    """A multiplied mask leaves NaN (0 * NaN, 0 * inf) and -0.0; a dropped channel is filled with 0."""
    x = torch.randn(64, 3, 2, 4, 4)
    x[:, 1, 0, 0, 0] = float("nan")
    x[:, 1, 0, 0, 1] = float("inf")
    x[:, 1, 0, 0, 2] = float("-inf")
    x[:, 1, 1] = -1.0  # would be -0.0 under a multiplied mask
    x[:, 2, 0, 0, 0] = float("nan")
    before = x.clone()
    out = ChannelDropout(channels=[1, 2], p=0.5)(x, generator=torch.Generator().manual_seed(3))
    dropped = (out[:, 1] == 0).flatten(1).all(1)
    assert 0 < int(dropped.sum()) < 64  # some samples dropped, some kept
    assert not torch.signbit(out[dropped, 1]).any()  # +0.0, not -0.0
    kept = ~dropped
    torch.testing.assert_close(out[kept, 1], before[kept, 1], equal_nan=True)  # kept: NaN and inf as they were
    dropped2 = ~torch.isnan(out[:, 2, 0, 0, 0])
    assert (out[dropped2, 2] == 0).all() and 0 < int(dropped2.sum()) < 64
    torch.testing.assert_close(out[:, 0], before[:, 0])  # an unlisted channel is never touched
    torch.testing.assert_close(x, before, equal_nan=True)  # the input is not written


def test_normalize_uses_each_samples_statistics():
    x = torch.stack([torch.full((1, 2, 4, 4), 10.0), torch.full((1, 2, 4, 4), 4.0)])
    meta = {"ch_0": {"fov_statistics": {"mean": torch.tensor([8.0, 2.0]), "std": torch.tensor([2.0, 1.0])}}}
    out = NormalizeSampled(["ch_0"], level="fov_statistics")({"ch_0": x, "norm_meta": meta})
    assert torch.allclose(out["ch_0"][0], torch.ones(1, 2, 4, 4)) and torch.allclose(
        out["ch_0"][1], torch.full((1, 2, 4, 4), 2.0)
    )


def test_center_crop_keeps_the_middle():
    x = torch.arange(2 * 1 * 3 * 8 * 8, dtype=torch.float32).view(2, 1, 3, 8, 8)
    out = BatchedCenterSpatialCropd(["a"], (3, 4, 4))({"a": x})["a"]
    assert out.shape == (2, 1, 3, 4, 4)
    assert torch.equal(out, x[:, :, :, 2:6, 2:6])


def test_per_sample_runs_a_monai_transform_on_each_sample():
    x = torch.arange(4 * 1 * 1 * 2 * 2, dtype=torch.float32).view(4, 1, 1, 2, 2)
    flip = PerSample(RandFlipd(keys=["ch_0"], prob=1.0, spatial_axis=2), keys=["ch_0"])
    out = flip({"ch_0": x, "norm_meta": None})
    assert type(out["ch_0"]) is torch.Tensor and out["ch_0"].shape == x.shape
    assert torch.equal(out["ch_0"], torch.flip(x, dims=[4]))
