"""Parquet tables (preprocessing outputs) streamed row-wise: config, sampler, source."""
