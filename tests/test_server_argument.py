"""A DataModule's `server` argument: one address, commas, or a list of replicas, from LightningCLI YAML too."""

from __future__ import annotations

from jsonargparse import ArgumentParser

from cellfeed.client.datamodule import DEFAULT_SERVER, ServerAddress, resolve_server
from cellfeed.client.replicas import resolve_locations


class _Module:
    def __init__(self, server: ServerAddress = None) -> None:
        self.server = server


def test_yaml_takes_a_string_or_a_list_of_addresses():
    parser = ArgumentParser()
    parser.add_class_arguments(_Module, "data")
    listed = parser.parse_string("data:\n  server: [grpc://a:8815, grpc://b:8815]\n").data.server
    assert listed == ["grpc://a:8815", "grpc://b:8815"]
    assert parser.parse_string("data:\n  server: grpc://a:8815,grpc://b:8815\n").data.server == "grpc://a:8815,grpc://b:8815"
    assert parser.parse_string("data: {}\n").data.server is None


def test_resolve_server_keeps_a_list_and_falls_back_to_the_environment(monkeypatch):
    monkeypatch.delenv("CELLFEED_SERVER", raising=False)
    assert resolve_server(["10.0.0.1:8815", "10.0.0.2:8815"]) == ["10.0.0.1:8815", "10.0.0.2:8815"]
    assert resolve_locations(resolve_server(["10.0.0.1:8815", "10.0.0.2:8815"])) == ["grpc://10.0.0.1:8815", "grpc://10.0.0.2:8815"]
    assert resolve_server(None) == resolve_server([]) == DEFAULT_SERVER
    monkeypatch.setenv("CELLFEED_SERVER", "grpc://10.0.0.3:8815")
    assert resolve_server(None) == "grpc://10.0.0.3:8815"



def test_every_datamodule_takes_a_list_of_replicas_from_yaml():
    """Each DataModule's `server` annotation admits a list, so LightningCLI reads one from YAML."""
    import typing

    from cellfeed.client import MultiExperimentDataModule, PerturbationDataModule, TableDataModule
    from cellfeed.client.cell_load.data_modules import PerturbationDataModule as CellLoadDataModule

    for cls in (PerturbationDataModule, MultiExperimentDataModule, TableDataModule, CellLoadDataModule):
        parser = ArgumentParser()
        parser.add_argument("--server", type=typing.get_type_hints(cls.__init__)["server"])
        assert parser.parse_args(["--server", "[grpc://a:8815, grpc://b:8815]"]).server == ["grpc://a:8815", "grpc://b:8815"], cls
        assert parser.parse_args(["--server", "grpc://a:8815"]).server == "grpc://a:8815", cls
