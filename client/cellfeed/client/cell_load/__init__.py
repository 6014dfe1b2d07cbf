"""cell-load's API on a cellfeed server: `from cellfeed.client.cell_load.data_modules import PerturbationDataModule`.

Mirrors `cell_load` 0.10.4's import paths (docs/cell-load.md).
"""

from cellfeed.client.cell_load.data_modules import PerturbationDataModule

__all__ = ["PerturbationDataModule"]
