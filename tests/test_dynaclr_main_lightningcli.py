"""`fit` through LightningCLI in VisCy main's form (collection YAML, focus-centred Z window with a
MIP for a 2D-style input, bag of channels grouped by marker, FOV-level split, labels), against a
real server on iohub plates, with examples/models.py's ContrastiveModule (recorded by tests/fixtures/contrastive.py)."""

from __future__ import annotations

import torch
import yaml
from lightning.pytorch.cli import LightningCLI

from tests.fixtures.contrastive import MODELS
from tests.fixtures.dynaclr_main import write_main_data

BATCH, FINAL = 8, (24, 24)


def test_lightningcli_fit_in_the_main_form(serve, tmp_path):
    root, _ = write_main_data(tmp_path / "data")
    server = serve(root)
    config = {
        "seed_everything": 7,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_epochs": 2, "limit_train_batches": 3, "limit_val_batches": 2,
            "num_sanity_val_steps": 1, "logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
            "default_root_dir": str(tmp_path / "run"),
        },
        "model": {
            "class_path": f"{MODELS}.RecordedContrastiveModule",
            "init_args": {
                "encoder": {"class_path": f"{MODELS}.SmallEncoder", "init_args": {"in_channels": 1}},
                "loss_function": {"class_path": f"{MODELS}.NTXentLoss", "init_args": {"temperature": 0.5}},
                "lr": 0.01,
                "example_input_array_shape": [2, 1, 1, *FINAL],
            },
        },
        "data": {
            "class_path": "cellfeed.client.MultiExperimentDataModule",
            "init_args": {
                "collection_yaml": "collection.yml",
                "z_window": 1,
                "z_extraction_window": 3,
                "focus_channel": "Phase3D",
                "z_reduction": "mip",
                "yx_patch_size": [32, 32],
                "final_yx_patch_size": list(FINAL),
                "split_ratio": 0.5,
                "tau_range": [0.5, 1.5],
                "batch_size": BATCH,
                "num_workers": 2,
                "batch_group_by": "marker",
                "stratify_by": ["perturbation"],
                "channels_per_sample": 1,
                "label_columns": {"perturbation_label": "perturbation"},
                "channel_dropout_channels": [0],
                "channel_dropout_prob": 0.0,
                "normalizations": [
                    {"class_path": "cellfeed.client.transforms.NormalizeSampled",
                     "init_args": {"keys": ["channel_0"], "level": "timepoint_statistics"}}
                ],
                "server": server.flight_uri,
            },
        },
    }
    path = tmp_path / "fit.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    cli = LightningCLI(subclass_mode_model=True, subclass_mode_data=True, args=["fit", "--config", str(path)],
                       save_config_kwargs={"overwrite": True})
    trainer, model, dm = cli.trainer, cli.model, cli.datamodule
    assert trainer.state.finished and trainer.current_epoch == 2 and trainer.global_step == 6
    assert dm.info["split_mode"] == "fov" and dm.channel_keys == ["channel_0"]
    assert model.forward_shapes[1:] and all(s == (BATCH, 1, 1, *FINAL) for s in model.forward_shapes[1:])
    assert len(model.val_losses) == 1 + 2 * 2
    assert all(torch.isfinite(torch.tensor(model.train_losses + model.val_losses)))
