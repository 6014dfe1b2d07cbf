"""Small helpers the perturbation tests share: read files back, collect an epoch."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from cellfeed.client import PerturbationDataModule


def obs_table(root: Path, names: list[str]) -> pd.DataFrame:
    """obs of the named files, indexed by obs_names, with the file stem as a column."""
    frames = []
    for name in names:
        adata = ad.read_h5ad(root / name, backed="r")
        obs = adata.obs.copy()
        obs["file"] = Path(name).stem
        obs["row"] = np.arange(adata.n_obs)
        frames.append(obs)
    return pd.concat(frames)


def datamodule(server, **kwargs) -> PerturbationDataModule:
    defaults = dict(files=["k562.h5ad", "rpe1.h5ad"], group_size_S=4, batch_size=8, barcodes=True, num_workers=2)
    defaults.update(kwargs)
    dm = PerturbationDataModule(server=server.flight_uri, token=server.token, **defaults)
    dm.setup("fit")
    return dm


def epoch(loader, epoch: int | None = None) -> list[dict]:
    if epoch is not None:
        loader.set_epoch(epoch)
    return list(loader)


def barcodes(batches: list[dict], key: str = "pert_cell_barcode") -> np.ndarray:
    return np.concatenate([b[key].ravel() for b in batches])
