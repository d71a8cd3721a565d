"""infra.stack's own behaviour, without starting the servers: clear refusals, stopping by PID,
a client environment that carries no secret, and workers started at once all recorded (with a
stand-in for the Prefect worker)."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from infra.stack import services
from infra.stack.__main__ import main
from infra.stack.processes import Managed, alive, start, stop
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


def stand_in_worker(state: StackState, pool: str, workspace: Path) -> Managed:
    """services.start_worker without a Prefect server: a process that runs until stopped, returned
    after a pause, as the real one returns once the worker is online. Its PID goes to `started`,
    so the test can tell (and clean up) a worker the state lost."""
    # SIGINT back to its default: a process inherits an ignored SIGINT (as this test process may
    # have, after other tests), and `down` would then wait out its grace period for each stand-in.
    command = [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGINT, signal.SIG_DFL); time.sleep(300)"]
    proc = start(f"worker-{pool}", command, dict(os.environ), state.home / "logs", cwd=workspace)
    with (state.home / "started").open("a") as started:
        started.write(f"{proc.pid}\n")
    time.sleep(0.02)
    return proc


def run_worker_command(barrier, home: Path, pool: str) -> None:  # in a child process
    barrier.wait()
    sys.exit(main(["--home", str(home), "worker", "--pool", pool, "--workspace", str(home)]))


def started_pids(home: Path) -> list[int]:
    started = home / "started"
    return [int(pid) for pid in started.read_text().split()] if started.exists() else []


@pytest.fixture
def stack_home(tmp_path, monkeypatch):
    """A stack state with no servers, whose `worker` command starts stand-ins; every stand-in is
    killed at the end, recorded or not."""
    monkeypatch.setattr(services, "start_worker", stand_in_worker)
    StackState(tmp_path, Ports(1, 2, 3), "bucket", "cpu-pool", "gpu-pool").save()
    yield tmp_path
    for pid in filter(alive, started_pids(tmp_path)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)


def test_workers_started_at_the_same_moment_are_all_recorded_and_down_stops_them_all(stack_home):
    fork = multiprocessing.get_context("fork")  # the children keep the stand-in worker
    rounds, exit_codes = 10, []
    for round_ in range(rounds):  # a race a round: one is likely lost, unless the state is locked
        barrier = fork.Barrier(2)
        commands = [fork.Process(target=run_worker_command, args=(barrier, stack_home, f"{kind}-{round_}"))
                    for kind in ("cpu", "gpu")]
        for command in commands:
            command.start()
        for command in commands:
            command.join(timeout=30)
            exit_codes.append(command.exitcode)
    started = started_pids(stack_home)
    recorded = StackState.load(stack_home).processes
    assert len(started) == 2 * rounds
    assert sorted(p.pid for p in recorded.values()) == sorted(started)  # none lost
    assert exit_codes == [0] * 2 * rounds
    assert all(alive(pid) for pid in started)
    done = stack_cli(stack_home, "down")
    assert done.returncode == 0, done.stderr
    assert all(f"(pid {pid})" in done.stdout for pid in started)
    assert not any(alive(pid) for pid in started)
    assert StackState.load(stack_home).processes == {}


def test_a_second_worker_for_a_running_pool_is_stopped_and_the_first_kept(stack_home, capsys):
    command = ["--home", str(stack_home), "worker", "--pool", "cpu", "--workspace", str(stack_home)]
    assert main(command) == 0
    assert main(command) == 1
    first, second = started_pids(stack_home)
    assert f"worker-cpu already runs (pid {first})" in capsys.readouterr().err
    assert [p.pid for p in StackState.load(stack_home).processes.values()] == [first]
    assert alive(first) and not alive(second)
