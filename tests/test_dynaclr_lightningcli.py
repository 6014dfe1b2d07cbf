"""`trainer.fit` through LightningCLI and a YAML config, as VisCy trains DynaCLR, against a real
server on iohub-written plates.

The LightningModule is examples/models.py's ContrastiveModule (tests/fixtures/contrastive.py
records its inputs and losses), the shape of VisCy's ContrastiveModule: an encoder and a loss given in
the config, `example_input_array` set from `example_input_array_shape` (so Lightning's model
summary pushes a bare tensor through `on_after_batch_transfer`), `forward` returning
(features, projections), an NT-Xent loss over `cat(anchor, positive)` with labels
`[0..B-1] * 2`. Two epochs with validation.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from lightning.pytorch.cli import LightningCLI

from examples.models import ContrastiveModule
from tests.fixtures.contrastive import MODELS
from tests.fixtures.ecosystem_plates import SOURCE, make_ecosystem_data

PATCH, FINAL, Z_RANGE, BATCH = (32, 32), (24, 24), (1, 4), 8


def _config(server_uri: str, root: Path) -> dict:
    return {
        "seed_everything": 42,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_epochs": 2,
            "limit_train_batches": 4,
            "limit_val_batches": 2,
            "num_sanity_val_steps": 1,
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "default_root_dir": str(root),
        },
        "model": {
            "class_path": f"{MODELS}.RecordedContrastiveModule",
            "init_args": {
                "encoder": {"class_path": f"{MODELS}.SmallEncoder", "init_args": {"in_channels": len(SOURCE)}},
                "loss_function": {"class_path": f"{MODELS}.NTXentLoss", "init_args": {"temperature": 0.5}},
                "lr": 0.01,
                "example_input_array_shape": [2, len(SOURCE), Z_RANGE[1] - Z_RANGE[0], *FINAL],
            },
        },
        "data": {
            "class_path": "cellfeed.client.MultiExperimentDataModule",
            "init_args": {
                "experiments_yaml": "experiments.yml",
                "z_range": list(Z_RANGE),
                "yx_patch_size": list(PATCH),
                "final_yx_patch_size": list(FINAL),
                "val_experiments": ["iohub_05_sharded"],
                "tau_range": [0.5, 1.5],
                "batch_size": BATCH,
                "num_workers": 2,
                "channel_dropout_channels": [1],
                "channel_dropout_prob": 0.5,
                "normalizations": [
                    {
                        "class_path": "cellfeed.client.transforms.NormalizeSampled",
                        "init_args": {"keys": ["ch_0", "ch_1"], "level": "fov_statistics"},
                    }
                ],
                "server": server_uri,
            },
        },
    }


def test_lightningcli_fit_two_epochs_with_validation(serve, tmp_path):
    data = make_ecosystem_data(tmp_path / "data", ("iohub-0.4", "iohub-0.5-sharded"))
    server = serve(data.root)
    config = tmp_path / "fit.yml"
    config.write_text(yaml.safe_dump(_config(server.flight_uri, tmp_path / "run"), sort_keys=False))

    cli = LightningCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=["fit", "--config", str(config)],
        save_config_kwargs={"overwrite": True},
    )
    trainer, model, dm = cli.trainer, cli.model, cli.datamodule
    assert trainer.state.finished and trainer.current_epoch == 2 and trainer.global_step == 8
    assert isinstance(model, ContrastiveModule) and type(dm).__name__ == "MultiExperimentDataModule"  # examples/models.py's
    assert dm.hparams.server == server.flight_uri and dm.normalizations[0].level == "fov_statistics"
    # The model summary ran the example input (a bare tensor) through the DataModule's hook.
    assert model.forward_shapes[0] == (2, len(SOURCE), Z_RANGE[1] - Z_RANGE[0], *FINAL)
    bare, other = torch.zeros(2, 3), {"x": torch.ones(1)}
    assert dm.on_after_batch_transfer(bare, 0) is bare and dm.on_after_batch_transfer(other, 0) is other
    batches = model.forward_shapes[1:]
    assert batches and all(s == (BATCH, len(SOURCE), Z_RANGE[1] - Z_RANGE[0], *FINAL) for s in batches)
    assert len(model.train_losses) == 8
    assert len(model.val_losses) == 1 + 2 * 2  # the sanity check, then two batches after each epoch
    assert all(torch.isfinite(torch.tensor(model.train_losses + model.val_losses)))
    assert torch.isfinite(trainer.callback_metrics["loss/val"])
    assert (tmp_path / "run" / "config.yaml").is_file()  # LightningCLI saved the resolved config
