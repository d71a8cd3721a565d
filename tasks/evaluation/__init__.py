"""Evaluation helpers of the `evaluate` stage, each module importable without torch:

- `answers`: final-answer extraction and matching, well-formed `<think>` blocks (`thinking`).
- `structured`: JSON validity, SNIPS intent and slot scores, normalised SQL match (`syntax`).
- `text`: ROUGE-L and reply-length statistics (`instructions`).
- `batching`: generation in batches that shrink on out-of-memory.
- `forgetting`: the forgetting matrix across stages, as CSV and heatmap.

The scoring modules are pure Python on strings, so they are tested on the real data sets directly.
"""
