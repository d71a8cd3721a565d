"""The curriculum ablation: variants of params.yaml, their runs, the verdict and its reports (flows/ablation.py runs it)."""
