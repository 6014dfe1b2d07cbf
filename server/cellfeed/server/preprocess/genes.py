"""Gene symbols for var: `var.feature_name` first, else Ensembl IDs looked up in an offline table.

The table is the GENCODE one shipped in data/genes.parquet (what CELLxGENE uses), or a gene table
made by `step1-hgnc-mapper` from a user's HGNC complete set. Nothing is ever downloaded.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as csv
import pyarrow.parquet as pq

from cellfeed.server.errors import CellfeedError

SHIPPED = Path(__file__).parent / "data" / "genes.parquet"
ENSEMBL_ID = re.compile(r"^ENS[A-Z]*G\d{6,}(\.\d+)?$")
HGNC_ID_COLUMNS = ("ensembl_gene_id", "Ensembl gene ID", "Ensembl ID(supplied by Ensembl)")
HGNC_SYMBOL_COLUMNS = ("symbol", "Approved symbol")


def is_ensembl(name: str) -> bool:
    return bool(ENSEMBL_ID.match(name))


def strip_version(gene_id: str) -> str:
    """ENSG00000141510.17 -> ENSG00000141510."""
    return gene_id.split(".", 1)[0]


class GeneTable:
    """Ensembl gene ID (without version) -> symbol."""

    def __init__(self, table: pa.Table, source: str) -> None:
        self.source = source
        self.table = table.select(["id", "symbol"])
        self._map = dict(zip(self.table["id"].to_pylist(), self.table["symbol"].to_pylist()))

    def __len__(self) -> int:
        return len(self._map)

    def get(self, gene_id: str) -> str | None:
        return self._map.get(strip_version(gene_id))

    @classmethod
    def shipped(cls) -> "GeneTable":
        return _shipped()

    @classmethod
    def load(cls, path: Path) -> "GeneTable":
        """A gene table written by `write` (parquet) or an HGNC complete set (tab-separated)."""
        path = Path(path)
        if not path.is_file():
            raise CellfeedError(f"gene table not found: {str(path)!r}")
        if path.suffix == ".parquet":
            try:
                table = pq.read_table(path, columns=["id", "symbol"])
            except (pa.ArrowInvalid, KeyError, OSError) as exc:
                raise CellfeedError(f"{path.name}: not a gene table (parquet with id and symbol columns): {exc}") from None
            return cls(table, str(path))
        return cls(_read_hgnc(path), str(path))

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        pq.write_table(self.table, tmp, compression="zstd")
        tmp.replace(path)


@functools.cache
def _shipped() -> GeneTable:
    return GeneTable(pq.read_table(SHIPPED), f"GENCODE (shipped: {SHIPPED.name})")


def _read_hgnc(path: Path) -> pa.Table:
    """The Ensembl ID and approved symbol columns of an HGNC complete set (current or legacy header)."""
    with open(path, encoding="utf-8", errors="replace") as fh:
        header = fh.readline().rstrip("\n").split("\t")
    id_col = next((c for c in HGNC_ID_COLUMNS if c in header), None)
    symbol_col = next((c for c in HGNC_SYMBOL_COLUMNS if c in header), None)
    if id_col is None or symbol_col is None:
        raise CellfeedError(
            f"{path.name}: not an HGNC complete set: needs columns {HGNC_ID_COLUMNS[0]!r} and "
            f"{HGNC_SYMBOL_COLUMNS[0]!r} (tab-separated); found {', '.join(header[:8])}..."
        )
    table = csv.read_csv(
        path,
        parse_options=csv.ParseOptions(delimiter="\t", quote_char=False),
        convert_options=csv.ConvertOptions(
            include_columns=[id_col, symbol_col], column_types={id_col: pa.string(), symbol_col: pa.string()}
        ),
    )
    ids = table[id_col].to_pylist()
    symbols = table[symbol_col].to_pylist()
    pairs = {strip_version(i): s for i, s in zip(ids, symbols) if i and s}
    return pa.table({"id": list(pairs), "symbol": list(pairs.values())})


@dataclass
class GeneSymbols:
    """The symbol of each var (None where there is none) and where the symbols came from."""

    symbols: list[str | None]
    source: str
    unmapped_examples: list[str] = field(default_factory=list)

    @property
    def mapped(self) -> np.ndarray:
        return np.fromiter((s is not None for s in self.symbols), dtype=bool, count=len(self.symbols))

    @property
    def n_mapped(self) -> int:
        return int(self.mapped.sum())

    def arrow(self) -> pa.StringArray:
        """Symbols as an Arrow array indexed by var position ("" where unmapped, never emitted)."""
        return pa.array([s or "" for s in self.symbols], type=pa.string())


def resolve_symbols(var_names: list[str], feature_names: list[str] | None, table: GeneTable, label: str) -> GeneSymbols:
    """One symbol per var: feature_name when it is a symbol, else the table's symbol for an Ensembl
    var_name, else the var_name itself when it is not an Ensembl ID (it is a symbol already)."""
    symbols: list[str | None] = []
    unmapped: list[str] = []
    used_feature = used_table = 0
    for i, name in enumerate(var_names):
        feature = feature_names[i] if feature_names is not None else None
        if feature and feature != "nan" and not is_ensembl(feature):
            symbols.append(feature)
            used_feature += 1
        elif is_ensembl(name):
            symbol = table.get(name)
            symbols.append(symbol)
            if symbol is None:
                unmapped.append(name)
            else:
                used_table += 1
        elif name:
            symbols.append(name)
        else:
            symbols.append(None)
            unmapped.append(repr(name))
    if len(unmapped) == len(var_names):
        raise CellfeedError(
            f"{label}: none of the {len(var_names)} var_names maps to a gene symbol (e.g. "
            f"{', '.join(unmapped[:3])}) in {table.source}; add var.feature_name or pass a HGNC complete "
            "set with --hgnc-file"
        )
    source = "var.feature_name" if used_feature else (table.source if used_table else "var_names")
    return GeneSymbols(symbols=symbols, source=source, unmapped_examples=unmapped[:10])
