"""TLS on both planes, and mutual TLS on Flight, with certificates this test makes (openssl)."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from pathlib import Path

import httpx
import pyarrow.flight as flight
import pytest

from cellfeed.wire import cellfeed_pb2 as pb

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl to make certificates")
SMALL = {"files": ["k562.h5ad"], "group_size_S": 4, "batch_size": 4}


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    """A CA; a server certificate for 127.0.0.1 and a client certificate, both signed by it; and
    a client certificate signed by another CA."""
    d = tmp_path_factory.mktemp("pki")
    out = {}
    for ca in ("ca", "other-ca"):
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(d / f"{ca}.key"), "-out", str(d / f"{ca}.pem"), "-days", "1", "-subj", f"/CN={ca}")
        out[ca] = d / f"{ca}.pem"
    for name, ca, ext in (("server", "ca", "subjectAltName=IP:127.0.0.1"), ("client", "ca", "extendedKeyUsage=clientAuth"), ("stranger", "other-ca", "extendedKeyUsage=clientAuth")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(d / f"{name}.key"), "-out", str(d / f"{name}.csr"), "-subj", f"/CN={name}")
        (d / f"{name}.ext").write_text(ext + "\n")
        _openssl("x509", "-req", "-in", str(d / f"{name}.csr"), "-CA", str(d / f"{ca}.pem"), "-CAkey", str(d / f"{ca}.key"), "-CAcreateserial",
                 "-out", str(d / f"{name}.pem"), "-days", "1", "-extfile", str(d / f"{name}.ext"))
        out[name], out[f"{name}.key"] = d / f"{name}.pem", d / f"{name}.key"
    return out


def _open_session(location: str, **tls) -> str:
    client = flight.FlightClient(location, **tls)
    try:
        body = pb.OpenSession(kind="perturbation", config_json=__import__("json").dumps(SMALL)).SerializeToString()
        (result,) = client.do_action(flight.Action("open_session", body), flight.FlightCallOptions(timeout=20))
        reply = pb.SessionInfo()
        reply.ParseFromString(result.body.to_pybytes())
        return reply.session_id
    finally:
        client.close()


def test_both_planes_serve_tls(serve, pert_root, pki):
    server = serve(pert_root, tls_cert=pki["server"], tls_key=pki["server.key"])
    assert server.http_url.startswith("https://")
    r = httpx.get(f"{server.http_url}/healthz", verify=ssl.create_default_context(cafile=str(pki["ca"])))
    assert r.status_code == 200
    with pytest.raises(httpx.HTTPError):  # plain HTTP is not served
        httpx.get(f"http://127.0.0.1:{server.http_port}/healthz", timeout=5)
    location = f"grpc+tls://127.0.0.1:{server.flight_port}"
    assert _open_session(location, tls_root_certs=pki["ca"].read_bytes())


def test_mutual_tls_requires_a_client_certificate_the_ca_signed(serve, pert_root, pki):
    server = serve(pert_root, tls_cert=pki["server"], tls_key=pki["server.key"], tls_client_ca=pki["ca"])
    location = f"grpc+tls://127.0.0.1:{server.flight_port}"
    roots = pki["ca"].read_bytes()
    assert _open_session(location, tls_root_certs=roots, cert_chain=pki["client"].read_bytes(), private_key=pki["client.key"].read_bytes())
    with pytest.raises(flight.FlightError):  # no client certificate
        _open_session(location, tls_root_certs=roots)
    with pytest.raises(flight.FlightError):  # a certificate another CA signed
        _open_session(location, tls_root_certs=roots, cert_chain=pki["stranger"].read_bytes(), private_key=pki["stranger.key"].read_bytes())
    # the HTTP plane stays plain TLS: probes need no client certificate
    assert httpx.get(f"{server.http_url}/livez", verify=ssl.create_default_context(cafile=str(pki["ca"]))).status_code == 200


def test_half_a_tls_configuration_is_refused_at_start_up(tmp_path, pki):
    import sys

    for args in (["--tls-cert", str(pki["server"])], ["--tls-client-ca", str(pki["ca"])]):
        done = subprocess.run([sys.executable, "-m", "cellfeed.server.cli", "serve", "--data-root", str(tmp_path), "--flight-port", "0", "--http-port", "0", *args],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        assert "--tls-cert" in done.stderr
