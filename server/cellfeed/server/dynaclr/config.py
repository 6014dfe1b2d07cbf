"""The DynaCLR session config: the client DataModule's server-side arguments, validated.

The contract is docs/protocol/dynaclr.md. Unknown keys are refused, so a typo never silently
falls back to a default.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from cellfeed.server.errors import CellfeedError, parse_model

class DynaCLRConfig(BaseModel):
    """What a client sends to open a DynaCLR session (VisCy's MultiExperimentDataModule arguments
    that shape batches; transforms, dropout and the loss stay on the client)."""

    model_config = ConfigDict(extra="forbid")

    experiments_yaml: str
    z_range: tuple[int, int]
    yx_patch_size: tuple[int, int] = (192, 192)
    val_experiments: list[str] = Field(default_factory=list)
    tau_range: tuple[float, float] = (0.5, 2.0)
    tau_decay_rate: float = Field(2.0, ge=0)
    batch_size: int = Field(128, ge=1)
    experiment_aware: bool = True
    condition_balanced: bool = True
    leaky: float = Field(0.0, ge=0, lt=1)
    temporal_enrichment: bool = False
    temporal_window_hours: float = Field(2.0, ge=0)
    temporal_global_fraction: float = Field(0.3, ge=0, le=1)
    experiment_weights: dict[str, float] | None = None
    condition_ratio: dict[str, float] | None = None
    cache_pool_bytes: int = Field(0, ge=0)
    seed: int = Field(0, ge=0)
    include_wells: list[str] | None = None
    exclude_fovs: list[str] | None = None
    return_index: bool = False

    @classmethod
    def parse(cls, raw: dict[str, Any]) -> "DynaCLRConfig":
        config = parse_model(cls, raw, "dynaclr config")
        z0, z1 = config.z_range
        if not 0 <= z0 < z1:
            raise CellfeedError(f"dynaclr config: z_range {list(config.z_range)} must satisfy 0 <= start < stop")
        if min(config.yx_patch_size) < 2:
            raise CellfeedError(f"dynaclr config: yx_patch_size {list(config.yx_patch_size)} must be at least 2 pixels")
        lo, hi = config.tau_range
        if not 0 <= lo <= hi:
            raise CellfeedError(f"dynaclr config: tau_range {list(config.tau_range)} must satisfy 0 <= min <= max (hours)")
        for name, weights in (("experiment_weights", config.experiment_weights), ("condition_ratio", config.condition_ratio)):
            if weights and any(w < 0 for w in weights.values()):
                raise CellfeedError(f"dynaclr config: {name} has a negative weight")
        return config

    @property
    def patch_yx(self) -> tuple[int, int]:
        """The patch side actually read: 2 * (size // 2), as VisCy does."""
        return (2 * (self.yx_patch_size[0] // 2), 2 * (self.yx_patch_size[1] // 2))
