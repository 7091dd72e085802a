"""Plain PyTorch networks: no Lightning, no polars, no files."""
