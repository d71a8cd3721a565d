"""The stack's state file under concurrency: every change made under one lock, every write an atomic
replace. Real processes (forked) contend for the real file; nothing else is started."""

from __future__ import annotations

import fcntl
import json
import multiprocessing
import os
import time
from pathlib import Path

import pytest

from infra.stack.processes import Managed, StackError
from infra.stack.settings import LOCK_FILE, STATE_FILE, Ports, StackState, locked

fork = multiprocessing.get_context("fork")


def new_state(home: Path) -> StackState:
    state = StackState(home, Ports(1, 2, 3), "bucket", "cpu-pool", "gpu-pool")
    state.save()
    return state


def managed(name: str) -> Managed:
    return Managed(name, 1, f"/logs/{name}.log", ["stand-in", name])


def add_entries(barrier, home: Path, writer: int, count: int) -> None:  # in a child process
    barrier.wait()
    for n in range(count):
        with StackState.edit(home) as state:
            state.processes[f"w{writer}-{n}"] = managed(f"w{writer}-{n}")


def rewrite_whole_state(home: Path, rewrites: int, size: int) -> None:  # in a child process
    for n in range(rewrites):
        with StackState.edit(home) as state:
            state.processes = {f"p{i}": managed(f"p{i}-{n}") for i in range(size)}


def test_edits_from_many_processes_at_once_all_land(tmp_path):
    new_state(tmp_path)
    writers, count = 4, 15
    barrier = fork.Barrier(writers)
    children = [fork.Process(target=add_entries, args=(barrier, tmp_path, w, count)) for w in range(writers)]
    for child in children:
        child.start()
    for child in children:
        child.join(timeout=30)
    assert [child.exitcode for child in children] == [0] * writers
    expected = {f"w{w}-{n}" for w in range(writers) for n in range(count)}
    assert set(StackState.load(tmp_path).processes) == expected


def test_an_edit_waits_while_another_holds_the_lock(tmp_path):
    new_state(tmp_path)
    barrier = fork.Barrier(2)
    child = fork.Process(target=add_entries, args=(barrier, tmp_path, 0, 1))
    child.start()  # before locking: a child forked inside would share, and so keep, our lock
    with locked(tmp_path):
        barrier.wait()
        time.sleep(0.3)
        assert child.is_alive() and StackState.load(tmp_path).processes == {}  # it waits for us
    child.join(timeout=10)
    assert child.exitcode == 0 and list(StackState.load(tmp_path).processes) == ["w0-0"]


def test_a_reader_never_sees_a_half_written_state(tmp_path):
    size = 300  # ~40 kB a write: a file written in place is caught empty or part way
    state = new_state(tmp_path)
    state.processes = {f"p{i}": managed(f"p{i}") for i in range(size)}
    state.save()
    writer = fork.Process(target=rewrite_whole_state, args=(tmp_path, 20, size))
    writer.start()
    reads = 0
    while writer.is_alive() or reads == 0:
        assert len(StackState.load(tmp_path).processes) == size  # a torn file would not parse or be short
        reads += 1
    writer.join(timeout=30)
    assert writer.exitcode == 0 and reads > 10
    assert StackState.load(tmp_path).processes["p0"].name == "p0-19"


def test_an_error_in_an_edit_writes_nothing_and_lets_go_of_the_lock(tmp_path):
    new_state(tmp_path)
    before = (tmp_path / STATE_FILE).read_bytes()
    with pytest.raises(RuntimeError), StackState.edit(tmp_path) as state:
        state.processes["half-done"] = managed("half-done")
        raise RuntimeError("the start failed")
    assert (tmp_path / STATE_FILE).read_bytes() == before
    with (tmp_path / LOCK_FILE).open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError if still held


def test_a_failed_write_keeps_the_previous_state_and_leaves_no_temp_file(tmp_path, monkeypatch):
    state = new_state(tmp_path)
    before = (tmp_path / STATE_FILE).read_bytes()
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    state.processes["s3"] = managed("s3")
    with pytest.raises(OSError, match="No space left"):
        state.save()
    assert (tmp_path / STATE_FILE).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [STATE_FILE]
    assert json.loads(before)["processes"] == {}


def test_editing_where_no_stack_was_started_says_how_to_start_one_and_leaves_nothing(tmp_path):
    home = tmp_path / "no-stack"
    with pytest.raises(StackError, match=r"no stack state \(start one with `python -m infra.stack up"), \
            StackState.edit(home):
        pass
    assert not home.exists()
