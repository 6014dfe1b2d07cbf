"""Port of VisCy main's `packages/viscy-data/tests/test_select.py` (mehta-lab/VisCy, branch main,
commit 4b62365c0df25929bffc7f01b3bb2d1c11d69cce): `SelectWell`'s well and FOV filters.

VisCy filters iohub positions in process (`_filter_fit_fovs`); cellfeed's server does it when a
session opens with `include_wells` / `exclude_fovs`. The FOVs it kept are the FOVs the predict
stream serves (every FOV holds one tracked cell), on an iohub plate laid out as viscy-data's
conftest lays it out: wells A/1, A/2, B/1, B/2 x FOVs 0-3.
"""

from __future__ import annotations

import pytest

from tests.fixtures.viscy_ports import make_experiment, ported_server, standard_tracks

WELLS = ["A/1", "A/2", "B/1", "B/2"]
FOVS_PER_WELL = 4


@pytest.fixture(scope="module")
def ported(tmp_path_factory):
    with ported_server(tmp_path_factory, "viscy-main-select") as p:
        yield p


@pytest.fixture(scope="module")
def plate(ported):
    return [make_experiment(ported.folder("select"), "select", ["Phase", "GFP"], WELLS, {"ctrl": WELLS},
                            fovs_per_well=FOVS_PER_WELL, tracks=standard_tracks(n_tracks=1, n_t=2), n_t=2, seed=None)]


@pytest.mark.parametrize("include_wells", [None, ["A/1", "A/2", "B/2"]])
@pytest.mark.parametrize("exclude_fovs", [None, ["A/1/0", "A/1/1", "A/2/2"]])
def test_select_well(ported, plate, include_wells, exclude_fovs):
    rows = ported.predict_index(plate, tau_range=(0.5, 0.5), include_wells=include_wells, exclude_fovs=exclude_fovs)
    fovs = set(rows.fov_name)
    total = (len(include_wells) if include_wells is not None else len(WELLS)) * FOVS_PER_WELL
    total -= len(exclude_fovs) if exclude_fovs is not None else 0
    assert len(fovs) == total
    info = ported.info(plate, tau_range=(0.5, 0.5), include_wells=include_wells, exclude_fovs=exclude_fovs)
    assert info["experiments"][0]["fovs"] == total
    for fov in fovs:
        if include_wells is not None:
            assert fov.rsplit("/", 1)[0] in include_wells
        if exclude_fovs is not None:
            assert fov not in exclude_fovs
