"""ChannelDropout: zero whole channels of some samples, so the model cannot lean on one reporter.

A module like VisCy's, but the DataModule applies it only while the trainer is training, never
to validation or prediction batches (VisCy's also ran on validation).
"""

from __future__ import annotations

import torch
from torch import nn


class ChannelDropout(nn.Module):
    """For each listed channel, zero it in each sample independently with probability p."""

    def __init__(self, channels: list[int] | None = None, p: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"channel dropout probability {p} is not in [0, 1]")
        self.channels = list(channels) if channels is not None else [1]
        self.p = float(p)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """x: [B, C, ...]; returns a new tensor (the input is never written).

        A dropped channel is exactly 0, whatever it held (NaN and inf included): it is filled,
        not multiplied by a mask.
        """
        if not self.training or self.p == 0.0 or not self.channels:
            return x
        if max(self.channels) >= x.shape[1]:
            raise ValueError(f"channel dropout names channel {max(self.channels)} but batches have {x.shape[1]} channels")
        keep = torch.rand((x.shape[0], len(self.channels)), generator=generator, device=x.device) >= self.p
        out = x.clone()
        shape = (x.shape[0],) + (1,) * (x.dim() - 2)
        for j, c in enumerate(self.channels):
            out[:, c].masked_fill_(~keep[:, j].view(shape), 0)
        return out
