"""bench/copy_distance.py: its rows put the copy `distance` tokens into the row and train on the copy only."""

from __future__ import annotations

import torch

from bench.copy_distance import AGAIN, COPY_LENGTH, START, copy_rows, train_at


def test_rows_hold_the_copy_after_the_filler_and_train_on_it_alone():
    ids, labels = copy_rows(torch.Generator().manual_seed(0), rows=3, distance=7)
    assert ids.shape == (3, 7 + 2 * COPY_LENGTH + 2)
    assert (ids[:, 7] == START).all() and (ids[:, 7 + COPY_LENGTH + 1] == AGAIN).all()
    assert torch.equal(ids[:, 8:8 + COPY_LENGTH], ids[:, -COPY_LENGTH:])
    assert (labels[:, :-COPY_LENGTH] == -100).all() and torch.equal(labels[:, -COPY_LENGTH:], ids[:, -COPY_LENGTH:])


def test_a_distance_trains_and_reports_on_the_tiny_architecture():
    result = train_at(distance=3, steps=2, overrides={})
    assert result["distance"] == 3 and result["copy_loss"] > 0 and 0 <= result["copy_accuracy"] <= 1
