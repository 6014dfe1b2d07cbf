"""The old name of preprocess.folders (the pipeline's folders, not a layout of rows); kept only
while kinds/table/source.py imports chunk_dirs from here."""

from cellfeed.server.preprocess.folders import SPLITS, RunFolders, chunk_dirs, dataset_name, find_inputs

Layout = RunFolders

__all__ = ["SPLITS", "Layout", "RunFolders", "chunk_dirs", "dataset_name", "find_inputs"]
