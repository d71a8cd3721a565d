"""Batches that shrink on out-of-memory instead of crashing an evaluation."""

from __future__ import annotations

import logging
from typing import Callable, Sequence, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")


def is_out_of_memory(error: BaseException) -> bool:
    import torch

    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


def run_in_batches(items: Sequence[T], batch_size: int, run: Callable[[Sequence[T]], list[R]]) -> list[R]:
    """`run` over consecutive batches; on out-of-memory the batch is halved and retried (down to
    one item, which then re-raises). The smaller size is kept for the batches that follow."""
    out: list[R] = []
    i, size = 0, max(1, batch_size)
    while i < len(items):
        batch = items[i : i + size]
        try:
            out += run(batch)
        except (RuntimeError, MemoryError) as error:
            if size == 1 or not is_out_of_memory(error):
                raise
            size = max(1, size // 2)
            log.warning("out of memory with a batch of %d: retrying with %d", len(batch), size)
            _free_cache()
            continue
        i += len(batch)
    return out


def _free_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
