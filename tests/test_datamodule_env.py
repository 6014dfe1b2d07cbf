"""CELLFEED_SERVER / CELLFEED_TOKEN read by every DataModule when `server` / `token` are not given
(kept out of the saved hyperparameters), and one name for the prefetch depth (`prefetch_factor`)."""

from __future__ import annotations

import warnings

import pytest

from cellfeed.client import MultiExperimentDataModule, PerturbationDataModule, TableDataModule
from cellfeed.client.cell_load.data_modules import PerturbationDataModule as CellLoadDataModule
from cellfeed.client.errors import RequestError

DYNACLR = dict(experiments_yaml="experiments.yml", z_range=(0, 2))


def _modules(tmp_path, **kw) -> dict[str, object]:
    toml = tmp_path / "exp.toml"
    toml.write_text('[datasets]\nscreen = "data"\n[training]\nscreen = "train"\n')
    return {
        "perturbation": PerturbationDataModule(files=["k562.h5ad"], **kw),
        "dynaclr": MultiExperimentDataModule(**DYNACLR, **kw),
        "table": TableDataModule(dataset="out/cells", **kw),
        "cell_load": CellLoadDataModule(toml_config_path=str(toml), should_yield_control_cells=False, **kw),
    }


def test_default_server_is_local_when_neither_argument_nor_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("CELLFEED_SERVER", raising=False)
    monkeypatch.delenv("CELLFEED_TOKEN", raising=False)
    for name, dm in _modules(tmp_path).items():
        assert dm.server == "grpc://127.0.0.1:8815", name
    assert PerturbationDataModule(files=["a.h5ad"]).token is None


def test_environment_names_the_server_and_token_and_neither_is_saved(tmp_path, monkeypatch):
    monkeypatch.setenv("CELLFEED_SERVER", "grpc://feeder.example:9999")
    monkeypatch.setenv("CELLFEED_TOKEN", "s3cret")
    for name, dm in _modules(tmp_path).items():
        assert dm.server == "grpc://feeder.example:9999", name
        if name != "cell_load":
            assert dm.hparams.server is None and "token" not in dm.hparams and dm.token == "s3cret", name
    # an argument wins over the environment
    for name, dm in _modules(tmp_path, server="grpc://other:1", token="t").items():
        assert dm.server == "grpc://other:1", name
    assert PerturbationDataModule(files=["a.h5ad"], token="t").token == "t"


def test_a_real_server_reached_through_the_environment_only(serve, pert_root, monkeypatch):
    server = serve(pert_root, token="tok-123")
    monkeypatch.setenv("CELLFEED_SERVER", server.flight_uri)
    monkeypatch.setenv("CELLFEED_TOKEN", "tok-123")
    dm = PerturbationDataModule(files=["k562.h5ad"], group_size_S=4, batch_size=8, num_workers=1)
    dm.setup("fit")
    assert len(dm.train_dataloader()) > 0 and next(iter(dm.train_dataloader()))["pert_emb"].shape[0] == 8
    dm.teardown("fit")
    monkeypatch.setenv("CELLFEED_TOKEN", "wrong")
    with pytest.raises(RequestError):
        PerturbationDataModule(files=["k562.h5ad"], group_size_S=4, batch_size=8, num_workers=1).setup("fit")


def test_prefetch_factor_is_the_one_name_and_dynaclr_prefetch_warns(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name, dm in _modules(tmp_path).items():
            if name != "cell_load":
                assert dm.prefetch == 2, name
        dm = MultiExperimentDataModule(**DYNACLR, prefetch_factor=5)
    assert dm.prefetch == 5
    assert PerturbationDataModule(files=["a.h5ad"], prefetch_factor=3).prefetch == 3
    assert TableDataModule(dataset="d", prefetch_factor=4).prefetch == 4
    with pytest.warns(FutureWarning, match="prefetch_factor"):
        old = MultiExperimentDataModule(**DYNACLR, prefetch=3)
    assert old.prefetch == 3
    with pytest.raises(ValueError, match="prefetch_factor only"):
        MultiExperimentDataModule(**DYNACLR, prefetch=3, prefetch_factor=4)


def test_table_module_names_the_missing_dataset():
    with pytest.raises(ValueError, match="dataset"):
        TableDataModule()
