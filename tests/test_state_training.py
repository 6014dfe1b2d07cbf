"""Arc's STATE (arc-state 0.11.x from PyPI) trains on cellfeed through the cell-load drop-in.

STATE's own entry point (`state tx train`: `load_hydra_config("tx", overrides)` then
`run_tx_train(cfg)`), its own `state_sm` model shrunk by Hydra overrides, and its own trainer,
checkpoints and CSV logger. The only change: `run_tx_train` builds its data module with
`cell_load.utils.modules.get_datamodule`, which looks the class up in
`cell_load.utils.modules.DATA_MODULE_DICT["PerturbationDataModule"]`; that one entry is
monkeypatched to cellfeed's class. The rest is configuration a STATE user writes on the command
line: `+data.kwargs.server=...`; STATE's data defaults (should_yield_control_cells=true among
them) are left as they are. Then `state tx predict` (`run_tx_predict`,
`--predict-only`) on the trained run: it imports `cell_load.data_modules.PerturbationDataModule`
and calls its `load_state`, so that module attribute is the one patched for it.
"""

from __future__ import annotations

import argparse
import math
import pickle

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

from cellfeed.client.cell_load.data_modules import PerturbationDataModule
from tests.test_cell_load_dropin import CONTROL, FILES, N_GENES, TOML, write_screen

state_main = pytest.importorskip("state.__main__")
state_cli = pytest.importorskip("state._cli")
cell_load_modules = pytest.importorskip("cell_load.utils.modules")
cell_load_data_modules = pytest.importorskip("cell_load.data_modules")

STEPS = 6
SENTENCE = 4
BATCH = 3

TINY_STATE = [
    "model=state_sm",
    f"model.kwargs.cell_set_len={SENTENCE}",
    "model.kwargs.hidden_dim=16",
    "model.kwargs.n_encoder_layers=1",
    "model.kwargs.n_decoder_layers=1",
    "model.kwargs.transformer_backbone_kwargs.intermediate_size=32",
    "model.kwargs.transformer_backbone_kwargs.num_hidden_layers=1",
    "model.kwargs.transformer_backbone_kwargs.num_attention_heads=2",
    "model.kwargs.transformer_backbone_kwargs.num_key_value_heads=2",
    "model.kwargs.transformer_backbone_kwargs.head_dim=8",
]


@pytest.mark.slow
def test_state_trains_through_its_own_entry_point(tmp_path, serve, monkeypatch):
    root = tmp_path / "data"
    for seed, (stem, cell_types) in enumerate(FILES.items()):
        write_screen(root / f"{stem}.h5ad", cell_types, seed)
    toml = tmp_path / "replogle.toml"
    toml.write_text(TOML.format(root=root))
    server = serve(root)

    made = []

    class Recorded(PerturbationDataModule):
        """cellfeed's class, noting each instance STATE makes (to check which one trained)."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)
            self.initial = None

        def setup(self, stage=None):
            super().setup(stage)
            if self.trainer is not None and self.initial is None:  # the model before its first step
                self.initial = {k: v.detach().clone() for k, v in self.trainer.lightning_module.state_dict().items()}

    monkeypatch.setitem(cell_load_modules.DATA_MODULE_DICT, "PerturbationDataModule", Recorded)
    out = tmp_path / "runs"
    cfg = state_main.load_hydra_config(
        "tx",
        [
            f"data.kwargs.toml_config_path={toml}",
            f"+data.kwargs.server={server.flight_uri}",
            f"data.kwargs.control_pert={CONTROL}",
            "data.kwargs.num_workers=2",
            *TINY_STATE,
            f"training.batch_size={BATCH}",
            f"training.max_steps={STEPS}",
            "training.val_freq=3",
            "training.ckpt_every_n_steps=3",
            "+training.log_every_n_steps=1",
            "use_wandb=false",
            f"output_dir={out}",
            "name=cellfeed",
        ],
    )
    state_cli.run_tx_train(cfg)

    assert len(made) == 1 and made[0].trainer is not None and made[0].trainer.global_step == STEPS
    run = out / "cellfeed"
    assert (run / "checkpoints" / "final.ckpt").exists()
    metrics = pd.read_csv(next(run.glob("version_*/metrics.csv")))
    train = metrics.dropna(subset=["train_loss"])
    assert len(train) == STEPS and all(math.isfinite(v) for v in train.train_loss)
    assert train.train_loss.nunique() > 1  # a different batch each step
    val = metrics.dropna(subset=["val_loss"])
    assert len(val) == STEPS // 3 and all(math.isfinite(v) for v in val.val_loss)

    # the artefacts STATE writes for prediction come from cellfeed's module, in cell-load's shapes
    with open(run / "var_dims.pkl", "rb") as f:
        var_dims = pickle.load(f)
    assert var_dims["input_dim"] == var_dims["output_dim"] == N_GENES
    assert set(torch.load(run / "pert_onehot_map.pt")) == set(var_dims["pert_names"])
    saved = torch.load(run / "data_module.torch", weights_only=False)
    assert saved["server"] == server.flight_uri and saved["cell_sentence_len"] == SENTENCE
    again = PerturbationDataModule.load_state(run / "data_module.torch")
    again.setup()
    assert again.get_var_dims() == var_dims

    # STATE's optimiser stepped on these batches: trainable weights moved from where they began
    ckpt = torch.load(run / "checkpoints" / "final.ckpt", weights_only=False)
    assert ckpt["global_step"] == STEPS
    trained = ckpt["state_dict"]
    moved = [k for k, v in made[0].initial.items() if v.is_floating_point() and not torch.equal(v, trained[k])]
    assert any(k.startswith("pert_encoder") for k in moved) and any(k.startswith("basal_encoder") for k in moved)

    # `state tx predict --predict-only`: STATE's test loop over the drop-in's test sentences
    monkeypatch.setattr(cell_load_data_modules, "PerturbationDataModule", PerturbationDataModule)
    args = argparse.Namespace(
        output_dir=str(run), toml=None, checkpoint="final.ckpt", test_time_finetune=0, profile="full", predict_only=True,
        skip_adatas=False, shared_only=False, eval_train_data=False, pseudobulk=False,
    )
    state_cli.run_tx_predict(args)
    real = ad.read_h5ad(run / "eval_final.ckpt" / "adata_real.h5ad")
    pred = ad.read_h5ad(run / "eval_final.ckpt" / "adata_pred.h5ad")
    cells = pd.concat([ad.read_h5ad(root / f"{stem}.h5ad").to_df().join(ad.read_h5ad(root / f"{stem}.h5ad").obs) for stem in FILES])
    # the TOML's test split: rpe1's fewshot test targets, and (control cells as items) rpe1's controls
    test_cells = cells[(cells.cell_type == "rpe1") & cells.gene.isin(["G001", "G002", CONTROL])]
    assert sorted(real.obs.pert_cell_barcode) == sorted(test_cells.index)  # each test cell once
    genes = [f"gene{j}" for j in range(N_GENES)]
    # STATE's real cells are the served rows (its clipping to [0, 14] leaves these values, all in [0, 10])
    expected = test_cells.loc[real.obs.pert_cell_barcode, genes].to_numpy(np.float32)
    np.testing.assert_array_equal(np.asarray(real.X), expected)
    assert pred.shape == real.shape and np.isfinite(np.asarray(pred.X)).all()


@pytest.mark.slow
def test_state_command_line_through_the_launcher(tmp_path, serve):
    """`python -m cellfeed.client.cell_load.state tx train ...` then `... tx predict`: STATE's own
    command line (its main()), in a fresh process, with the launcher's two patches only."""
    import subprocess
    import sys

    root = tmp_path / "data"
    for seed, (stem, cell_types) in enumerate(FILES.items()):
        write_screen(root / f"{stem}.h5ad", cell_types, seed)
    toml = tmp_path / "replogle.toml"
    toml.write_text(TOML.format(root=root))
    server = serve(root)
    out = tmp_path / "runs"
    launcher = [sys.executable, "-m", "cellfeed.client.cell_load.state", "tx"]
    train = [
        "train", f"data.kwargs.toml_config_path={toml}", f"+data.kwargs.server={server.flight_uri}",
        f"data.kwargs.control_pert={CONTROL}", "data.kwargs.num_workers=1",
        *TINY_STATE, f"training.batch_size={BATCH}", "training.max_steps=2", "training.val_freq=2",
        "training.ckpt_every_n_steps=2", "use_wandb=false", f"output_dir={out}", "name=cli",
    ]
    done = subprocess.run(launcher + train, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run = out / "cli"
    assert torch.load(run / "data_module.torch", weights_only=False)["server"] == server.flight_uri
    assert torch.load(run / "checkpoints" / "final.ckpt", weights_only=False)["global_step"] == 2
    predict = ["predict", "--output-dir", str(run), "--checkpoint", "final.ckpt", "--predict-only"]
    done = subprocess.run(launcher + predict, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    real = ad.read_h5ad(run / "eval_final.ckpt" / "adata_real.h5ad")
    assert set(real.obs.gene) == {"G001", "G002", CONTROL} and set(real.obs.cell_type) == {"rpe1"}
