"""Recipes shipped with slimlm (`default.yaml` is what `slimlm run` runs without arguments)."""
