"""`cellfeed preprocess` end to end on real h5ad files, checked against values computed here."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cellfeed.server.preprocess.cli import main
from cellfeed.server.preprocess.upload import upload_dataset
from tests.fixtures.preprocess_h5ad import (
    AGE_OF_LABEL,
    GENES,
    write_cellxgene_like,
    write_dense,
    write_empty,
    write_not_h5ad,
    write_real_matrix,
    write_truncated,
    write_unknown_genes,
    write_without_stage,
)


def dirs(root: Path) -> list[str]:
    return ["--interim-dir", str(root / "interim"), "--output-dir", str(root / "output"), "--log-dir", str(root / "logs"), "--no-progress"]


def symbols_of(adata) -> list[str | None]:
    """Independently: feature_name when present, else the GENCODE table by unversioned ID."""
    if "feature_name" in adata.var:
        return [str(s) for s in adata.var["feature_name"]]
    ids = pq.read_table(GENES).to_pydict()
    lookup = dict(zip(ids["id"], ids["symbol"]))
    ensembl = re.compile(r"ENS[A-Z]*G[0-9]+")  # ENSA (a symbol) is not an Ensembl ID
    return [lookup.get(name.split(".")[0], None if ensembl.match(name) else name) for name in adata.var_names]


def expected_sentences(adata, top_n: int) -> dict[str, tuple[list[str], list[float]]]:
    symbols = symbols_of(adata)
    dense = adata.X.toarray()
    out = {}
    for name, row in zip(adata.obs_names, dense):
        genes = [j for j in range(len(row)) if row[j] > 0 and symbols[j] is not None]
        genes = sorted(genes, key=lambda j: (-row[j], j))[:top_n]
        out[name] = ([symbols[j] for j in genes], [float(row[j]) for j in genes])
    return out


def read_dataset(folder: Path) -> dict[str, pa.Table]:
    """Every split's chunks, concatenated in chunk order."""
    found = {}
    for split in ("train", "test", "all"):
        chunks = folder / split / "chunks" if split != "all" else folder / "chunks"
        files = sorted(chunks.glob("chunk_*.parquet")) if chunks.is_dir() else []
        if chunks.is_dir():
            found[split] = pa.concat_tables([pq.read_table(f) for f in files]) if files else None
    return found


def check_dataset(folder: Path, adata, *, top_n: int = 2000, chunk_size: int = 10_000) -> dict[str, pa.Table]:
    """Every row against the input: obs kept, sentence, genes, values, age, split by donor."""
    splits = read_dataset(folder)
    assert set(splits) == {"train", "test"}
    want = expected_sentences(adata, top_n)
    obs = adata.obs
    kept = [n for n in adata.obs_names if AGE_OF_LABEL.get(obs.loc[n, "development_stage"]) is not None]
    seen = []
    for split, table in splits.items():
        assert table is not None and table.num_rows > 0
        files = sorted((folder / split / "chunks").glob("chunk_*.parquet"))
        assert [pq.ParquetFile(f).metadata.num_rows for f in files[:-1]] == [chunk_size] * (len(files) - 1)
        rows = table.to_pylist()
        names = [r["obs_names"] for r in rows]
        assert names == sorted(names, key=list(adata.obs_names).index)  # file order kept
        for r in rows:
            name = r["obs_names"]
            genes, values = want[name]
            assert r["genes"] == genes and r["cell_sentence"] == " ".join(genes)
            assert r["values"] == pytest.approx(values)
            assert r["age"] == pytest.approx(AGE_OF_LABEL[obs.loc[name, "development_stage"]])
            for column in obs.columns:
                expected = obs.loc[name, column]
                assert r[column] == (pytest.approx(expected) if isinstance(expected, float) else str(expected))
        seen += names
    assert sorted(seen) == sorted(kept)  # no cell lost or repeated; null ages dropped
    train_donors = set(splits["train"].column("donor_id").to_pylist())
    test_donors = set(splits["test"].column("donor_id").to_pylist())
    assert train_donors and test_donors and not train_donors & test_donors
    return splits


def test_run_all_batch_mode_isolates_bad_files(tmp_path):
    inputs = tmp_path / "input"
    good = write_cellxgene_like(inputs / "good one.h5ad", n_cells=600, seed=1)
    second = write_cellxgene_like(inputs / "second@file.h5ad", n_cells=300, n_donors=6, seed=2, feature_name=False, gene_offset=50)
    write_not_h5ad(inputs / "not_h5ad.h5ad")
    write_empty(inputs / "empty.h5ad")
    write_truncated(inputs / "truncated.h5ad", inputs / "good one.h5ad")
    write_dense(inputs / "dense.h5ad")
    write_without_stage(inputs / "no_stage.h5ad")
    write_unknown_genes(inputs / "unknown_genes.h5ad")

    status = main(["run-all", str(inputs), "--batch-mode", "--chunk-size", "100", "--top-genes", "25", *dirs(tmp_path)])
    assert status == 1

    out = tmp_path / "output"
    check_dataset(out / "good_one", good, top_n=25, chunk_size=100)
    check_dataset(out / "second_file", second, top_n=25, chunk_size=100)
    with open(out / "batch_processing_summary.tsv") as fh:
        rows = {r["dataset_name"]: r for r in csv.DictReader(fh, delimiter="\t")}
    assert {n: r["status"] for n, r in rows.items()} == {
        "good_one": "SUCCESS", "second_file": "SUCCESS", "not_h5ad": "FAILED", "empty": "FAILED",
        "truncated": "FAILED", "dense": "FAILED", "no_stage": "FAILED", "unknown_genes": "FAILED",
    }
    messages = {n: r["message"] for n, r in rows.items()}
    assert "not an HDF5/h5ad file" in messages["not_h5ad"]
    assert "empty" in messages["empty"]
    assert "truncated" in messages["truncated"] or "not an HDF5" in messages["truncated"]
    assert "dense" in messages["dense"]
    assert "'development_stage'" in messages["no_stage"]
    assert "none of the 40 var_names maps" in messages["unknown_genes"]
    assert json.loads((out / "batch_processing_summary.json").read_text())[0]["dataset"] in rows
    # failed files leave nothing behind: no output folder, no hidden staging folder
    assert sorted(p.name for p in out.iterdir()) == ["batch_processing_summary.json", "batch_processing_summary.tsv", "good_one", "second_file"]
    assert not (tmp_path / "interim").exists()
    # logs: one folder per file, JSON lines and readable text, no event of one file in another's log
    events = [json.loads(line) for line in (tmp_path / "logs/good_one/pipeline.json").read_text().splitlines()]
    assert {e["dataset"] for e in events} == {"good_one"}
    assert [e["event"] for e in events][-1] == "file.finished"
    age = next(e for e in events if e["event"] == "age.extracted")
    assert age["cells"] == 600 and age["null"] == sum(AGE_OF_LABEL[s] is None for s in good.obs["development_stage"])
    assert "good_one file.finished status=SUCCESS" in (tmp_path / "logs/good_one/pipeline.log").read_text()
    failed = (tmp_path / "logs/dense/pipeline.log").read_text()
    assert "file.failed" in failed and "good_one" not in failed


def test_steps_one_to_four_give_the_run_all_result(tmp_path):
    src = write_cellxgene_like(tmp_path / "in/steps.h5ad", n_cells=400, seed=3)
    common = dirs(tmp_path / "stepwise")
    assert main(["step1-hgnc-mapper", "--interim-dir", str(tmp_path / "stepwise/interim")]) == 0
    assert (tmp_path / "stepwise/interim/gene_symbols.parquet").exists()
    assert main(["step2-convert-h5ad", str(tmp_path / "in/steps.h5ad"), *[a for a in common if a != "--output-dir" and "output" not in a]]) == 0
    interim = pq.read_table(tmp_path / "stepwise/interim/parquet_chunks/steps/chunks/chunk_0000.parquet")
    assert "age" not in interim.column_names and interim.num_rows == 400
    assert main(["step3-add-age", "--interim-dir", str(tmp_path / "stepwise/interim")]) == 0
    with_age = pq.read_table(tmp_path / "stepwise/interim/parquet_chunks/steps/chunks/chunk_0000.parquet")
    assert with_age.column_names.index("age") == with_age.column_names.index("cell_sentence") - 1
    assert main(["step4-train-test-split", *common]) == 0
    stepwise = check_dataset(tmp_path / "stepwise/output/steps", src)

    assert main(["run-all", str(tmp_path / "in/steps.h5ad"), *dirs(tmp_path / "fused")]) == 0
    fused = check_dataset(tmp_path / "fused/output/steps", src)
    for split in ("train", "test"):
        assert stepwise[split].column("obs_names").to_pylist() == fused[split].column("obs_names").to_pylist()


def test_a_real_matrix_with_symbol_var_names(tmp_path):
    adata = write_real_matrix(tmp_path / "in/oligodendroglioma.h5ad")
    assert main(["run-all", str(tmp_path / "in/oligodendroglioma.h5ad"), "--top-genes", "100", "--test-size", "0.2", *dirs(tmp_path)]) == 0
    splits = check_dataset(tmp_path / "output/oligodendroglioma", adata, top_n=100)
    assert splits["train"].column("cell_type").to_pylist()[0] == str(adata.obs.loc[splits["train"].column("obs_names")[0].as_py(), "cell_type"])
    manifest = json.loads((tmp_path / "output/oligodendroglioma/manifest.json").read_text())
    assert manifest["genes"]["source"] == "var_names" and manifest["split"]["by"] == "donor"


def test_keep_interim_and_unsplit_layouts(tmp_path):
    adata = write_cellxgene_like(tmp_path / "in/a.h5ad", n_cells=250, seed=4)
    assert main(["run-all", str(tmp_path / "in/a.h5ad"), "--keep-interim", "--skip-train-test-split", "-c", "100", *dirs(tmp_path)]) == 0
    interim = sorted(p.name for p in (tmp_path / "interim/parquet_chunks/a/chunks").iterdir())
    output = sorted(p.name for p in (tmp_path / "output/a/chunks").iterdir())
    assert interim == output == ["chunk_0000.parquet", "chunk_0001.parquet", "chunk_0002.parquet"]
    table = read_dataset(tmp_path / "output/a")["all"]
    assert table.column("obs_names").to_pylist() == list(adata.obs_names)  # unsplit: every cell, in order
    assert table.column("age").null_count == sum(AGE_OF_LABEL[s] is None for s in adata.obs["development_stage"])
    kept = pa.concat_tables(pq.read_table(tmp_path / "interim/parquet_chunks/a/chunks" / n) for n in interim)
    assert kept.equals(table)


def test_unwritable_output_fails_each_file_with_a_message(tmp_path):
    write_cellxgene_like(tmp_path / "in/a.h5ad", n_cells=100, seed=5)
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be")
    status = main(["run-all", str(tmp_path / "in/a.h5ad"), "--output-dir", str(blocker / "out"), "--log-dir", str(tmp_path / "logs"), "--interim-dir", str(tmp_path / "i"), "--no-progress"])
    assert status != 0
    log = (tmp_path / "logs/a/pipeline.log").read_text()
    assert "cannot write to" in log and str(blocker) in log


def test_cellfeed_preprocess_command_forwards(tmp_path):
    write_cellxgene_like(tmp_path / "in/cmd.h5ad", n_cells=120, seed=6)
    done = subprocess.run(
        [sys.executable, "-m", "cellfeed.server.cli", "preprocess", "run-all", str(tmp_path / "in/cmd.h5ad"), *dirs(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "PIPELINE COMPLETE - SUMMARY" in done.stdout and "✓ cmd [SUCCESS]" in done.stdout
    assert (tmp_path / "output/cmd/train/chunks/chunk_0000.parquet").exists()


class RecordingHub:
    """Stands in for HfApi: records the calls the upload would send (no network)."""

    def __init__(self, existing: list[str]) -> None:
        self.existing = existing
        self.calls: list[tuple[str, dict]] = []

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", {"repo_id": repo_id, **kw}))

    def list_repo_files(self, repo_id, **kw):
        self.calls.append(("list_repo_files", {"repo_id": repo_id, **kw}))
        return self.existing

    def create_commit(self, repo_id, **kw):
        self.calls.append(("create_commit", {"repo_id": repo_id, **kw}))


def test_upload_sends_one_commit_of_missing_chunks_to_one_repo_per_dataset(tmp_path):
    write_cellxgene_like(tmp_path / "in/up.h5ad", n_cells=300, seed=7)
    assert main(["run-all", str(tmp_path / "in/up.h5ad"), "-c", "100", *dirs(tmp_path)]) == 0
    folder = tmp_path / "output/up"
    train = sorted(p.name for p in (folder / "train/chunks").iterdir())
    test = sorted(p.name for p in (folder / "test/chunks").iterdir())
    hub = RecordingHub(existing=[f"data/up/train/chunks/{train[0]}"])
    readme = tmp_path / "README.md"
    readme.write_text("# up\n")
    repo, added = upload_dataset(folder, "up", "org/cells", "hf_token", readme=readme, api=hub)
    assert repo == "org/cells-up"
    assert [c[0] for c in hub.calls] == ["create_repo", "list_repo_files", "create_commit"]
    assert hub.calls[0][1] == {"repo_id": "org/cells-up", "repo_type": "dataset", "private": False, "exist_ok": True}
    commit = hub.calls[2][1]
    paths = [op.path_in_repo for op in commit["operations"]]
    assert paths == [f"data/up/train/chunks/{n}" for n in train[1:]] + [f"data/up/test/chunks/{n}" for n in test] + ["README.md"]
    assert added == paths and commit["commit_message"] == f"Upload {len(paths)} data files"
    first = commit["operations"][0]
    assert Path(first.path_or_fileobj).read_bytes() == (folder / "train/chunks" / train[1]).read_bytes()


def test_every_stored_value_is_a_float32_of_the_input(tmp_path):
    adata = write_cellxgene_like(tmp_path / "in/v.h5ad", n_cells=200, seed=8)
    assert main(["run-all", str(tmp_path / "in/v.h5ad"), "--skip-train-test-split", *dirs(tmp_path)]) == 0
    table = read_dataset(tmp_path / "output/v")["all"]
    dense = adata.X.toarray()
    index = {n: i for i, n in enumerate(adata.obs_names)}
    for name, values in zip(table.column("obs_names").to_pylist(), table.column("values").to_pylist()):
        row = dense[index[name]]
        assert np.isin(np.float32(values), row[row > 0]).all()


def test_a_failure_mid_file_leaves_the_previous_output_untouched(tmp_path):
    path = tmp_path / "in/late.h5ad"
    write_cellxgene_like(path, n_cells=900, seed=9)
    assert main(["run-all", str(path), "-c", "100", *dirs(tmp_path)]) == 0
    before = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "output/late").rglob("*") if p.is_file()}

    with h5py.File(path, "r+") as f:  # corrupt the last rows: a gene index past the end of var
        indices = f["X/indices"]
        indices[-5:] = 10_000
    assert main(["run-all", str(path), "-c", "100", *dirs(tmp_path)]) == 1
    log = (tmp_path / "logs/late/pipeline.log").read_text()
    assert "late.h5ad: X is not a well-formed CSR matrix: row 899 has gene (column) index 10000, outside 0..299" in log
    after = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "output/late").rglob("*") if p.is_file()}
    assert after == before  # the old dataset is intact, nothing of the failed run is visible
    assert sorted(p.name for p in (tmp_path / "output").iterdir()) == ["batch_processing_summary.json", "batch_processing_summary.tsv", "late"]


def test_a_file_where_no_cell_has_an_age_says_so(tmp_path):
    adata = write_cellxgene_like(tmp_path / "in/ageless.h5ad", n_cells=80, seed=10, term_ids=False)
    adata.obs["development_stage"] = "adult stage"
    adata.write_h5ad(tmp_path / "in/ageless.h5ad")
    assert main(["run-all", str(tmp_path / "in/ageless.h5ad"), *dirs(tmp_path)]) == 1
    assert "no cell has an age (development stages: 'adult stage')" in (tmp_path / "logs/ageless/pipeline.log").read_text()
    assert main(["run-all", str(tmp_path / "in/ageless.h5ad"), "--no-age-filter", *dirs(tmp_path)]) == 0
    assert sum(t.num_rows for t in read_dataset(tmp_path / "output/ageless").values()) == 80
