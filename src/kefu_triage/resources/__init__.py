"""Package data: generator seeds and templates, and the Hydra config groups shipped with the wheel."""
