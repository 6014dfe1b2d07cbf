"""examples/: each LightningCLI recipe runs a few steps, as examples/README.md says, against a real
server on the data `make demo` writes (its own generators, into a scratch demo-data/).

Each run is `python examples/train.py fit -c examples/<recipe>.yaml --trainer.max_steps=3` in a
subprocess whose working folder holds demo-data/ (the recipes' local paths are relative to it)
and whose environment names the server (CELLFEED_SERVER), as a user's shell would.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from cellfeed.server import demo, demo_dynaclr
from tests.conftest import ServerProcess

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SECRET = "token-from-the-environment"
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A folder holding demo-data/ as `make demo` leaves it (screens, table, dynaclr)."""
    work = tmp_path_factory.mktemp("examples")
    root = work / "demo-data"
    root.mkdir()
    demo._generate(root / "screens")
    demo._generate_table(root / "table")
    demo_dynaclr.generate(root / "dynaclr")
    return work


@pytest.fixture(scope="module")
def demo_server(workdir):
    server = ServerProcess(workdir / "demo-data")  # `cellfeed serve --data-root demo-data`
    server.start()
    yield server
    server.stop()


def train(workdir: Path, server: ServerProcess, *args: str, timeout: float = 240) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CELLFEED_")}
    env["CELLFEED_SERVER"] = server.flight_uri
    env["CELLFEED_TOKEN"] = SECRET  # the server asks for none; a token it is sent does no harm
    command = [sys.executable, str(EXAMPLES / "train.py"), "fit", *args, *QUIET]
    done = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{output[-6000:]}"
    return output


def recipe(name: str) -> str:
    return str(EXAMPLES / f"{name}.yaml")


@pytest.mark.parametrize(
    "name, data_class",
    [
        ("perturbation", "cellfeed.client.PerturbationDataModule"),
        ("cell_load", "cellfeed.client.cell_load.data_modules.PerturbationDataModule"),
        ("dynaclr", "cellfeed.client.MultiExperimentDataModule"),
        ("table", "cellfeed.client.TableDataModule"),
    ],
)
def test_recipe_trains_three_steps_against_the_demo_data(workdir, demo_server, name, data_class):
    output = train(workdir, demo_server, "-c", recipe(name), "--trainer.max_steps=3")
    assert "`max_steps=3` reached" in output, output[-3000:]
    saved = yaml.safe_load((workdir / "runs" / name / "config.yaml").read_text())
    assert saved["data"]["class_path"] == data_class
    # server and token came from the environment: the saved config names neither
    assert saved["data"]["init_args"]["server"] is None and saved["data"]["init_args"]["token"] is None
    assert SECRET not in (workdir / "runs" / name / "config.yaml").read_text()


def test_resume_recipe_goes_on_from_the_checkpoint(workdir, demo_server):
    layers = ["-c", recipe("perturbation"), "-c", recipe("resume")]
    train(workdir, demo_server, *layers, "--trainer.max_steps=3")
    last = workdir / "runs/resume/checkpoints/last.ckpt"
    first = torch.load(last, map_location="cpu", weights_only=False)
    assert first["global_step"] == 3 and first["PerturbationDataModule"]["train"]["next_batch"] == 3
    output = train(workdir, demo_server, *layers, "--trainer.max_steps=6", f"--ckpt_path={last}")
    assert "Restored all states from the checkpoint" in output, output[-3000:]
    second = torch.load(last, map_location="cpu", weights_only=False)
    # three more steps, and the loader went on from batch 3 of the same epoch (not from batch 0)
    assert second["global_step"] == 6 and second["epoch"] == 0
    assert second["PerturbationDataModule"]["train"]["next_batch"] == 6
    weights = next(iter(second["state_dict"]))
    assert not torch.equal(first["state_dict"][weights], second["state_dict"][weights])


@pytest.mark.slow
def test_ddp_recipe_runs_two_cpu_processes_with_disjoint_shares(workdir, demo_server):
    layers = ["-c", recipe("perturbation"), "-c", recipe("ddp"), "-c", recipe("resume")]
    ckpt = workdir / "runs/ddp/checkpoints"
    output = train(workdir, demo_server, *layers, "--trainer.max_steps=3", "--trainer.default_root_dir=runs/ddp",
                   f"--trainer.callbacks.init_args.dirpath={ckpt}", timeout=400)
    assert "Starting with 2 processes" in output and "`max_steps=3` reached" in output, output[-3000:]
    state = torch.load(ckpt / "last.ckpt", map_location="cpu", weights_only=False)["PerturbationDataModule"]["train"]
    assert state["world_size"] == 2 and state["next_batch"] == 3  # rank 0's loader, one of two shares
