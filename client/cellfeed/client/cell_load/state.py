"""Run Arc's STATE (`state ...`, arc-state) with cellfeed's cell-load drop-in.

    python -m cellfeed.client.cell_load.state tx train data.kwargs.toml_config_path=exp.toml \\
        +data.kwargs.server=grpc://feeder:8815 data.kwargs.should_yield_control_cells=false ...

is `state tx train ...` with the two places STATE finds cell-load's class pointed at cellfeed's
(docs/cell-load.md); nothing else in STATE changes. `use_cellfeed()` does the same in-process.
"""

from __future__ import annotations

import sys

from cellfeed.client.cell_load.data_modules import PerturbationDataModule


def use_cellfeed() -> dict[str, type]:
    """Point cell-load's lookups at cellfeed's class; returns the classes it replaced."""
    import cell_load.data_modules
    import cell_load.utils.modules

    replaced = {
        "cell_load.utils.modules.DATA_MODULE_DICT['PerturbationDataModule']": cell_load.utils.modules.DATA_MODULE_DICT[
            "PerturbationDataModule"
        ],
        "cell_load.data_modules.PerturbationDataModule": cell_load.data_modules.PerturbationDataModule,
    }
    # `state tx train` builds its module with get_datamodule (this dict); `state tx predict`
    # imports cell_load.data_modules.PerturbationDataModule and calls load_state
    cell_load.utils.modules.DATA_MODULE_DICT["PerturbationDataModule"] = PerturbationDataModule
    cell_load.data_modules.PerturbationDataModule = PerturbationDataModule
    return replaced


def main() -> None:
    use_cellfeed()
    from state.__main__ import main as state_main

    sys.argv[0] = "state"
    state_main()


if __name__ == "__main__":
    main()
