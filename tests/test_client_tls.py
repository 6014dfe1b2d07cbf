"""The DataModules' client TLS files (CELLFEED_TLS_* or the tls_* hparams): mutual TLS against
real servers started with --tls-cert/--tls-key/--tls-client-ca, certificates made by openssl."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from cellfeed.client import PerturbationDataModule, RequestError
from tests.helpers import barcodes
from tests.test_tls import SMALL, pki  # noqa: F401 - the certificates fixture

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl to make certificates")


def test_mutual_tls_from_the_environment_over_two_replicas(serve, pert_root, pki, monkeypatch):  # noqa: F811
    tls = dict(tls_cert=pki["server"], tls_key=pki["server.key"], tls_client_ca=pki["ca"])
    servers = [serve(pert_root, **tls), serve(pert_root, **tls)]
    where = ",".join(f"grpc+tls://127.0.0.1:{s.flight_port}" for s in servers)
    monkeypatch.setenv("CELLFEED_TLS_ROOT_CERTS", str(pki["ca"]))
    monkeypatch.setenv("CELLFEED_TLS_CERT_CHAIN", str(pki["client"]))
    monkeypatch.setenv("CELLFEED_TLS_PRIVATE_KEY", str(pki["client.key"]))
    dm = PerturbationDataModule(server=where, num_workers=2, barcodes=True, **SMALL)
    dm.setup("fit")
    got = list(dm.train_dataloader())
    assert got and len(got) == len(dm.train_dataloader())
    plain = PerturbationDataModule(server=f"grpc+tls://127.0.0.1:{servers[0].flight_port}", num_workers=1, barcodes=True, **SMALL)
    plain.setup("fit")
    np.testing.assert_array_equal(barcodes(got), barcodes(list(plain.train_dataloader())))

    # without the client certificate the server refuses the handshake: at once, not after retries
    monkeypatch.delenv("CELLFEED_TLS_CERT_CHAIN")
    with pytest.raises(ValueError, match="tls_cert_chain and tls_private_key go together"):
        PerturbationDataModule(server=where, **SMALL).setup("fit")
    monkeypatch.delenv("CELLFEED_TLS_PRIVATE_KEY")
    with pytest.raises((RequestError, ConnectionError)):
        PerturbationDataModule(server=where, retry_seconds=2, **SMALL).setup("fit")


def test_an_unreadable_tls_file_is_named(monkeypatch, tmp_path):
    monkeypatch.setenv("CELLFEED_TLS_ROOT_CERTS", str(tmp_path / "missing.pem"))
    with pytest.raises(ValueError, match=r"tls_root_certs=.*missing\.pem.*cannot read it"):
        PerturbationDataModule(server="grpc+tls://127.0.0.1:1", **SMALL).setup("fit")


def test_mutual_tls_from_arguments(serve, pert_root, pki, monkeypatch):  # noqa: F811
    """The same certificates as DataModule arguments (a YAML config names the files)."""
    for name in ("CELLFEED_TLS_ROOT_CERTS", "CELLFEED_TLS_CERT_CHAIN", "CELLFEED_TLS_PRIVATE_KEY"):
        monkeypatch.delenv(name, raising=False)
    server = serve(pert_root, tls_cert=pki["server"], tls_key=pki["server.key"], tls_client_ca=pki["ca"])
    where = f"grpc+tls://127.0.0.1:{server.flight_port}"
    dm = PerturbationDataModule(server=where, num_workers=1, tls_root_certs=str(pki["ca"]), tls_cert_chain=str(pki["client"]),
                                tls_private_key=str(pki["client.key"]), **SMALL)
    dm.setup("fit")
    assert len(list(dm.train_dataloader())) == len(dm.train_dataloader()) > 0
    dm.teardown("fit")
    with pytest.raises(ValueError, match="tls_cert_chain and tls_private_key go together"):
        PerturbationDataModule(server=where, tls_cert_chain=str(pki["client"]), **SMALL).setup("fit")
