"""Background processes the stack owns: started in their own session (so stopping one stops its
children too, e.g. uvicorn workers), logged to a file each, and stopped by PID."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


class StackError(RuntimeError):
    """A service would not start or stop; the message says which and where its log is."""


@dataclass
class Managed:
    name: str
    pid: int
    log: str
    command: list[str]  # never holds a secret: credentials travel in the environment

    def to_json(self) -> dict:
        return asdict(self)


def start(name: str, command: list[str], env: dict[str, str], logs: Path, cwd: Path | None = None) -> Managed:
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{name}.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    return Managed(name, proc.pid, str(log), command)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped by us) counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def group_alive(pgid: int) -> bool:
    """Whether any live (not zombie) process is left in process group `pgid` (Linux /proc)."""
    proc = Path("/proc")
    if not proc.is_dir():
        return alive(pgid)
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:  # state, ppid, pgrp
            return True
    return False


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def stop(proc: Managed, grace: float = 10.0) -> bool:
    """SIGINT, then SIGINT again and SIGTERM (a Prefect worker shrugs off the first signal), then
    SIGKILL, each to the whole process group, until no member is left (the leader going first is
    not enough: a child may still be dying). True when something was running."""
    if not group_alive(proc.pid):
        return False
    for sig, wait in ((signal.SIGINT, grace), (signal.SIGINT, 2.0), (signal.SIGTERM, 3.0), (signal.SIGKILL, 3.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            _reap(proc.pid)
            if not group_alive(proc.pid):
                return True
            time.sleep(0.1)
    _reap(proc.pid)
    if group_alive(proc.pid):
        raise StackError(f"{proc.name} (pid {proc.pid}) did not stop")
    return True


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        return sock.connect_ex((host, port)) == 0


def wait_until(proc: Managed, ready: Callable[[], bool], what: str, timeout: float) -> None:
    """Poll `ready` until it holds; fails early, with the log's tail, if the process dies, and
    after `timeout` seconds. `ready` returns False (or raises OSError) while not there yet."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(proc.pid):
            raise StackError(f"{proc.name} exited while starting; last lines of {proc.log}:\n{tail(proc.log)}")
        try:
            if ready():
                return
        except OSError:
            pass
        time.sleep(0.3)
    raise StackError(f"{proc.name}: {what} not within {timeout:.0f} s; see {proc.log}:\n{tail(proc.log)}")


def answers(url: str, body: bytes | None = None) -> Any:
    """The JSON (or True) a 2xx reply to GET url (POST with body) carries; OSError when none."""
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as reply:
        data = reply.read()
        return json.loads(data) if data and body is not None else True


def stopped_unless(proc: Managed, wait: Callable[[], None]) -> Managed:
    """`proc` once `wait` returns; if it raises, the process is stopped first, so a failed start
    leaves nothing behind that the stack's state does not know of."""
    try:
        wait()
    except BaseException:
        stop(proc, grace=2.0)
        raise
    return proc


def wait_http(proc: Managed, url: str, timeout: float) -> None:
    wait_until(proc, lambda: answers(url), f"no answer from {url}", timeout)


def tail(path: str, lines: int = 20) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
