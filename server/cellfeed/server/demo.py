"""`make demo`: generate a small screen, start a server, train through the client, print cells/s.

Everything runs on loopback in a scratch directory (./demo-data); the server is a real
`cellfeed serve` child process, stopped at the end.
"""

from __future__ import annotations

import importlib.util
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _generate(root: Path) -> None:
    from cellfeed.server.kinds.perturbation.synthetic import PerturbationSpec, write_embeddings, write_perturbation_h5ad

    if (root / "rpe1.h5ad").exists():
        return
    print(f"generating a small perturbation screen in {root} ...")
    for seed, name in enumerate(("k562", "rpe1")):
        spec = PerturbationSpec(cell_type=name, n_targets=40, cells_per_target=(150, 300), n_controls=1500,
                                n_genes=2000, density=0.1, n_batches=2, seed=seed)
        write_perturbation_h5ad(root / f"{name}.h5ad", spec)
    write_embeddings(root / "target_emb.pt", [f"G{i:03d}" for i in range(40)], dim=64)
    (root / "screen.toml").write_text(
        '[datasets]\nscreen = "screens/{k562,rpe1}.h5ad"\n[training]\nscreen = "train"\n'
        '[fewshot."screen.rpe1"]\nval = ["G000", "G001"]\ntest = ["G002", "G003"]\n'
    )


def _generate_table(root: Path) -> None:
    """`root`/k562: the k562 screen through `cellfeed preprocess run-all` (for TableDataModule)."""
    import contextlib
    import io
    import shutil

    from cellfeed.server.preprocess.cli import main as preprocess

    if (root / "k562" / "manifest.json").exists():
        return
    print(f"preprocessing the k562 screen into a parquet dataset in {root} ...")
    work = root.parent / ".table-work"
    args = ["run-all", str(root.parent / "screens" / "k562.h5ad"), "--no-progress", "--no-age-filter",
            "--donor-column", "batch_var", "--development-stage-column", "cell_type", "--test-size", "0.2",
            "--interim-dir", str(work / "interim"), "--output-dir", str(root), "--log-dir", str(work / "logs")]
    with contextlib.redirect_stdout(io.StringIO()) as said:
        status = preprocess(args)
    if status != 0 or not (root / "k562" / "manifest.json").exists():
        raise RuntimeError(f"preprocessing the demo's table failed:\n{said.getvalue()}")
    shutil.rmtree(work, ignore_errors=True)


def quiet_lightning() -> None:
    """Lightning's tips and warnings off: the demo's output is cellfeed's own lines."""
    import logging
    import warnings

    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"lightning(\..*)?")
    warnings.filterwarnings("ignore", message=r".*(does not have many workers|NumPy array is not writable).*")


NEXT = """
next: train through LightningCLI against this data (the demo's code: server/cellfeed/server/demo.py, demo_dynaclr.py):
  cellfeed serve --data-root demo-data            # in another shell (Flight on grpc://127.0.0.1:8815)
  python examples/train.py fit -c examples/perturbation.yaml
  (also examples/cell_load.yaml, dynaclr.yaml, table.yaml; DDP and resume: examples/README.md)"""


def _train_perturbation(flight_uri: str, root: Path) -> dict:
    import lightning.pytorch as pl
    import torch

    from cellfeed.client import PerturbationDataModule

    class ControlToPerturbed(pl.LightningModule):
        """A deliberately tiny model: mean control profile + target embedding -> mean perturbed profile."""

        def __init__(self, n_genes: int, emb_dim: int) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(n_genes + emb_dim, 128), torch.nn.ReLU(), torch.nn.Linear(128, n_genes))

        def training_step(self, batch, _):
            ctrl = torch.log1p(batch["ctrl_cell_emb"].to_dense()).mean(1)
            pert = torch.log1p(batch["pert_cell_emb"].to_dense()).mean(1)
            loss = torch.nn.functional.mse_loss(self.net(torch.cat([ctrl, batch["pert_emb"]], -1)), pert)
            return loss

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    dm = PerturbationDataModule(config_path=str(root / "screen.toml"), pert_embedding_file="screens/target_emb.pt",
                                batch_size=64, group_size_S=32, num_workers=2, server=flight_uri, seed=0)
    dm.setup("fit")
    dims = dm.get_var_dims()
    print(f"session: {dims['input_dim']} genes, {len(dm.cell_type_vocab)} cell types, {len(dm.target_vocab)} targets, "
          f"{len(dm.train_dataloader())} train batches / epoch")
    model = ControlToPerturbed(dims["input_dim"], dims["pert_dim"])
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_model_summary=False, enable_progress_bar=False, limit_val_batches=0)
    t0 = time.perf_counter()
    trainer.fit(model, dm)
    seconds = time.perf_counter() - t0
    steps = trainer.global_step
    cells = steps * 64 * 32
    print(f"perturbation: trained {steps} steps on {cells:,} perturbed cells (+ as many controls) in {seconds:.1f} s "
          f"= {cells / seconds:,.0f} perturbed cells/s including the model's own time")

    loader = dm.train_dataloader()
    t0 = time.perf_counter()
    n = sum(b["pert_cell_emb"].shape[0] * b["pert_cell_emb"].shape[1] for b in loader)
    loader_seconds = time.perf_counter() - t0
    dm.teardown("fit")  # the loop is over: end the streams gone on into the next epoch
    print(f"perturbation: loader alone streamed {n:,} perturbed cells in {loader_seconds:.2f} s = {n / loader_seconds:,.0f} cells/s")
    return {"train_cells_per_s": cells / seconds, "loader_cells_per_s": n / loader_seconds}


def main() -> int:
    import cellfeed.client  # noqa: F401 - before anndata (in _generate), as the README advises

    root = Path("demo-data").resolve()
    root.mkdir(exist_ok=True)
    quiet_lightning()
    _generate(root / "screens")
    _generate_table(root / "table")
    flight_port, http_port = _port(), _port()
    flight_uri = f"grpc://127.0.0.1:{flight_port}"
    server = subprocess.Popen([sys.executable, "-m", "cellfeed.server.cli", "serve", "--data-root", str(root),
                               "--flight-port", str(flight_port), "--http-port", str(http_port), "--log-level", "WARNING"])
    try:
        for _ in range(300):
            try:
                if httpx.get(f"http://127.0.0.1:{http_port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        print(f"server up: flight {flight_uri}, http http://127.0.0.1:{http_port}")
        _train_perturbation(flight_uri, root / "screens")
        if importlib.util.find_spec("cellfeed.server.demo_dynaclr") is not None:
            from cellfeed.server.demo_dynaclr import run as run_dynaclr

            run_dynaclr(flight_uri, root / "dynaclr")
        sessions = httpx.get(f"http://127.0.0.1:{http_port}/v1/sessions").json()
        print(f"server saw {len(sessions)} session(s), {sum(len(s['streams']) for s in sessions)} stream(s)")
    finally:
        server.terminate()
        server.wait(15)
    print("server stopped")
    print(NEXT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
