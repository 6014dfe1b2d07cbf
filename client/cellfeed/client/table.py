"""TableDataModule: batches of rows from a preprocessed parquet dataset, served by cellfeed.

The dataset is a server-side folder (output/<name> of `cellfeed preprocess`, or a batch-mode
output folder / a list of dataset folders, streamed as one with a `dataset_name` column). Each
batch is a dict keyed by column: numbers as tensors (float64 with NaN where the schema declares
the column nullable), strings as numpy str arrays (object arrays with None where nullable),
numeric lists (the `values` of a cell sentence) as one flat tensor plus `<name>_offsets` [B+1],
string lists (the `genes`) as lists of str, and `padding` (torch.bool [B]): true for a row
repeated only to even out the ranks' shares. The training split (`train_split`) is shuffled
(seeded, new order each epoch) and dealt to DDP ranks in equal shares, as in the perturbation
stream.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from cellfeed.client.datamodule import RemoteDataModule, ServerAddress
from cellfeed.client.loader import RemoteLoader
from cellfeed.wire import csr
from cellfeed.wire import table as wire



def _numbers(column: pa.Array, nullable: bool = False) -> torch.Tensor:
    """A numeric column as a tensor; a nullable one (as declared by the schema, whatever this
    batch holds) always as float64 with NaN for null, so its dtype is the same in every batch."""
    if nullable:
        if not pa.types.is_floating(column.type):
            column = column.cast(pa.float64())
        column = column.fill_null(float("nan")) if column.null_count else column
    elif column.null_count:  # undeclared nulls (a schema that does not say): NaN, as before
        column = column.cast(pa.float64()).fill_null(float("nan")) if not pa.types.is_floating(column.type) else column.fill_null(float("nan"))
    return torch.from_numpy(column.to_numpy(zero_copy_only=False))


def _strings(column: pa.Array, nullable: bool) -> np.ndarray:
    """A string column as numpy: `str` when the schema declares it never null, else `object`
    with None for null (never the text 'None')."""
    if not nullable and not column.null_count:
        return np.asarray(column.to_numpy(zero_copy_only=False), dtype=str)
    return np.array(column.to_pylist(), dtype=object)


def decode_table_batch(rb: pa.RecordBatch) -> dict[str, Any]:
    """One record batch of the table stream as a dict of tensors and arrays (see module doc).

    Dtypes follow the declared schema (the same every batch): a field declared nullable decodes
    the nullable way even in a batch without a null."""
    out: dict[str, Any] = {}
    for field, column in zip(rb.schema, rb.columns):
        name, kind, nullable = field.name, field.type, field.nullable
        if pa.types.is_dictionary(kind):
            column, kind = column.dictionary_decode(), kind.value_type
        if pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind):
            out[name] = _numbers(column, nullable)
        elif pa.types.is_string(kind) or pa.types.is_large_string(kind):
            out[name] = _strings(column, nullable)
        elif pa.types.is_list(kind) or pa.types.is_large_list(kind):
            inner = kind.value_type
            if pa.types.is_integer(inner) or pa.types.is_floating(inner) or pa.types.is_boolean(inner):
                offsets = column.offsets.to_numpy()
                csr.check_offsets(offsets, len(column.values), f"table batch column {name!r}")
                values = column.values.slice(int(offsets[0]), int(offsets[-1] - offsets[0]))
                out[name] = _numbers(values)
                out[f"{name}_offsets"] = torch.from_numpy((offsets - offsets[0]).astype(np.int64))
            else:
                out[name] = column.to_pylist()
        else:
            out[name] = column.to_pylist()
    return out


class TableDataModule(RemoteDataModule):
    """Rows of `dataset` (server-side) for training: train split shuffled, test split in order."""

    kind = wire.KIND

    def __init__(
        self,
        server: ServerAddress = None,
        dataset: str | list[str] | None = None,
        train_split: str | None = None,
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
        tls_root_certs: str | None = None,
        tls_cert_chain: str | None = None,
        tls_private_key: str | None = None,
        connect_timeout: float | None = None, retry_seconds: float | None = None,
        split: str | None = None,
    ) -> None:
        """Rows of a preprocessed parquet dataset; no I/O until setup().

        Args:
            server: Flight address of the cellfeed server, or several replicas (a list, or a
                comma-separated string); None: $CELLFEED_SERVER, else grpc://127.0.0.1:8815.
            dataset: server-side folder (inside its --data-root) of a `cellfeed preprocess` output
                (output/<name>), or a list of them streamed as one (with `dataset_name`).
            train_split: the training split (shuffled, streamed by train_dataloader); the other
                split streams in order from the val/test/predict loaders. None: "train", else the only split.
            columns: columns to stream (None: all of them).
            batch_size: rows per batch.
            shuffle: shuffle the training split (seeded, a new order each epoch).
            seed: the shuffle's seed.
            drop_last: drop each epoch's last, short batch.
            rank: this process's DDP rank; None: from the trainer or torch.distributed.
            world_size: DDP world size; None: from the trainer or torch.distributed.
            num_workers: parallel Flight streams per loader, read in threads (no forked workers).
            prefetch_factor: decoded batches queued per stream.
            window: row groups whose rows are shuffled together (larger: more random, less
                contiguous reads).
            token: bearer token, when the server has one; None: $CELLFEED_TOKEN. Never saved.
            tls_root_certs: PEM file of the root certificates that sign a TLS server's (grpc+tls://);
                None: $CELLFEED_TLS_ROOT_CERTS, else the system's.
            tls_cert_chain: PEM client certificate, for a server that requires one (mutual TLS);
                None: $CELLFEED_TLS_CERT_CHAIN.
            tls_private_key: PEM key of tls_cert_chain; None: $CELLFEED_TLS_PRIVATE_KEY.
            connect_timeout: seconds the first setup() gives the server to answer before it fails,
                saying why; None: $CELLFEED_CONNECT_TIMEOUT, else 5.
            retry_seconds: retry budget once connected (mid-epoch reconnection); None:
                $CELLFEED_RETRY_SECONDS, else 60.
            split: deprecated old name of `train_split` (it never chose the split to stream); warns.
        """
        super().__init__(token)
        if dataset is None:
            raise ValueError("TableDataModule: give `dataset`, the server-side folder of a preprocessed dataset (output/<name>)")
        if split is not None:
            warnings.warn(
                "TableDataModule(split=...) is deprecated: it names the training split, not the split to stream; use train_split=...",
                FutureWarning, stacklevel=2,
            )
            if train_split is not None and train_split != split:
                raise ValueError(f"TableDataModule: train_split={train_split!r} and its deprecated alias split={split!r} disagree; give train_split only")
        self.save_hyperparameters(ignore=["token", "split"])
        if split is not None:
            self.hparams.train_split = split
        self.decoder = decode_table_batch

    def session_config(self) -> dict[str, Any]:
        hp = self.hparams
        return {
            "dataset": hp.dataset, "train_split": hp.train_split, "columns": hp.columns, "batch_size": hp.batch_size,
            "shuffle": hp.shuffle, "seed": hp.seed, "drop_last": hp.drop_last, "window": hp.window,
        }

    @property
    def train_split(self) -> str:
        return self.info["train_split"]

    def val_dataloader(self) -> RemoteLoader | list:
        return self._held_out()

    def test_dataloader(self) -> RemoteLoader | list:
        return self._held_out()

    def predict_dataloader(self) -> RemoteLoader | list:
        return self._held_out()

    def _held_out(self) -> RemoteLoader | list:
        others = [s for s in self.info["splits"] if s != self.train_split]
        return self.loader(others[0]) if others else []
