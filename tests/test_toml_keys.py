"""Every TOML key is honoured or refused: a typo in [dataset_opts] or [loader] is never ignored."""

from __future__ import annotations

import pytest

from cellfeed.client import PerturbationDataModule, RequestError
from cellfeed.client.connection import Connection


def test_an_unknown_dataset_opts_key_is_refused_by_the_server(pert_server):
    toml = '[datasets]\nscreen = "k562.h5ad"\n[dataset_opts]\ncontrol_lable = "non-targeting"\n'
    with pytest.raises(RequestError, match=r"unknown key 'control_lable' in \[dataset_opts\] \(known: .*control_label"):
        Connection(pert_server.flight_uri, retry_seconds=2).open_session("perturbation", {"toml": toml})


def test_an_unknown_loader_key_is_refused_by_the_client(pert_server, tmp_path):
    config = tmp_path / "screen.toml"
    config.write_text('[datasets]\nscreen = "k562.h5ad"\n[loader]\nnum_worker = 4\n')
    dm = PerturbationDataModule(config_path=str(config), group_size_S=4, batch_size=4, server=pert_server.flight_uri)
    with pytest.raises(ValueError, match=r"unknown key 'num_worker' in \[loader\] \(known: num_workers, prefetch_factor\)"):
        dm.setup("fit")


def test_known_loader_keys_are_honoured(pert_server, tmp_path):
    config = tmp_path / "screen.toml"
    config.write_text('[datasets]\nscreen = "k562.h5ad"\n[loader]\nnum_workers = 3\nprefetch_factor = 5\n')
    dm = PerturbationDataModule(config_path=str(config), group_size_S=4, batch_size=4, server=pert_server.flight_uri)
    dm.setup("fit")
    assert (dm.num_streams, dm.prefetch) == (3, 5)
