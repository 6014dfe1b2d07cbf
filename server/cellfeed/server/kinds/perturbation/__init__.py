"""Perturbation scRNA-seq (protoplast and cell-load): configs, file layouts, sampler, source."""
