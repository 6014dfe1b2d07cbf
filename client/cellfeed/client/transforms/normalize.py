"""NormalizeSampled: (x - statistic) / statistic per sample, from the plate's normalization metadata.

The statistics travel with every batch (dataset, FOV and timepoint levels, `viscy preprocess`
names), so each sample is normalised by its own FOV or timepoint, on the device.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class NormalizeSampled:
    """Normalise each key by `norm_meta[key][level][subtrahend]` and `...[divisor]`, per sample."""

    def __init__(
        self,
        keys: Sequence[str],
        level: str = "fov_statistics",
        subtrahend: str = "mean",
        divisor: str = "std",
        eps: float = 1e-8,
    ) -> None:
        self.keys = list(keys)
        self.level = level
        self.subtrahend = subtrahend
        self.divisor = divisor
        self.eps = eps

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        meta = data.get("norm_meta")
        if meta is None:
            raise KeyError("NormalizeSampled needs 'norm_meta' in the batch (the server sends it with every batch)")
        out = dict(data)
        for key in self.keys:
            stats = meta[key][self.level]
            x = data[key]
            shape = (x.shape[0],) + (1,) * (x.dim() - 1)
            sub = stats[self.subtrahend].to(x.dtype).view(shape)
            div = stats[self.divisor].to(x.dtype).view(shape)
            out[key] = (x - sub) / (div + self.eps)
        return out
