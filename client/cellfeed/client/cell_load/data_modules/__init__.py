"""`cell_load.data_modules` on a cellfeed server."""

from cellfeed.client.cell_load.data_modules.perturbation_dataloader import PerturbationDataModule

__all__ = ["PerturbationDataModule"]
