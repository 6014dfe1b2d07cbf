"""The compose and Kubernetes files, read with a YAML parser: there is no container engine on these
machines, so what can be checked is their structure, and that what they name exists."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
K8S = list(yaml.safe_load_all((ROOT / "docker" / "k8s" / "cellfeed.yaml").read_text()))


def _mount(volume: str) -> tuple[str, str]:
    """(source, target) of a compose short-form volume, whose source may be `${VAR:-default}`."""
    source, _, rest = volume.partition("}:") if volume.startswith("${") else volume.partition(":")
    return (source + "}" if volume.startswith("${") else source), rest.split(":")[0]


def _by_kind(kind: str) -> dict:
    (doc,) = [d for d in K8S if d["kind"] == kind]
    return doc


def test_compose_server_shares_memory_and_keeps_state():
    server = COMPOSE["services"]["cellfeed"]
    assert server["ipc"] == "shareable" and server["shm_size"]
    mounts = {_mount(v)[1] for v in server["volumes"]}
    assert {"/data", "/state", "/tls"} <= mounts
    assert "cellfeed-state" in COMPOSE["volumes"]
    assert "CELLFEED_TOKEN" in server["environment"] and "HF_TOKEN" in server["environment"]
    # the healthcheck asks the port the server is configured for, not a hard-coded one
    assert "CELLFEED_HTTP_PORT" in " ".join(server["healthcheck"]["test"])


def test_compose_profiles():
    services = COMPOSE["services"]
    assert "profiles" not in services["cellfeed"]  # the default stack is the server alone
    assert services["cellfeed-2"]["profiles"] == ["replicas"]
    assert services["cellfeed-2"]["image"] == services["cellfeed"]["image"]
    data = {_mount(v)[0] for v in services["cellfeed"]["volumes"] if _mount(v)[1] == "/data"}
    assert len(data) == 1
    assert {_mount(v)[0] for v in services["cellfeed-2"]["volumes"] if _mount(v)[1] == "/data"} == data
    assert services["dask-scheduler"]["profiles"] == services["dask-worker"]["profiles"] == ["dask"]
    worker = services["dask-worker"]
    assert "tcp://dask-scheduler:8786" in worker["entrypoint"]
    assert {_mount(v)[0] for v in worker["volumes"] if _mount(v)[1] == "/data"} == data  # same paths as the server sees


def test_compose_training_container_gets_slots_and_gpus():
    train = COMPOSE["services"]["train"]
    assert train["ipc"] == "service:cellfeed"
    (device,) = train["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert "CELLFEED_SERVER" in train["environment"]


def test_image_owns_its_volumes_and_build_context_is_small():
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    assert "chown cellfeed:cellfeed /data /state" in dockerfile
    assert "USER cellfeed" in dockerfile
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".git", "bench/data", "demo-data"} <= set(ignored)


def test_kubernetes_replicas_behind_a_headless_service():
    deployment, service = _by_kind("Deployment"), _by_kind("Service")
    assert deployment["spec"]["replicas"] >= 2
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"] == labels
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"] == labels
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    port_names = {p["name"] for p in container["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    shm = [m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    assert shm and volumes[shm[0]["name"]]["emptyDir"]["medium"] == "Memory"
    token = [e for e in container["env"] if e["name"] == "CELLFEED_TOKEN"]
    assert token and "secretKeyRef" in token[0]["valueFrom"]


def test_kubernetes_probes_ask_routes_the_server_has(tmp_path):
    from cellfeed.server.context import ServerContext
    from cellfeed.server.serving.http import create_app
    from cellfeed.server.serving.sessions import SessionRegistry
    from cellfeed.server.settings import Settings

    ctx = ServerContext.from_settings(Settings(data_root=str(tmp_path)))
    routes = {getattr(r, "path", None) for r in create_app(ctx, SessionRegistry(ctx), "grpc://127.0.0.1:1").routes}
    (container,) = _by_kind("Deployment")["spec"]["template"]["spec"]["containers"]
    port_names = {p["name"] for p in container["ports"]}
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] in routes, f"{probe} asks {get['path']}, which the server does not serve"
        assert get["port"] in port_names
