"""Data between machines: the workspace's DVC remote (an S3 bucket on the scale-out path).

A worker on another machine gets a stage's inputs through DVC's run cache: the pipeline pushes
every output and run record it has, the worker's `dvc repro --pull` restores each upstream stage
from them instead of running it, runs its own stage and pushes that back; the pipeline then
restores the stage the same way (`dvc repro --pull` fetches the run records and outputs it needs,
with the S3 client's own retries). Pushes retry with backoff; a stage that fails fails once,
because running it again would fail again.
"""

from __future__ import annotations

import functools
import logging
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

NETWORK_RETRIES = 3
RETRY_BACKOFF_FACTOR = 2  # Prefect's exponential_backoff: 2, 4, 8 s

_logger = logging.getLogger(__name__)


class RemoteError(RuntimeError):
    """A transfer to or from the DVC remote failed after its retries."""


def default_remote(project: Path) -> str | None:
    """The default DVC remote's name, or None when the workspace has none (the embedded default)."""
    done = subprocess.run([sys.executable, "-m", "dvc", "remote", "default"], cwd=project,
                          capture_output=True, text=True, timeout=60)
    name = done.stdout.strip()
    return name if done.returncode == 0 and name else None


def _dvc(project: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, capture_output=True, text=True)


def __getattr__(name: str) -> Any:
    """`remote.push`, the Prefect task, is built on first use (PEP 562): importing Prefect takes a
    second or two, which importing this module (and the pipeline's `--help`) should not pay."""
    if name == "push":
        return _push_task()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.cache
def _push_task() -> Any:
    from prefect import get_run_logger, task
    from prefect.cache_policies import NO_CACHE
    from prefect.tasks import exponential_backoff

    @task(name="dvc-push", retries=NETWORK_RETRIES, retry_delay_seconds=exponential_backoff(RETRY_BACKOFF_FACTOR),
          retry_jitter_factor=0.2, cache_policy=NO_CACHE)
    def push(project: str, targets: list[str] | None = None) -> str:
        """`dvc push --run-cache`: outputs and run records to the default remote.

        DVC uploads objects before anything refers to them, so a push cut short leaves nothing that
        looks complete: the next push sends what is missing."""
        return transfer(Path(project), "push", targets or [], get_run_logger().info)

    return push


def remote_config(project: Path, name: str) -> dict:
    """The remote's settings as DVC merges them (config, then config.local, where the endpoint is)."""
    from dvc.repo import Repo

    with Repo(str(project)) as repo:
        return dict(repo.config["remote"][name])


def check_reachable(project: Path, name: str) -> None:
    """One quick request to an S3 remote before DVC starts: when the store is down, DVC's own
    per-file retries take minutes to give up, and its message does not say the store is down."""
    config = remote_config(project, name)
    url = str(config.get("url", ""))
    if not url.startswith("s3://"):
        return
    import boto3
    from botocore.config import Config
    from botocore.exceptions import ConnectTimeoutError, EndpointConnectionError

    bucket = url.removeprefix("s3://").split("/", 1)[0]
    endpoint = config.get("endpointurl")
    session = boto3.Session(profile_name=config.get("profile"), aws_access_key_id=config.get("access_key_id"),
                            aws_secret_access_key=config.get("secret_access_key"), region_name=config.get("region"))
    client = session.client("s3", endpoint_url=endpoint,
                            config=Config(connect_timeout=3, read_timeout=10, retries={"max_attempts": 1}))
    try:
        client.head_bucket(Bucket=bucket)
    except (EndpointConnectionError, ConnectTimeoutError) as exc:
        raise RemoteError(f"DVC remote '{name}' ({url} at {endpoint or 'AWS'}) is unreachable: {exc}") from None
    except Exception:  # noqa: BLE001 - denied, missing bucket...: DVC's transfer reports those itself
        pass


def transfer(project: Path, verb: str, targets: list[str], log: Callable[[str], object] = _logger.info) -> str:
    """`dvc <verb> --run-cache` against the default remote, after checking it is reachable; DVC's
    last line, or RemoteError naming the remote."""
    remote = default_remote(project)
    if remote is None:
        raise RemoteError(f"{project}: no default DVC remote (dvc remote add -d ...)")
    check_reachable(project, remote)
    done = _dvc(project, verb, "--run-cache", *targets)
    if done.returncode != 0:
        # DVC's own message names the remote and the failing object; credentials are not in it.
        lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
        raise RemoteError(f"dvc {verb} to remote '{remote}' failed: " + " | ".join(lines[-6:]))
    summary = (done.stdout.strip().splitlines() or ["done"])[-1]
    log(f"dvc {verb} ({remote}): {summary}")
    return summary
