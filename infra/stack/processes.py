"""Background processes the stack owns: started in their own session (so stopping one stops its
children too, e.g. uvicorn workers), logged to a file each, and stopped by PID."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path


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


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def stop(proc: Managed, grace: float = 10.0) -> bool:
    """SIGINT, then SIGINT again and SIGTERM (a Prefect worker shrugs off the first signal), then
    SIGKILL, each to the whole process group. True when it was running."""
    if not alive(proc.pid):
        return False
    for sig, wait in ((signal.SIGINT, grace), (signal.SIGINT, 2.0), (signal.SIGTERM, 3.0), (signal.SIGKILL, 3.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            _reap(proc.pid)
            if not alive(proc.pid):
                return True
            time.sleep(0.1)
    _reap(proc.pid)
    if alive(proc.pid):
        raise StackError(f"{proc.name} (pid {proc.pid}) did not stop")
    return True


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        return sock.connect_ex((host, port)) == 0


def wait_http(proc: Managed, url: str, timeout: float) -> None:
    """Until `url` answers 2xx; fails early, with the log's tail, if the process dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(proc.pid):
            raise StackError(f"{proc.name} exited while starting; last lines of {proc.log}:\n{tail(proc.log)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                if 200 <= reply.status < 300:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(0.3)
    raise StackError(f"{proc.name} did not answer {url} within {timeout:.0f} s; see {proc.log}:\n{tail(proc.log)}")


def tail(path: str, lines: int = 20) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
