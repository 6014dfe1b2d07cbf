"""The DynaCLR session config: the client DataModule's server-side arguments, validated.

The contract is docs/protocol/dynaclr.md. Unknown keys are refused, so a typo never silently
falls back to a default.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from cellfeed.server.errors import CellfeedError, parse_model

class DynaCLRConfig(BaseModel):
    """What a client sends to open a DynaCLR session (VisCy's MultiExperimentDataModule arguments
    that shape batches; transforms, dropout and the loss stay on the client)."""

    model_config = ConfigDict(extra="forbid")

    # Exactly one input: the experiments YAML (VisCy app-dynaclr), a collection YAML or a
    # cell index parquet (VisCy main). All three become one registry and one index.
    experiments_yaml: str | None = None
    collection_yaml: str | None = None
    cell_index_path: str | None = None
    # Z: a fixed z_range for every experiment, or a window around each plate's focus slice.
    z_range: tuple[int, int] | None = None
    z_window: int | None = Field(None, ge=1)
    z_extraction_window: int | None = Field(None, ge=1)
    z_focus_offset: float = Field(0.5, ge=0, le=1)
    focus_channel: str | None = None
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
    # VisCy main's arguments (docs/protocol/dynaclr.md, "VisCy main form").
    max_border_shift: int | None = Field(None, ge=-1)  # None: clamp every border cell (app-dynaclr)
    reference_pixel_size_xy_um: float | None = Field(None, gt=0)
    reference_pixel_size_z_um: float | None = Field(None, gt=0)
    split_ratio: float = Field(1.0, gt=0, le=1)
    batch_group_by: list[str] | None = None  # overrides experiment_aware when given ([]: no grouping)
    stratify_by: list[str] | None = None  # overrides condition_balanced when given ([]: none)
    group_weights: dict[str, float] | None = None
    channels_per_sample: int | list[str] | None = None
    positive_cell_source: Literal["lookup", "lineage", "self"] = "lookup"
    positive_match_columns: list[str] | None = None
    positive_channel_source: Literal["same", "any"] = "same"
    label_columns: dict[str, str] | None = None
    return_meta: bool = False

    @classmethod
    def parse(cls, raw: dict[str, Any]) -> "DynaCLRConfig":
        config = parse_model(cls, raw, "dynaclr config")
        given = [k for k in ("experiments_yaml", "collection_yaml", "cell_index_path") if getattr(config, k)]
        if len(given) != 1:
            raise CellfeedError(
                "dynaclr config: give exactly one of experiments_yaml, collection_yaml, cell_index_path"
                + (f" (got {', '.join(given)})" if given else "")
            )
        if (config.z_range is None) == (config.z_window is None):
            raise CellfeedError("dynaclr config: give either z_range or z_window (a window around the focus slice)")
        if config.z_range is not None:
            z0, z1 = config.z_range
            if not 0 <= z0 < z1:
                raise CellfeedError(f"dynaclr config: z_range {list(config.z_range)} must satisfy 0 <= start < stop")
        elif config.z_extraction_window is not None and config.z_extraction_window < config.z_window:
            raise CellfeedError(
                f"dynaclr config: z_extraction_window {config.z_extraction_window} is smaller than z_window {config.z_window}"
            )
        cps = config.channels_per_sample
        if isinstance(cps, int) and cps != 1:
            raise CellfeedError(f"dynaclr config: channels_per_sample as a number must be 1 (got {cps}); list channels to read several")
        if isinstance(cps, list) and not cps:
            raise CellfeedError("dynaclr config: channels_per_sample is an empty list")
        if config.positive_match_columns is not None and not config.positive_match_columns:
            raise CellfeedError("dynaclr config: positive_match_columns is empty")
        if min(config.yx_patch_size) < 2:
            raise CellfeedError(f"dynaclr config: yx_patch_size {list(config.yx_patch_size)} must be at least 2 pixels")
        lo, hi = config.tau_range
        if not 0 <= lo <= hi:
            raise CellfeedError(f"dynaclr config: tau_range {list(config.tau_range)} must satisfy 0 <= min <= max (hours)")
        for name, weights in (
            ("experiment_weights", config.experiment_weights),
            ("condition_ratio", config.condition_ratio),
            ("group_weights", config.group_weights),
        ):
            if weights and any(w < 0 for w in weights.values()):
                raise CellfeedError(f"dynaclr config: {name} has a negative weight")
        return config

    @property
    def z_count(self) -> int:
        """Z slices in every patch: z_range's length, or the extraction window."""
        if self.z_range is not None:
            return self.z_range[1] - self.z_range[0]
        return int(self.z_extraction_window or self.z_window)

    @property
    def temporal_positives(self) -> bool:
        """Positives are the same lineage tau frames later (VisCy's default lookup)."""
        if self.positive_cell_source == "self":
            return False
        return self.positive_match_columns is None or "lineage_id" in self.positive_match_columns

    @property
    def patch_yx(self) -> tuple[int, int]:
        """The patch side actually read: 2 * (size // 2), as VisCy does."""
        return (2 * (self.yx_patch_size[0] // 2), 2 * (self.yx_patch_size[1] // 2))
