"""Start and stop the scale-out stack on this machine, on loopback, for real.

    export AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=...      # any values: they become the S3 keys
    python -m infra.stack up --home .stack [--free-ports]       # S3 store, MLflow server, Prefect server
    eval "$(python -m infra.stack env --home .stack)"           # point clients at it
    python -m infra.stack workspace --home .stack --repo . ../ws-cpu     # a clone wired to the DVC remote
    python -m infra.stack workspace --home .stack --repo . ../ws-gpu
    python -m infra.stack deploy --home .stack --cpu-workspace ../ws-cpu --gpu-workspace ../ws-gpu
    python -m infra.stack worker --home .stack --pool cpu-pool --workspace ../ws-cpu
    python -m infra.stack worker --home .stack --pool gpu-pool --workspace ../ws-gpu
    python -m infra.stack down --home .stack                    # stops every PID it started

Ports come from STAGEWISE_{PREFECT,MLFLOW,S3}_PORT (defaults 4200, 5000, 9000) or `--free-ports`.
The state (ports, URLs, PIDs, log files) is in <home>/stack.json; logs in <home>/logs/. Commands
may run at once (both workers in two terminals): each change to the state is made under a lock.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from infra.stack import services
from infra.stack.processes import Managed, StackError, alive, port_in_use, stop
from infra.stack.settings import Ports, StackState, locked

STOP_ORDER = ("worker-", "prefect", "mlflow", "s3")


def up(args) -> StackState:
    ports = Ports.from_env(args.free_ports)
    busy = [f"{name} {port}" for name, port in vars(ports).items() if port_in_use(port)]
    if busy:
        raise StackError(f"port(s) in use on 127.0.0.1: {', '.join(busy)}; set STAGEWISE_*_PORT or pass --free-ports")
    state = StackState(Path(args.home).resolve(), ports, args.bucket, args.cpu_pool, args.gpu_pool)
    with locked(state.home):  # a `worker` or `down` meanwhile waits until the servers are up
        start_servers(state)
    return state


def start_servers(state: StackState) -> None:
    """Save the state after each start, so `down` can stop what a failure part way left; on that
    failure, stop them here."""
    state.save()
    try:
        state.processes["s3"] = services.start_s3(state)
        state.save()
        created = services.ensure_bucket(state)
        print(f"s3: pid {state.processes['s3'].pid}; bucket {state.bucket} {'created' if created else 'exists'}",
              file=sys.stderr)
        for name, starter in (("mlflow", services.start_mlflow), ("prefect", services.start_prefect)):
            state.processes[name] = starter(state)
            state.save()
            print(f"{name}: pid {state.processes[name].pid}", file=sys.stderr)
    except BaseException:
        down_state(state)
        raise


def record(home: Path, proc: Managed) -> Managed:
    """Add a started process to the state as it is now, under the lock: starting a worker takes
    seconds, in which another `worker` may have recorded its own (writing back the state read
    before the start dropped that one). A live process of the same name is kept, `proc` stopped."""
    with StackState.edit(home) as state:
        running = state.processes.get(proc.name)
        if running and alive(running.pid):  # replacing it would lose its PID, so `down` would miss it
            stop(proc, grace=2.0)
            raise StackError(f"{proc.name} already runs (pid {running.pid}); `python -m infra.stack down` stops it")
        state.processes[proc.name] = proc
    return proc


def down_state(state: StackState) -> list[str]:
    """Stop the state's processes, workers first; hold the lock (`edit`, `up`) while calling it."""
    stopped = []
    ordered = sorted(state.processes.values(),
                     key=lambda p: next(i for i, prefix in enumerate(STOP_ORDER) if p.name.startswith(prefix)))
    for proc in ordered:
        if stop(proc):
            stopped.append(f"{proc.name} (pid {proc.pid})")
        del state.processes[proc.name]
        state.save()
    return stopped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.stack", description=__doc__.splitlines()[0])
    parser.add_argument("--home", default=os.environ.get("STAGEWISE_STACK_HOME", ".stack"))
    sub = parser.add_subparsers(dest="command", required=True)
    p_up = sub.add_parser("up", help="start the S3 store, the MLflow server and the Prefect server")
    p_up.add_argument("--free-ports", action="store_true", help="pick unused ports instead of STAGEWISE_*_PORT")
    p_up.add_argument("--bucket", default=os.environ.get("STAGEWISE_S3_BUCKET", "stagewise"))
    p_up.add_argument("--cpu-pool", default=os.environ.get("STAGEWISE_CPU_POOL", "cpu-pool"))
    p_up.add_argument("--gpu-pool", default=os.environ.get("STAGEWISE_GPU_POOL", "gpu-pool"))
    sub.add_parser("env", help="print `export` lines that point clients at the stack (no secrets)")
    sub.add_parser("status", help="the stack's URLs and which of its processes run")
    p_ws = sub.add_parser("workspace", help="clone the project and set the stack's bucket as its DVC remote")
    p_ws.add_argument("--repo", required=True)
    p_ws.add_argument("path")
    p_dep = sub.add_parser("deploy", help="create the work pools and register prefect.yaml's deployments")
    p_dep.add_argument("--cpu-workspace", required=True)
    p_dep.add_argument("--gpu-workspace", required=True)
    p_wk = sub.add_parser("worker", help="start a process worker for a pool, running flows in a workspace")
    p_wk.add_argument("--pool", required=True)
    p_wk.add_argument("--workspace", required=True)
    sub.add_parser("down", help="stop every process the stack started, by PID")
    args = parser.parse_args(argv)
    home = Path(args.home).resolve()
    try:
        if args.command == "up":
            state = up(args)
            print("\n".join(f"{k}: {v}" for k, v in state.urls.items()))
            return 0
        if args.command == "down":
            with StackState.edit(home) as state:
                stopped = down_state(state)
            print(f"stopped: {', '.join(stopped) or 'nothing was running'}")
            return 0
        state = StackState.load(home)
        if args.command == "env":
            print("\n".join(f"export {k}={shlex.quote(v)}" for k, v in state.client_env().items()))
        elif args.command == "status":
            print("\n".join(f"{k}: {v}" for k, v in state.urls.items()))
            for proc in state.processes.values():
                print(f"{proc.name}: pid {proc.pid} {'running' if alive(proc.pid) else 'gone'}  log {proc.log}")
        elif args.command == "workspace":
            print(services.make_workspace(state, args.repo, Path(args.path).resolve()))
        elif args.command == "deploy":
            services.create_pools(state)
            print(services.deploy(state, Path(args.cpu_workspace).resolve(), Path(args.gpu_workspace).resolve()))
        elif args.command == "worker":
            proc = record(home, services.start_worker(state, args.pool, Path(args.workspace).resolve()))
            print(f"{proc.name}: pid {proc.pid}")
    except StackError as exc:
        print(f"stack: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
