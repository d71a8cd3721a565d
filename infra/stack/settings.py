"""Where the local stack lives and which loopback ports it uses, from flags and the environment.

Every port is configurable (and `--free-ports` picks unused ones), so several stacks, e.g. parallel
test runs, do not clash. Credentials are read from the environment only, when a service needs them.

Several `infra.stack` commands may run at once (two `worker`s in two terminals), so the state file
is changed only under a lock (`StackState.edit`, or `locked` for `up`, which writes a fresh one) and
always written by atomic replace: a reader sees the old state or the new one, never half of one.
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from infra.stack.processes import Managed, StackError, free_port

HOST = "127.0.0.1"
STATE_FILE = "stack.json"
LOCK_FILE = "stack.json.lock"  # never deleted: two processes would then lock two different files
CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


@dataclass
class Ports:
    prefect: int = 4200
    mlflow: int = 5000
    s3: int = 9000

    @classmethod
    def from_env(cls, free: bool) -> Ports:
        if free:
            return cls(free_port(), free_port(), free_port())
        return cls(*(int(os.environ.get(f"STAGEWISE_{name.upper()}_PORT", default))
                     for name, default in asdict(cls()).items()))


@dataclass
class StackState:
    """What `up` started; `down` stops exactly these PIDs."""

    home: Path
    ports: Ports
    bucket: str
    cpu_pool: str
    gpu_pool: str
    processes: dict[str, Managed] = field(default_factory=dict)

    @property
    def file(self) -> Path:
        return self.home / STATE_FILE

    @property
    def urls(self) -> dict[str, str]:
        return {
            "prefect_api": f"http://{HOST}:{self.ports.prefect}/api",
            "prefect_ui": f"http://{HOST}:{self.ports.prefect}",
            "mlflow": f"http://{HOST}:{self.ports.mlflow}",
            "s3": f"http://{HOST}:{self.ports.s3}",
        }

    def client_env(self) -> dict[str, str]:
        """What a client of the stack (a worker, a flow, `dvc`, a test) needs; no secrets."""
        return {
            "PREFECT_API_URL": self.urls["prefect_api"],
            "MLFLOW_TRACKING_URI": self.urls["mlflow"],
            "AWS_ENDPOINT_URL": self.urls["s3"],
            "AWS_ENDPOINT_URL_S3": self.urls["s3"],
            "MLFLOW_S3_ENDPOINT_URL": self.urls["s3"],
            "AWS_DEFAULT_REGION": os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
            "STAGEWISE_S3_BUCKET": self.bucket,
            "STAGEWISE_CPU_POOL": self.cpu_pool,
            "STAGEWISE_GPU_POOL": self.gpu_pool,
            # Network steps retry (the MLflow client's own backoff), see infra/README.md.
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES": os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "5"),
            "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": os.environ.get("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "2"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "DO_NOT_TRACK": "1",
        }

    def save(self) -> None:
        """Write the state by atomic replace (temp file in the same folder, fsync, rename), so a
        crash or a concurrent reader never meets a half-written stack.json. Call it while holding
        `locked(home)` (`edit` and `up` do), or another command's change may be overwritten."""
        self.home.mkdir(parents=True, exist_ok=True)
        data = {"home": str(self.home), "ports": asdict(self.ports), "bucket": self.bucket,
                "cpu_pool": self.cpu_pool, "gpu_pool": self.gpu_pool,
                "urls": self.urls, "processes": {k: p.to_json() for k, p in self.processes.items()}}
        fd, tmp = tempfile.mkstemp(dir=self.home, prefix=f".{STATE_FILE}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as out:
                out.write(json.dumps(data, indent=2) + "\n")
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.file)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, home: Path) -> StackState:
        """The state as last saved; safe without the lock, as saves replace the file whole."""
        data = json.loads(existing_state_file(home).read_text())
        return cls(Path(data["home"]), Ports(**data["ports"]), data["bucket"], data["cpu_pool"], data["gpu_pool"],
                   {k: Managed(**p) for k, p in data["processes"].items()})

    @classmethod
    @contextmanager
    def edit(cls, home: Path) -> Iterator[StackState]:
        """The one way to change an existing stack.json: read under the lock, changed in the `with`
        block, written back before the lock is let go. Without it, two workers started at once each
        wrote back the state read before the other's write, and one PID was lost. An error in the
        block writes nothing."""
        existing_state_file(home)  # no stack: say so, before leaving a lock file in a folder with none
        with locked(home):
            state = cls.load(home)
            yield state
            state.save()


def existing_state_file(home: Path) -> Path:
    file = home / STATE_FILE
    if not file.is_file():
        raise StackError(f"{file}: no stack state (start one with `python -m infra.stack up --home {home}`)")
    return file


@contextmanager
def locked(home: Path) -> Iterator[None]:
    """An exclusive lock on <home>/stack.json.lock for the `with` block. flock waits for another
    holder, and the kernel lets go when the file closes, also when its process dies, so a killed
    command never leaves the stack locked."""
    home.mkdir(parents=True, exist_ok=True)
    with (home / LOCK_FILE).open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def credentials() -> dict[str, str]:
    missing = [name for name in CREDENTIALS if not os.environ.get(name)]
    if missing:
        raise StackError(f"set {' and '.join(missing)} in the environment: the S3 store, MLflow and DVC use them "
                         "(they are never written to a file)")
    return {name: os.environ[name] for name in CREDENTIALS}
