"""Data side of the pipeline: reading sources, mapping them to stage records, cleaning, packing."""
