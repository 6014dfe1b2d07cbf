"""TableDataModule: batches of rows from a preprocessed parquet dataset, served by cellfeed.

The dataset is a server-side folder (output/<name> of `cellfeed preprocess`). Each batch is a
dict keyed by column: numbers as tensors, strings as numpy str arrays, numeric lists (the
`values` of a cell sentence) as one flat tensor plus `<name>_offsets` [B+1], string lists (the
`genes`) as lists of str. The training split is shuffled (seeded, new order each epoch) and
dealt to DDP ranks in equal shares, as in the perturbation stream.
"""

from __future__ import annotations

import warnings
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pyarrow as pa
import torch

from cellfeed.client.connection import Connection, Session
from cellfeed.client.distributed import resolve_rank
from cellfeed.client.loader import RemoteLoader

# Arrow buffers are read-only; the tensors built on them are never written in place.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable", module="cellfeed")


def _numbers(column: pa.Array) -> torch.Tensor:
    if column.null_count:
        column = column.cast(pa.float64()).fill_null(float("nan")) if not pa.types.is_floating(column.type) else column.fill_null(float("nan"))
    return torch.from_numpy(column.to_numpy(zero_copy_only=False))


def decode_table_batch(rb: pa.RecordBatch) -> dict[str, Any]:
    """One record batch of the table stream as a dict of tensors and arrays (see module doc)."""
    out: dict[str, Any] = {}
    for name, column in zip(rb.schema.names, rb.columns):
        kind = column.type
        if pa.types.is_dictionary(kind):
            column, kind = column.dictionary_decode(), kind.value_type
        if pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind):
            out[name] = _numbers(column)
        elif pa.types.is_string(kind) or pa.types.is_large_string(kind):
            out[name] = np.asarray(column.to_numpy(zero_copy_only=False), dtype=str)
        elif pa.types.is_list(kind) or pa.types.is_large_list(kind):
            inner = kind.value_type
            if pa.types.is_integer(inner) or pa.types.is_floating(inner) or pa.types.is_boolean(inner):
                offsets = column.offsets.to_numpy()
                values = column.values.slice(int(offsets[0]), int(offsets[-1] - offsets[0]))
                out[name] = _numbers(values)
                out[f"{name}_offsets"] = torch.from_numpy((offsets - offsets[0]).astype(np.int64))
            else:
                out[name] = column.to_pylist()
        else:
            out[name] = column.to_pylist()
    return out


class TableDataModule(pl.LightningDataModule):
    """Rows of `dataset` (server-side) for training: train split shuffled, test split in order."""

    def __init__(
        self,
        server: str,
        dataset: str,
        split: str | None = None,
        columns: list[str] | None = None,
        batch_size: int = 64,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
        num_workers: int = 1,
        prefetch_factor: int = 2,
        window: int = 4,
        token: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["token"])
        self.token = token
        self.session: Session | None = None
        self._connection: Connection | None = None
        self._loaders: dict[str, RemoteLoader] = {}
        self._pending_state: dict[str, Any] | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.session is None:
            hp = self.hparams
            config = {
                "dataset": hp.dataset, "split": hp.split, "columns": hp.columns, "batch_size": hp.batch_size,
                "shuffle": hp.shuffle, "seed": hp.seed, "drop_last": hp.drop_last, "window": hp.window,
            }
            self._connection = Connection(hp.server, self.token)
            self.session = self._connection.open_session("table", config)
        self.rank, self.world_size = resolve_rank(self.trainer, self.hparams.rank, self.hparams.world_size)

    @property
    def info(self) -> dict[str, Any]:
        if self.session is None:
            raise RuntimeError("call setup() first: the dataset's facts come from the server")
        return self.session.info

    @property
    def train_split(self) -> str:
        return self.info["train_split"]

    def loader(self, split: str) -> RemoteLoader:
        """The loader of one split, created once and kept."""
        if split not in self._loaders:
            if self.session is None or self._connection is None:
                raise RuntimeError("call setup() before asking for a dataloader")
            loader = RemoteLoader(
                self._connection, self.session, split, decode_table_batch,
                rank=self.rank, world_size=self.world_size, num_streams=max(1, self.hparams.num_workers),
                prefetch=self.hparams.prefetch_factor, fixed_epoch=split != self.train_split,
            )
            if self._pending_state and split in self._pending_state:
                loader.load_state_dict(self._pending_state.pop(split))
            self._loaders[split] = loader
        return self._loaders[split]

    def train_dataloader(self) -> RemoteLoader:
        return self.loader(self.train_split)

    def val_dataloader(self) -> RemoteLoader | list:
        return self._held_out()

    def test_dataloader(self) -> RemoteLoader | list:
        return self._held_out()

    def predict_dataloader(self) -> RemoteLoader | list:
        return self._held_out()

    def _held_out(self) -> RemoteLoader | list:
        others = [s for s in self.info["splits"] if s != self.train_split]
        return self.loader(others[0]) if others else []

    def state_dict(self) -> dict[str, Any]:
        return {split: loader.state_dict() for split, loader in self._loaders.items() if split == self.train_split}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending_state = dict(state_dict)
        for split, loader in self._loaders.items():
            if split in self._pending_state:
                loader.load_state_dict(self._pending_state.pop(split))
