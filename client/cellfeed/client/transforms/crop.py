"""The final centre crop of every DynaCLR batch: from the read patch to the model's input size.

Patches are read larger than the model needs (yx_patch_size) so augmentations can rotate and
shift without empty borders; this crop brings them to final_yx_patch_size.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


class BatchedCenterSpatialCropd:
    """Centre-crop the last len(roi_size) dimensions of each key's [B, C, *spatial] tensor."""

    def __init__(self, keys: Sequence[str], roi_size: Sequence[int]) -> None:
        self.keys = list(keys)
        self.roi_size = [int(s) for s in roi_size]

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        out = dict(data)
        for key in self.keys:
            out[key] = self.crop(data[key])
        return out

    def crop(self, x: torch.Tensor) -> torch.Tensor:
        spatial = x.shape[-len(self.roi_size) :]
        index: list[slice] = [slice(None)] * (x.dim() - len(self.roi_size))
        for size, roi in zip(spatial, self.roi_size):
            if roi > size:
                raise ValueError(f"crop size {self.roi_size} is larger than the patch {list(spatial)}")
            start = (size - roi) // 2
            index.append(slice(start, start + roi))
        return x[tuple(index)]
