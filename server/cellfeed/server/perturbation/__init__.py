"""Perturbation scRNA-seq: configs, file layouts, embeddings."""
