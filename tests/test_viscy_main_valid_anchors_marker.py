"""Port of VisCy main's `applications/dynaclr/tests/test_valid_anchors_marker.py` (mehta-lab/VisCy,
branch main, commit 4b62365c0df25929bffc7f01b3bb2d1c11d69cce): valid anchors of a flat parquet in
bag-of-channels mode, per marker (and the cross-FOV lineage collision).

VisCy calls `_compute_valid_anchors` on a bare DataFrame; here each case is a hand-written cell
index parquet over an iohub plate (channels A and B), opened by a real `cellfeed serve` with
`channels_per_sample=1`; the anchors are one unweighted training epoch, as (marker, t).

Documented differences, asserted as cellfeed's behaviour:
- A channel's validity is per well (the parquet's (channel, well) pairs), not per row: a cell
  seen at t is an item for every channel of its well, and its positive is that channel read from
  the plate at t + tau. VisCy main needs the same marker's row at t + tau and else refuses the
  anchor (the bug it guards against, "No positive found" at sample time, cannot occur here).
- Lineages are rebuilt per FOV from parent_track_id, so two FOVs never share one: VisCy's
  "cross-FOV lineage collision accepted today" is refused here.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cellfeed.client import RequestError
from tests.fixtures.ecosystem_plates import IohubPlate
from tests.fixtures.plates import expected_origin
from tests.fixtures.viscy_main_ports import main_ported_server
from tests.fixtures.viscy_ports import write_plate

TAU = (0.5, 1.5)
PATCH = (16, 16)


@pytest.fixture(scope="module")
def ported(tmp_path_factory):
    with main_ported_server(tmp_path_factory, "viscy-main-marker") as p:
        yield p


@pytest.fixture(scope="module")
def plate(ported):
    folder = ported.folder("marker")
    write_plate(folder / "exp.zarr", ["A", "B"], ["A/1/0", "A/1/1"], n_t=12, zyx=(1, 32, 32), seed=7)
    return folder


def _parquet(ported, plate, rows: list[tuple], name: str, *, interval: float = 30.0, marker: bool = True) -> str:
    """rows: (fov, track_id, channel, t); one experiment, one perturbation, tracks at the centre."""
    frame = pd.DataFrame(rows, columns=["fov", "track_id", "channel_name", "t"])
    frame["cell_id"] = [f"{f}_{k}_{t}" for f, k, t in zip(frame.fov, frame.track_id, frame.t)]
    frame["experiment"] = "exp"
    frame["store_path"] = str(plate / "exp.zarr")
    frame["well"] = frame.fov.str.rsplit("/", n=1).str[0]
    frame["y"] = np.float32(16.0)
    frame["x"] = np.float32(16.0)
    frame["z"] = np.int16(0)
    frame["perturbation"] = "ctrl"
    frame["interval_minutes"] = np.float32(interval)
    frame["hours_post_perturbation"] = (frame.t * interval / 60.0).astype(np.float32)
    frame["t"] = frame.t.astype(np.int32)
    frame["track_id"] = frame.track_id.astype(np.int32)
    if marker:
        frame["marker"] = frame.channel_name
    frame.to_parquet(plate / name, index=False)
    return ported.relative(plate / name)


def _anchors(ported, parquet: str) -> set[tuple[str, int]]:
    batches = ported.train_batches(None, cell_index_path=parquet, channels_per_sample=1, tau_range=TAU, yx_patch_size=PATCH,
                                   stratify_by=None, batch_group_by=None)
    return {(m["marker"], int(r["t"])) for b in batches
            for r, m, pad in zip(b["index"], b["anchor_meta"], b["padding"].tolist()) if not pad}


def test_anchor_with_cross_marker_positive_rejected(ported, plate):
    # Documented difference: both A and B are valid in well A/1, so (A, 5) has its positive
    # (A, 6), read from the plate. VisCy main: no anchor (no A row at t = 6).
    parquet = _parquet(ported, plate, [("A/1/0", 0, "A", 5), ("A/1/0", 0, "B", 6)], "cross.parquet")
    assert _anchors(ported, parquet) == {("A", 5), ("B", 5)}
    batches = ported.train_batches(None, cell_index_path=parquet, channels_per_sample=1, tau_range=TAU, yx_patch_size=PATCH,
                                   stratify_by=None, batch_group_by=None)
    reference = IohubPlate(plate / "exp.zarr")
    try:
        for batch in batches:
            for i, (row, a, p) in enumerate(zip(batch["index"], batch["anchor_meta"], batch["positive_meta"])):
                if batch["padding"][i]:
                    continue
                assert p["marker"] == a["marker"] and p["t"] == 6
                y0, x0 = expected_origin(row["y"], row["x"], PATCH, (32, 32))
                want = reference.patch(row["fov_name"], 6, [a["marker"]], (0, 1), y0, x0, PATCH)
                np.testing.assert_array_equal(batch["positive"][i].numpy(), want)
    finally:
        reference.close()


def test_anchor_with_same_marker_positive_accepted(ported, plate):
    parquet = _parquet(ported, plate, [("A/1/0", 0, "A", 5), ("A/1/0", 0, "A", 6), ("A/1/0", 0, "B", 6)], "same.parquet")
    anchors = _anchors(ported, parquet)
    assert ("A", 5) in anchors and not {t for _, t in anchors} & {6}  # t = 6 has no t = 7..8
    assert anchors == {("A", 5), ("B", 5)}  # documented difference: B is valid in the well (VisCy: A only)


def test_both_markers_have_positives_both_accepted(ported, plate):
    rows = [("A/1/0", 0, c, t) for c in "AB" for t in (5, 6)]
    assert _anchors(ported, _parquet(ported, plate, rows, "both.parquet")) == {("A", 5), ("B", 5)}


def test_no_marker_column_falls_back_to_lineage_t(ported, plate):
    rows = [("A/1/0", 0, "A", t) for t in (5, 6, 7)]
    assert _anchors(ported, _parquet(ported, plate, rows, "no-marker.parquet", marker=False)) == {("A", 5), ("A", 6)}


def test_cross_fov_lineage_collision_accepted_today(ported, plate):
    # Documented difference: lineages are per FOV here, so FOV1's t = 5 has no t = 6 in its
    # lineage and no anchor is left; VisCy main accepts it (and would pair it with FOV2's cell).
    parquet = _parquet(ported, plate, [("A/1/0", 0, "A", 5), ("A/1/1", 0, "A", 6)], "collision.parquet")
    with pytest.raises(RequestError, match="no valid anchor"):
        _anchors(ported, parquet)


@pytest.mark.parametrize("interval_minutes", [15.0, 30.0, 60.0])
def test_marker_key_respects_per_experiment_tau(ported, plate, interval_minutes):
    ts = [0, 1, 5, 10]
    parquet = _parquet(ported, plate, [("A/1/0", 0, "A", t) for t in ts], f"tau-{int(interval_minutes)}.parquet",
                       interval=interval_minutes)
    frames = 60.0 / interval_minutes
    lo, hi = int(round(TAU[0] * frames)), int(round(TAU[1] * frames))
    anchors = {t for _, t in _anchors(ported, parquet)}
    assert anchors
    for t in anchors:
        assert any(t + tau in ts for tau in range(max(lo, 1), hi + 1)), (t, interval_minutes)
    assert anchors == {t for t in ts if any(t + tau in ts for tau in range(max(lo, 1), hi + 1))}
