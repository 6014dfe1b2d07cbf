"""PerSample: run a per-sample MONAI dictionary transform over a batch dict, one sample at a time.

MONAI's spatial transforms read dim 0 as the channel; on a [B, 1, Z, Y, X] batch they would mix
samples. This slices each sample out, applies the transform with its own random draw, and stacks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch


class PerSample:
    """Apply `transform` to {key: x[i]} for each sample i and stack the results back."""

    def __init__(self, transform: Callable[[dict[str, Any]], dict[str, Any]], keys: Sequence[str]) -> None:
        self.transform = transform
        self.keys = list(keys)

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        batch = data[self.keys[0]].shape[0]
        results = [self.transform({k: data[k][i] for k in self.keys}) for i in range(batch)]
        out = dict(data)
        for key in self.keys:
            out[key] = torch.stack([_plain(r[key]) for r in results])
        return out


def _plain(x: Any) -> torch.Tensor:
    """MONAI returns MetaTensors; the batch keeps plain tensors."""
    return x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)
