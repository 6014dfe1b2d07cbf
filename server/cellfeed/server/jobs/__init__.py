"""Preprocessing jobs: records in SQLite, an executor (in-process or Dask), and the REST router."""
