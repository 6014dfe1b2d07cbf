"""The preprocess building blocks against values worked out independently in the tests."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import scipy.sparse as sp

from cellfeed.server.errors import CellfeedError
from cellfeed.server.preprocess.age import age_in_years, ages
from cellfeed.server.preprocess.genes import GeneTable, resolve_symbols
from cellfeed.server.preprocess.folders import dataset_name
from cellfeed.server.preprocess.sentences import columns, rank
from cellfeed.server.preprocess.split import DROPPED, TEST, TRAIN, SplitCounter


@pytest.mark.parametrize(
    "path, name",
    [
        ("ds one.h5ad", "ds_one"),
        ("ds@two.h5ad", "ds_two"),
        ("__a  b!!c__.h5ad", "a_b_c"),
        ("9deda9ad-6a71-401e-b909-5263919d85f9.h5ad", "9deda9ad-6a71-401e-b909-5263919d85f9"),
        ("/x/y/v1.2_final.h5ad", "v1.2_final"),
        ("@@@.h5ad", "dataset"),
    ],
)
def test_dataset_names_are_sanitised(path, name):
    assert dataset_name(path) == name


def _brute_force(X: sp.csr_matrix, top_n: int, named: np.ndarray) -> list[tuple[list[int], list[float]]]:
    dense = X.toarray()
    out = []
    for row in dense:
        candidates = [j for j in range(len(row)) if row[j] > 0 and named[j]]
        best = sorted(candidates, key=lambda j: (-row[j], j))[:top_n]
        out.append((best, [float(row[j]) for j in best]))
    return out


@pytest.mark.parametrize("top_n", [1, 7, 1000])
def test_rank_keeps_expressed_named_genes_best_first_ties_by_position(top_n):
    rng = np.random.default_rng(3)
    X = sp.random(120, 90, density=0.3, format="csr", random_state=rng, dtype=np.float32)
    X.data = np.round(X.data * 4) - 1  # -1..3: negatives, stored zeros and many ties
    X = X.tolil()
    X[5] = 0  # an empty row
    X = X.tocsr()
    named = rng.random(90) > 0.2
    offsets, genes, values = rank(X.indptr, X.indices, X.data, 90, top_n, named)
    expected = _brute_force(X, top_n, named)
    assert len(offsets) == 121
    for i, (want_genes, want_values) in enumerate(expected):
        a, b = offsets[i], offsets[i + 1]
        assert genes[a:b].tolist() == want_genes
        assert values[a:b].tolist() == want_values


def test_sentence_columns_join_symbols_with_spaces():
    offsets = np.array([0, 2, 2, 3], dtype=np.int32)
    cols = columns(offsets, np.array([2, 0, 1], np.int32), np.array([5, 4, 9], np.float32), pa.array(["A", "B", "C"]))
    assert cols["cell_sentence"].to_pylist() == ["C A", "", "B"]
    assert cols["genes"].to_pylist() == [["C", "A"], [], ["B"]]
    assert cols["values"].to_pylist() == [[5.0, 4.0], [], [9.0]]


@pytest.mark.parametrize(
    "label, years",
    [
        ("65-year-old human stage", 65.0),
        ("65-year-old stage", 65.0),
        ("9-month-old stage", 0.75),
        ("3-month-old stage", 0.25),
        ("6 weeks", 42 / 365.25),
        ("21-day-old stage", 21 / 365.25),
        ("sixth decade stage", 54.5),
        ("2-4 year-old child stage", 3.0),
        ("newborn stage (0-28 days)", 0.0),
        ("80 year-old and over stage", None),
        ("under-1-year-old stage", None),
        ("10th week post-fertilization stage", None),
        ("Carnegie stage 12", None),
        ("adult stage", None),
        ("unknown", None),
        ("", None),
    ],
)
def test_age_from_stage_labels(label, years):
    got = age_in_years(label)
    assert got == pytest.approx(years) if years is not None else got is None


def test_term_id_wins_over_label_and_label_fills_unknown_terms():
    labels = pa.array(["30-year-old stage", "30-year-old stage", None, "sixth decade stage"])
    terms = pa.array(["HsapDv:0000159", "not-a-term", "MmusDv:0000063", None])  # 65 y, ?, 3 months, -
    assert ages(labels, terms).to_pylist() == [65.0, 30.0, 0.25, 54.5]


def test_gene_symbols_prefer_feature_name_then_table_then_symbol_names():
    table = GeneTable.shipped()
    var_names = ["ENSG00000141510.17", "ENSG00000141510", "ENSG00000012048", "MYGENE", "ENSG99999999999"]
    features = ["TP53-custom", "ENSG00000141510", "nan", "", None]
    got = resolve_symbols(var_names, features, table, "x.h5ad")
    assert got.symbols == ["TP53-custom", "TP53", "BRCA1", "MYGENE", None]
    assert got.unmapped_examples == ["ENSG99999999999"]


def test_gene_symbols_fail_when_nothing_maps():
    with pytest.raises(CellfeedError, match="none of the 2 var_names maps"):
        resolve_symbols(["ENSG99999999998", "ENSG99999999999"], None, GeneTable.shipped(), "x.h5ad")


def test_hgnc_complete_set_is_read_with_legacy_headers(tmp_path):
    path = tmp_path / "hgnc_complete_set.txt"
    path.write_text('HGNC ID\tApproved symbol\tEnsembl gene ID\tNotes\nHGNC:1\tAAA1\tENSG00000000001\t"quoted, text"\nHGNC:2\tBBB2\t\tx\n')
    table = GeneTable.load(path)
    assert len(table) == 1 and table.get("ENSG00000000001.3") == "AAA1"


def _donor_split(n_donors: int, cells_per_donor: np.ndarray, donor_age: np.ndarray, seed: int = 42, test_size: float = 0.1):
    donors = np.repeat([f"d{i}" for i in range(n_donors)], cells_per_donor)
    age = np.repeat(donor_age, cells_per_donor).astype(float)
    perm = np.random.default_rng(0).permutation(len(donors))  # donors spread over every block
    donors, age = donors[perm], age[perm]
    counter = SplitCounter(by_donor=True)
    blocks = np.array_split(np.arange(len(donors)), 7)
    for b in blocks:
        counter.add(pa.array(donors[b]), pa.array(age[b]))
    decision = counter.decide(test_size, seed)
    assigner = decision.assigner()
    codes = np.concatenate([assigner.codes(pa.array(donors[b]), pa.array(age[b])) for b in blocks])
    return donors, age, codes, decision


def test_donor_split_never_puts_a_donor_on_both_sides_and_is_stratified_by_age():
    rng = np.random.default_rng(1)
    n = 300
    donor_age = rng.integers(20, 80, size=n)
    donors, age, codes, decision = _donor_split(n, rng.integers(20, 60, size=n), donor_age)
    for d in np.unique(donors):
        assert len(set(codes[donors == d])) == 1
    share = (codes == TEST).mean()
    assert 0.08 < share < 0.12
    for lo in range(20, 80, 15):  # every age range gets about its share of test cells
        band = (age >= lo) & (age < lo + 15)
        assert 0.05 < (codes[band] == TEST).mean() < 0.15
    assert decision.describe()["by"] == "donor"


def test_donor_split_depends_on_the_seed_only():
    rng = np.random.default_rng(2)
    sizes, ages_ = rng.integers(10, 30, size=40), rng.integers(20, 80, size=40)
    a = _donor_split(40, sizes, ages_, seed=1)[2]
    b = _donor_split(40, sizes, ages_, seed=1)[2]
    c = _donor_split(40, sizes, ages_, seed=2)[2]
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_few_donors_still_give_a_test_donor():
    donors, _, codes, _ = _donor_split(3, np.array([50, 60, 70]), np.array([30, 40, 50]), test_size=0.05)
    assert set(codes.tolist()) == {TRAIN, TEST}


def test_cell_split_draws_exact_counts_per_age_whatever_the_block_size():
    rng = np.random.default_rng(4)
    age = rng.choice([20.0, 30.0, 40.0, None], p=[0.5, 0.3, 0.15, 0.05], size=5000)
    arr = pa.array(age.tolist(), pa.float64())
    results = []
    for parts in (1, 9, 50):
        counter = SplitCounter(by_donor=False)
        blocks = np.array_split(np.arange(5000), parts)
        for b in blocks:
            counter.add(None, arr.take(pa.array(b)))
        assigner = counter.decide(0.2, 7).assigner()
        results.append(np.concatenate([assigner.codes(None, arr.take(pa.array(b))) for b in blocks]))
    assert all(np.array_equal(results[0], r) for r in results[1:])
    codes = results[0]
    assert (codes[np.array([a is None for a in age])] == DROPPED).all()
    for value in (20.0, 30.0, 40.0):
        sel = np.array([a == value for a in age])
        assert abs((codes[sel] == TEST).sum() - 0.2 * sel.sum()) <= 1


def test_the_converter_block_options_come_from_the_run_options_in_one_place():
    from cellfeed.server.preprocess.pipeline import Options

    block = Options(top_genes=7, threads=3, compression="gzip", compression_level=5).block_options()
    assert (block.top_genes, block.threads, block.compression, block.compression_level) == (7, 3, "gzip", 5)
