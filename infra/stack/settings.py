"""Where the local stack lives and which loopback ports it uses, from flags and the environment.

Every port is configurable (and `--free-ports` picks unused ones), so several stacks, e.g. parallel
test runs, do not clash. Credentials are read from the environment only, when a service needs them.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from infra.stack.processes import Managed, StackError, free_port

HOST = "127.0.0.1"
STATE_FILE = "stack.json"
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
        self.home.mkdir(parents=True, exist_ok=True)
        data = {"home": str(self.home), "ports": asdict(self.ports), "bucket": self.bucket,
                "cpu_pool": self.cpu_pool, "gpu_pool": self.gpu_pool,
                "urls": self.urls, "processes": {k: p.to_json() for k, p in self.processes.items()}}
        tmp = self.file.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        tmp.replace(self.file)

    @classmethod
    def load(cls, home: Path) -> StackState:
        file = home / STATE_FILE
        if not file.is_file():
            raise StackError(f"{file}: no stack state (start one with `python -m infra.stack up --home {home}`)")
        data = json.loads(file.read_text())
        return cls(Path(data["home"]), Ports(**data["ports"]), data["bucket"], data["cpu_pool"], data["gpu_pool"],
                   {k: Managed(**p) for k, p in data["processes"].items()})


def credentials() -> dict[str, str]:
    missing = [name for name in CREDENTIALS if not os.environ.get(name)]
    if missing:
        raise StackError(f"set {' and '.join(missing)} in the environment: the S3 store, MLflow and DVC use them "
                         "(they are never written to a file)")
    return {name: os.environ[name] for name in CREDENTIALS}
