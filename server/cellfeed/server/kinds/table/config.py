"""The session config of a table stream: which dataset, split and columns, and how batches are cut."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class TableConfig(BaseModel):
    """The session config of a table stream."""

    model_config = ConfigDict(extra="forbid")

    dataset: str | list[str] = Field(
        description="folder inside the data root: output/<name> of the pipeline, a folder of parquet files, "
        "a batch-mode output folder (its datasets stream as one), or a list of dataset folders"
    )
    train_split: str | None = Field(None, description="the training split, shuffled (default: train, else the only split)")
    split: str | None = Field(None, description="deprecated alias of train_split")
    columns: list[str] | None = Field(None, min_length=1, description="columns to stream (default: all)")
    batch_size: int = Field(64, ge=1)
    shuffle: bool = True
    seed: int = Field(0, ge=0)
    drop_last: bool = Field(False, description="drop the training split's last partial batches instead of padding")
    window: int = Field(4, ge=1, description="row groups whose rows are shuffled together")

    @model_validator(mode="after")
    def _alias(self) -> "TableConfig":
        if self.split is not None:
            if self.train_split is not None and self.train_split != self.split:
                raise ValueError(f"train_split {self.train_split!r} and its deprecated alias split {self.split!r} disagree; give train_split only")
            self.train_split, self.split = self.split, None
        if isinstance(self.dataset, list) and not self.dataset:
            raise ValueError("dataset: an empty list names no dataset")
        return self
