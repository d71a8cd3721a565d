"""Shared pieces of the pipeline steps: typed config, paths, record I/O, model loading."""
