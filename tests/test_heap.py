"""Freed memory goes back to the OS when the C library can do it (glibc's malloc_trim)."""

from __future__ import annotations

import platform
import threading

import pytest

from tasks.core.heap import release_free_memory

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


@pytest.mark.skipif(not GLIBC, reason="malloc_trim is glibc's")
def test_memory_freed_in_a_thread_is_returned_to_the_os():
    """Small objects made in a worker thread live in that thread's malloc arena; once freed, the
    arena keeps them resident until trimmed (what prepare's token batches did)."""
    kept: list = []

    def allocate() -> None:
        kept.extend(bytearray(16_000) for _ in range(12_500))  # 200 MB in blocks under mmap's threshold

    worker = threading.Thread(target=allocate)
    worker.start()
    worker.join()
    del kept[1::2]  # every other block: no run of free pages at a heap's top to give back by itself
    before = resident_bytes()
    assert release_free_memory() is True
    assert before - resident_bytes() > 50_000_000


def test_release_is_a_no_op_without_glibc(monkeypatch):
    from tasks.core import heap

    monkeypatch.setattr(heap, "_malloc_trim", lambda: None)
    assert release_free_memory() is False
