"""DVC experiments under the ablation flow: each run is `dvc exp run` in the workspace with its
overrides written into params.yaml, so its params, metrics and outputs are versioned (`dvc exp
show` lists them) and every stage it shares with an earlier run comes back from DVC's run cache
instead of running again. The workspace's params.yaml, dvc.lock and outputs are put back after.

No Prefect here, like flows/dvc_stages.py: the flow passes its logger.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from flows.dvc_stages import Log, StageFailed, git_head, stream_dvc, uncached_outputs
from flows.overrides import apply_overrides
from tasks.ablation.report import RunResult
from tasks.ablation.variants import AblationRun
from tasks.core import paths
from tasks.core.config import ConfigError, load_params

_logger = logging.getLogger(__name__)

SHARED_TARGET = "validate"  # ingest, base, prepare, validate: what every variant starts from
_RUNNING = re.compile(r"^Running stage '([^']+)'")
_REUSED = re.compile(r"^Stage '([^']+)' (?:didn't change|is cached)")
_STAGE_DONE = ("Updating lock file", "Running stage", "Stage '", "Ran experiment")


def require_git(root: Path) -> None:
    """DVC experiments are git commits: the project must be a git repository with a first commit."""
    if git_head(root) is None:
        raise ConfigError(f"{root} is not a git repository with a commit: DVC experiments need one "
                          "(git init && git add -A && git commit -m init)")


@contextmanager
def workspace_kept(root: Path, log: Log = _logger.info) -> Iterator[str]:
    """params.yaml's text for the runs to start from; after them (or a failure) params.yaml, dvc.lock
    and the outputs DVC does not cache are as they were, and `dvc checkout` puts the other outputs
    back where DVC still has them."""
    params, lock = root / "params.yaml", root / "dvc.lock"
    params_text = params.read_text()
    lock_text = lock.read_text() if lock.exists() else None
    uncached = {root / rel: (root / rel).read_bytes() for rel in uncached_outputs(root) if (root / rel).is_file()}
    try:
        yield params_text
    finally:
        params.write_text(params_text)
        for path, content in uncached.items():  # metrics and plots DVC does not cache: git's copies
            path.write_bytes(content)
        if lock_text is None:
            lock.unlink(missing_ok=True)
        else:
            lock.write_text(lock_text)
            done = subprocess.run([sys.executable, "-m", "dvc", "checkout", "--force", "--quiet"], cwd=root,
                                  capture_output=True, text=True)
            if done.returncode:
                log(f"ablation: `dvc checkout` could not restore every output: {done.stderr.strip()[-500:]}")


def timed_dvc(root: Path, args: list[str], name: str, log: Log) -> list[tuple[float, str]]:
    """`stream_dvc`, each output line with the time it came."""
    timed: list[tuple[float, str]] = []

    def record(line: str) -> None:
        timed.append((time.perf_counter(), line))
        log(line)

    stream_dvc(root, args, name, record)
    return timed


def run_shared_stages(root: Path, log: Log = _logger.info) -> dict[str, float]:
    """`dvc repro validate` on the workspace's own params: the data and base every variant shares.
    The seconds of each stage it ran."""
    return stage_times(timed_dvc(root, ["repro", SHARED_TARGET], SHARED_TARGET, log))[0]


def stage_times(timed: list[tuple[float, str]]) -> tuple[dict[str, float], list[str]]:
    """From `dvc exp run`'s timed output lines: seconds of each stage it ran, and the stages it reused."""
    ran: dict[str, float] = {}
    reused: list[str] = []
    current: tuple[str, float] | None = None
    for at, line in timed:
        if current and line.startswith(_STAGE_DONE):
            ran[current[0]] = round(at - current[1], 3)
            current = None
        if match := _RUNNING.match(line):
            current = (match.group(1), at)
        elif match := _REUSED.match(line):
            reused.append(match.group(1))
    if current:
        ran[current[0]] = round(timed[-1][0] - current[1], 3)
    return ran, reused


def run_experiment(root: Path, run: AblationRun, params_text: str, target: str, log: Log = _logger.info) -> RunResult:
    """One run as a DVC experiment up to `target` (evaluate, or register); its scores and costs."""
    (root / "params.yaml").write_text(params_text)
    apply_overrides(root / "params.yaml", run.overrides)
    started = time.perf_counter()
    try:
        timed = timed_dvc(root, ["exp", "run", "--name", run.name, target], f"experiment {run.name}", log)
    except StageFailed as exc:
        raise StageFailed(f"ablation run {run.name} (variant {run.variant}, seed {run.seed}) failed: {exc}") from None
    seconds = time.perf_counter() - started
    ran, reused = stage_times(timed)
    scores = json.loads((root / paths.EVALUATE_METRICS).read_text())
    tokens = sum(int(json.loads((root / paths.train_metrics(stage)).read_text()).get("tokens_trained") or 0)
                 for stage in load_params(root / "params.yaml").stage_names)
    return RunResult(run.variant, run.seed, run.name, run.overrides, scores["final"], scores["forgetting"],
                     tokens, round(seconds, 3), ran, reused)
