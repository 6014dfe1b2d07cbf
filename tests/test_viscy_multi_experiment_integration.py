"""Port of VisCy's `applications/dynaclr/tests/test_multi_experiment_integration.py`
(mehta-lab/VisCy, branch app-dynaclr, commit 0d04b3504d6c621191e88a98ab0de7e6baa7e8e0): two
experiments with different channel sets through a real Lightning `fit` (fast_dev_run), plain and
with every sampling axis on; and the config's class paths resolve.

The DataModule is cellfeed's, fed by a real server on loopback over iohub plates. The model is
examples/models.py's ContrastiveModule (tests/fixtures/contrastive.py; VisCy's ContrastiveModule
and NTXentHCL are not dependencies of cellfeed); it trains on a flattening encoder of the final
patch as VisCy's SimpleEncoder does (`FlatEncoder`). The config whose class paths must
resolve is the LightningCLI example in docs/dynaclr.md (cellfeed's counterpart of VisCy's
`configs/training/multi_experiment_fit.yml`).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from lightning.pytorch import Trainer, seed_everything

from tests.fixtures.configs import class_paths, resolve_class_path
from tests.fixtures.contrastive import FlatEncoder, NTXentLoss, RecordedContrastiveModule
from tests.fixtures.viscy_ports import make_experiment, ported_server

C, Z, Y, X = 2, 1, 24, 24


@pytest.fixture(scope="module")
def ported(tmp_path_factory):
    with ported_server(tmp_path_factory, "viscy-integration") as p:
        yield p


def _fit(ported, entries, tmp_path, **kw) -> tuple[Trainer, RecordedContrastiveModule]:
    seed_everything(42)
    dm = ported.datamodule(entries, z_range=(0, 1), yx_patch_size=(32, 32), final_yx_patch_size=(24, 24),
                           val_experiments=["exp_beta"], tau_range=(0.5, 2.0), batch_size=4, num_workers=1,
                           channel_dropout_channels=[1], channel_dropout_prob=0.5, **kw)
    module = RecordedContrastiveModule(FlatEncoder(C * Z * Y * X), NTXentLoss(temperature=0.07), lr=1e-3, example_input_array_shape=(1, C, Z, Y, X))
    trainer = Trainer(fast_dev_run=True, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=dm)
    return trainer, module


def test_multi_experiment_fast_dev_run(ported, tmp_path):
    folder = ported.folder("plain")
    entries = [
        make_experiment(folder, "exp_alpha", ["Phase3D", "GFP", "Mito"], ["A/1"], {"control": ["A/1"]},
                        source_channel=["Phase3D", "GFP"], seed=1),
        make_experiment(folder, "exp_beta", ["Phase3D", "RFP", "StressGranules"], ["B/1"], {"control": ["B/1"]},
                        source_channel=["Phase3D", "RFP"], seed=2),
    ]
    trainer, module = _fit(ported, entries, tmp_path, experiment_aware=True, condition_balanced=False, temporal_enrichment=False)
    assert trainer.state.finished is True and trainer.state.status == "finished"
    assert module.train_losses and module.val_losses
    assert (4, C, Z, Y, X) in module.forward_shapes


def test_multi_experiment_fast_dev_run_with_all_sampling_axes(ported, tmp_path):
    folder = ported.folder("axes")
    entries = [
        make_experiment(folder, "exp_alpha", ["Phase3D", "GFP", "Mito"], ["A/1", "A/2"],
                        {"uninfected": ["A/1"], "infected": ["A/2"]}, source_channel=["Phase3D", "GFP"], seed=1),
        make_experiment(folder, "exp_beta", ["Phase3D", "RFP", "StressGranules"], ["B/1", "B/2"],
                        {"uninfected": ["B/1"], "infected": ["B/2"]}, source_channel=["Phase3D", "RFP"], seed=2),
    ]
    trainer, module = _fit(ported, entries, tmp_path, experiment_aware=True, condition_balanced=True, temporal_enrichment=True,
                           temporal_window_hours=2.0, temporal_global_fraction=0.3)
    assert trainer.state.finished is True and trainer.state.status == "finished"
    assert module.train_losses and module.val_losses


def test_multi_experiment_config_class_paths_resolve():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "dynaclr.md").read_text()
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", doc, flags=re.S) if "class_path" in b]
    paths = [p for block in blocks for p in class_paths(block)]
    assert "cellfeed.client.MultiExperimentDataModule" in paths
    for path in paths:
        assert resolve_class_path(path) is not None, path
