"""h5ad to training-ready parquet (cell sentences, age, donor-level split) and the sort job.

Each module does one step; `pipeline.py` chains them per file, `cli.py` is the command line.
"""
