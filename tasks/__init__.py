"""Pipeline steps: one module per DVC stage (`python -m tasks.<step>`), each with a pure
function that does the work, a thin Prefect task around it, and a `__main__` that DVC calls."""
