"""cell-load's gene names of a file (its `get_var_names()`), read the way cell-load 0.10.4 reads them.

The names: var/gene_name (categorical or plain), else var/gene_name_index, else var/_index, else
var/feature, else the var index. For output_space="gene" they are filtered by
var/highly_variable, or (names from gene_name only) replaced by uns/hvg_names.
"""

from __future__ import annotations

from typing import Any

import h5py
import numpy as np

from cellfeed.server.reading.h5ad import H5ad


def cell_load_gene_names(h5: H5ad, var_names: list[str]) -> dict[str, Any]:
    """{"names": every gene's name (None: the same as `var_names`, the var index), "hvg": the
    names output_space="gene" gives (None: no filter applies)}."""
    with h5._lock:
        var = h5.file["var"]
        names, from_gene_name = _names(var)
        if names is None:  # var index under another name (cell-load fails here)
            names = [_text(x) for x in var[var.attrs.get("_index", "_index")][()]]
        hvg: list[str] | None = None
        if "highly_variable" in var:
            mask = np.asarray(var["highly_variable"][()]).astype(bool)
            hvg = [n for n, keep in zip(names, mask) if keep]
        elif from_gene_name and "uns" in h5.file and "hvg_names" in h5.file["uns"]:
            hvg = [_text(x) for x in h5.file["uns"]["hvg_names"][()]]
    return {"names": None if names == list(var_names) else names, "hvg": hvg}


def _names(var: h5py.Group) -> tuple[list[str] | None, bool]:
    """The unfiltered names (None: none of cell-load's keys), and whether they came from
    var/gene_name (or gene_name_index)."""
    gene = var.get("gene_name")
    if isinstance(gene, h5py.Group) and "codes" in gene and "categories" in gene:
        categories = gene["categories"][()]
        return [_text(categories[c]) for c in gene["codes"][()]], True
    for key in ("gene_name", "gene_name_index"):
        if isinstance(var.get(key), h5py.Dataset):
            return [_text(x) for x in var[key][()]], True
    for key in ("_index", "feature"):
        if isinstance(var.get(key), h5py.Dataset):
            return [_text(x) for x in var[key][()]], False
    return None, False


def _text(x: Any) -> str:
    return x.decode("utf-8") if isinstance(x, (bytes, bytearray)) else str(x)
