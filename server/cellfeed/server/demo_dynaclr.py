"""The DynaCLR part of `make demo`: two small time-lapse plates, a few NT-Xent steps, anchors/s.

Called by `cellfeed.server.demo` with a running server whose data root holds `data_dir`.
"""

from __future__ import annotations

import time
from pathlib import Path

from cellfeed.server.kinds.dynaclr.synthetic import (
    PlateSpec,
    experiments_yaml,
    write_experiment,
)

EXPERIMENTS = (
    PlateSpec(
        name="sec61",
        channel_names=["Phase3D", "GFP", "Mito"],
        source_channel=["Phase3D", "GFP"],
        condition_wells={"uninfected": ["A/1"], "infected": ["B/1"]},
        shape_tzyx=(12, 5, 128, 128),
        interval_minutes=30.0,
        start_hpi=3.0,
        ngff="0.4",
        tracks="grid",
        tracks_per_fov=24,
    ),
    PlateSpec(
        name="tomm20",
        channel_names=["RFP", "Phase3D"],
        source_channel=["Phase3D", "RFP"],
        condition_wells={"uninfected": ["A/1"], "infected": ["B/1"]},
        shape_tzyx=(12, 5, 128, 128),
        chunks_zyx=(5, 64, 64),
        interval_minutes=15.0,
        start_hpi=2.0,
        ngff="0.5",
        shard=True,
        tracks="grid",
        tracks_per_fov=24,
    ),
)


def generate(data_dir: Path) -> Path:
    """Write both plates, their tracks and `experiments.yml` (absolute paths) into `data_dir`."""
    yaml_path = data_dir / "experiments.yml"
    if not yaml_path.exists():
        print(f"generating two small time-lapse plates in {data_dir} ...")
        data_dir.mkdir(parents=True, exist_ok=True)
        entries = [write_experiment(data_dir, spec, seed=i) for i, spec in enumerate(EXPERIMENTS)]
        yaml_path.write_text(experiments_yaml(entries))
    return yaml_path


def run(flight_uri: str, data_dir: Path) -> dict:
    """Train a tiny contrastive model through MultiExperimentDataModule; print and return anchors/s."""
    import lightning.pytorch as pl
    import torch
    import torch.nn.functional as F

    from cellfeed.client import MultiExperimentDataModule
    from cellfeed.client.transforms import NormalizeSampled

    yaml_path = generate(Path(data_dir).resolve())
    batch_size = 32

    class TinyDynaCLR(pl.LightningModule):
        """A small 3D encoder and NT-Xent over (anchor, positive); negatives come from the batch."""

        def __init__(self) -> None:
            super().__init__()
            self.encoder = torch.nn.Sequential(
                torch.nn.Conv3d(2, 8, 3, padding=1),
                torch.nn.ReLU(),
                torch.nn.AdaptiveAvgPool3d(1),
                torch.nn.Flatten(),
                torch.nn.Linear(8, 16),
            )

        def _loss(self, batch) -> torch.Tensor:
            z = F.normalize(self.encoder(torch.cat([batch["anchor"], batch["positive"]])), dim=1)
            n = batch["anchor"].shape[0]
            sim = (z @ z.T / 0.2).fill_diagonal_(float("-inf"))
            return F.cross_entropy(sim, torch.cat([torch.arange(n, 2 * n), torch.arange(n)]))

        def training_step(self, batch, _):
            loss = self._loss(batch)
            self.log("train_loss", loss, batch_size=batch_size)
            return loss

        def validation_step(self, batch, _):
            self.log("val_loss", self._loss(batch), batch_size=batch_size)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    dm = MultiExperimentDataModule(
        experiments_yaml=str(yaml_path),
        z_range=(0, 5),
        yx_patch_size=(48, 48),
        final_yx_patch_size=(32, 32),
        val_experiments=["tomm20"],
        tau_range=(0.5, 2.0),
        batch_size=batch_size,
        num_workers=2,
        temporal_enrichment=True,
        channel_dropout_prob=0.5,
        normalizations=[NormalizeSampled(["ch_0", "ch_1"], level="fov_statistics")],
        server=flight_uri,
    )
    dm.setup("fit")
    info = dm.info
    print(
        f"dynaclr session: experiments {[e['name'] for e in info['experiments']]}, "
        f"{info['splits']['train']['items']} train / {info['splits']['val']['items']} val anchors, "
        f"{len(dm.train_dataloader())} train batches / epoch, tau frames "
        f"{ {e['name']: e['tau_range_frames'] for e in info['experiments']} }"
    )
    trainer = pl.Trainer(
        max_steps=20,
        limit_val_batches=4,
        val_check_interval=10,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
    )
    model = TinyDynaCLR()
    started = time.perf_counter()
    trainer.fit(model, dm)
    seconds = time.perf_counter() - started
    anchors = trainer.global_step * batch_size
    val_loss = float(trainer.callback_metrics.get("val_loss", float("nan")))
    print(
        f"dynaclr: trained {trainer.global_step} steps on {anchors:,} anchor/positive pairs in {seconds:.1f} s "
        f"= {anchors / seconds:,.0f} anchors/s including the model's own time; val_loss {val_loss:.3f}"
    )

    loader = dm.train_dataloader()
    started = time.perf_counter()
    streamed = sum(b["anchor"].shape[0] for b in loader)
    loader_seconds = time.perf_counter() - started
    dm.teardown("fit")  # the loop is over: end the streams gone on into the next epoch
    print(
        f"dynaclr: loader alone streamed {streamed:,} anchor/positive pairs in {loader_seconds:.2f} s "
        f"= {streamed / loader_seconds:,.0f} anchors/s"
    )
    return {
        "train_anchors_per_s": anchors / seconds,
        "loader_anchors_per_s": streamed / loader_seconds,
        "steps": trainer.global_step,
        "val_loss": val_loss,
    }
