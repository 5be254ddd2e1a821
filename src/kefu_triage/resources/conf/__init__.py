"""Hydra config groups shipped in the package (model, taxonomy, regress); configs/ adds them via searchpath."""
