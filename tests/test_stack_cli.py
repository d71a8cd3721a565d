"""infra.stack's own behaviour, without starting the servers: clear refusals, stopping by PID,
and a client environment that carries no secret."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from infra.stack.processes import alive, start, stop
from infra.stack.settings import Ports, StackState

PROJECT = Path(__file__).resolve().parents[1]


def stack_cli(home: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "infra.stack", "--home", str(home), *args], cwd=PROJECT,
                          env=env or dict(os.environ), capture_output=True, text=True, timeout=120)


def test_up_without_credentials_names_them_and_leaves_nothing_running(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    done = stack_cli(tmp_path, "up", "--free-ports", env=env)
    assert done.returncode == 1
    assert "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the environment" in done.stderr
    assert StackState.load(tmp_path).processes == {}


def test_up_refuses_a_port_in_use(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        env = dict(os.environ, STAGEWISE_MLFLOW_PORT=str(port), AWS_ACCESS_KEY_ID="k", AWS_SECRET_ACCESS_KEY="s")
        done = stack_cli(tmp_path, "up", env=env)
    assert done.returncode == 1
    assert f"mlflow {port}" in done.stderr and "--free-ports" in done.stderr


def test_commands_need_a_started_stack(tmp_path):
    done = stack_cli(tmp_path, "status")
    assert done.returncode == 1 and "no stack state" in done.stderr


def test_stop_ends_the_whole_process_group_even_one_that_ignores_sigint(tmp_path):
    script = "import signal, subprocess, time; signal.signal(signal.SIGINT, signal.SIG_IGN); " \
             "subprocess.Popen(['sleep', '300']); time.sleep(300)"
    proc = start("stubborn", [sys.executable, "-c", script], dict(os.environ), tmp_path)
    children = []
    for _ in range(50):
        children = subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True, text=True).stdout.split()
        if len(children) == 2:
            break
        subprocess.run(["sleep", "0.1"])
    assert len(children) == 2
    assert stop(proc, grace=0.5) is True
    assert not any(alive(int(pid)) for pid in children)
    assert stop(proc) is False  # already gone


def test_the_client_environment_carries_no_secret(monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIA-must-not-leak")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-must-not-leak")
    state = StackState(tmp_path, Ports(1, 2, 3), "bucket", "cpu", "gpu")
    env = state.client_env()
    assert env["AWS_ENDPOINT_URL"] == "http://127.0.0.1:3" and env["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:2"
    assert not any("must-not-leak" in v for v in env.values())
    state.save()
    assert "must-not-leak" not in (tmp_path / "stack.json").read_text()


@pytest.mark.parametrize("free", [True, False])
def test_ports_come_from_the_environment_or_are_picked_free(monkeypatch, free):
    monkeypatch.setenv("STAGEWISE_PREFECT_PORT", "14200")
    ports = Ports.from_env(free)
    assert (ports.prefect != 14200) if free else (ports == Ports(14200, 5000, 9000))


def test_a_service_that_fails_to_start_is_stopped_not_left_behind(tmp_path):
    env = dict(os.environ, AWS_ACCESS_KEY_ID="k1", AWS_SECRET_ACCESS_KEY="s1")  # too short for rclone
    done = stack_cli(tmp_path, "up", "--free-ports", env=env)
    assert done.returncode == 1 and "refused the keys in AWS_ACCESS_KEY_ID" in done.stderr
    left = subprocess.run(["pgrep", "-f", f"rclone serve s3 .*{tmp_path}"], capture_output=True, text=True).stdout
    assert left == ""
    assert StackState.load(tmp_path).processes == {}
