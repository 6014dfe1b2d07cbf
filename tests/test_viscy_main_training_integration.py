"""Port of VisCy main's `applications/dynaclr/tests/test_training_integration.py` (mehta-lab/VisCy,
branch main, commit 4b62365c0df25929bffc7f01b3bb2d1c11d69cce): ContrastiveModule through
`Trainer(fast_dev_run=True).fit`, and the training configs' class paths resolve.

VisCy trains on a synthetic in-process DataModule; here the DataModule is cellfeed's, in VisCy
main's form (collection YAML, bag of channels, grouped by marker), fed by a real `cellfeed serve`
on loopback over iohub plates. The model is examples/models.py's ContrastiveModule with VisCy's
flattening test encoder (tests/fixtures/contrastive.py). The configs are cellfeed's own: the
DynaCLR recipe examples/dynaclr.yaml and the main-form LightningCLI block of docs/dynaclr.md.
No counterpart: `test_contrastive_fast_dev_run` trains with `nn.TripletMarginLoss` on streamed
negatives, and cellfeed streams anchor/positive pairs only (in-batch negatives, as NT-Xent uses).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Trainer, seed_everything

from tests.fixtures.configs import class_paths, resolve_class_path
from tests.fixtures.contrastive import FlatEncoder, NTXentLoss, RecordedContrastiveModule
from tests.fixtures.viscy_main_ports import main_entry, main_ported_server

REPO = Path(__file__).resolve().parents[1]
FINAL = (16, 16)


@pytest.fixture(scope="module")
def ported(tmp_path_factory):
    with main_ported_server(tmp_path_factory, "viscy-main-training") as p:
        yield p


def test_contrastive_ntxent_fast_dev_run(ported, tmp_path):
    seed_everything(42)
    folder = ported.folder("fit")
    entries = [main_entry(folder, name, ["Phase", marker], ["A/1", "B/1"], {"control": ["A/1"], "treated": ["B/1"]}, seed=i,
                          channels=[{"name": "Phase", "marker": "Phase"}, {"name": marker, "marker": marker}])
               for i, (name, marker) in enumerate((("exp_a", "GFP"), ("exp_b", "Mito")))]
    dm = ported.datamodule(entries, tau_range=(0.5, 2.0), yx_patch_size=(24, 24), final_yx_patch_size=FINAL, batch_size=4,
                           split_ratio=0.5, channels_per_sample=1, batch_group_by="marker", num_workers=1,
                           channel_dropout_prob=0.0)  # VisCy main's default (cellfeed's is 0.5 on channel 1, see docs)
    module = RecordedContrastiveModule(FlatEncoder(1 * 1 * FINAL[0] * FINAL[1]), NTXentLoss(), lr=1e-3,
                                       example_input_array_shape=(1, 1, 1, *FINAL))
    trainer = Trainer(fast_dev_run=True, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=dm)
    assert trainer.state.finished is True and trainer.state.status == "finished"
    assert len(module.train_losses) == 1 and len(module.val_losses) == 1
    assert all(torch.isfinite(torch.tensor(module.train_losses + module.val_losses)))
    assert (4, 1, 1, *FINAL) in module.forward_shapes


def _docs_main_config() -> dict:
    doc = (REPO / "docs" / "dynaclr.md").read_text()
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", doc, flags=re.S) if "class_path" in b]
    return next(b for b in blocks if "collection_yaml" in b["data"]["init_args"])


@pytest.mark.parametrize("config_name", ["examples/dynaclr.yaml", "docs/dynaclr.md (main form)"])
def test_config_class_paths_resolve(config_name):
    if config_name.startswith("docs"):
        config = _docs_main_config()
    else:
        config = yaml.safe_load((REPO / config_name).read_text())
    paths = class_paths(config)
    assert paths, f"no class_path in {config_name}"
    for path in paths:
        assert resolve_class_path(path, {"models": "examples.models"}) is not None, path
