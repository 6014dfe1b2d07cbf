"""Every column chunk of every parquet file the pipeline writes uses the codec asked for."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from cellfeed.server.preprocess.cli import main
from tests.fixtures.preprocess_h5ad import write_cellxgene_like


def codecs(folder: Path) -> dict[tuple[str, str], set[str]]:
    """(file, column path) -> the codecs of its column chunks, over every parquet file below folder."""
    found: dict[tuple[str, str], set[str]] = {}
    files = sorted(folder.rglob("*.parquet"))
    assert files, folder
    for path in files:
        meta = pq.ParquetFile(path).metadata
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            for c in range(group.num_columns):
                chunk = group.column(c)
                found.setdefault((path.name, chunk.path_in_schema), set()).add(chunk.compression)
    return found


@pytest.mark.parametrize("flags, codec", [([], "ZSTD"), (["--compression", "snappy"], "SNAPPY"), (["--compression", "gzip", "--compression-level", "5"], "GZIP")])
def test_run_all_compresses_every_column_with_the_chosen_codec(tmp_path, flags, codec):
    write_cellxgene_like(tmp_path / "in/a.h5ad", n_cells=400, n_genes=120, seed=3)
    args = ["run-all", str(tmp_path / "in/a.h5ad"), "--chunk-size", "150", "--keep-interim", "--no-progress",
            "--interim-dir", str(tmp_path / "interim"), "--output-dir", str(tmp_path / "out"), "--log-dir", str(tmp_path / "logs"), *flags]
    assert main(args) == 0
    for folder in (tmp_path / "out/a", tmp_path / "interim/parquet_chunks/a"):
        found = codecs(folder)
        columns = {column for _, column in found}
        assert {"obs_names", "age", "cell_sentence", "genes.list.element", "values.list.element"} <= columns
        wrong = {key: got for key, got in found.items() if got != {codec}}
        assert not wrong, wrong


def test_the_step_commands_compress_every_column_too(tmp_path):
    write_cellxgene_like(tmp_path / "in/a.h5ad", n_cells=300, n_genes=100, seed=4)
    dirs = ["--interim-dir", str(tmp_path / "interim"), "--log-dir", str(tmp_path / "logs")]
    assert main(["step2-convert-h5ad", str(tmp_path / "in/a.h5ad"), "--compression", "snappy", "--no-progress", *dirs]) == 0
    assert main(["step3-add-age", "a", *dirs]) == 0
    assert main(["step4-train-test-split", "a", "--compression", "snappy", "--output-dir", str(tmp_path / "out"), *dirs]) == 0
    found = codecs(tmp_path / "out/a")
    assert {"genes.list.element", "values.list.element"} <= {column for _, column in found}
    assert all(got == {"SNAPPY"} for got in found.values()), found
