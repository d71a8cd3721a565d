"""Handing memory the process has freed back to the operating system.

glibc's malloc keeps freed blocks in its heaps for reuse, and a heap shrinks only from its top:
after `prepare` drops a stage's records and token batches (allocated from several threads, so
spread over several arenas), the resident size stays at its high-water mark and the next stage's
rows and packing are added on top. `malloc_trim(0)` returns every free page of every arena.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

log = logging.getLogger(__name__)


@functools.cache
def _malloc_trim():
    """glibc's `malloc_trim`, or None (macOS, musl: nothing to call, nothing lost but memory)."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


def release_free_memory() -> bool:
    """Return freed heap pages to the OS; True when the C library could (glibc)."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
