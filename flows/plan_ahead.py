"""The run's plan (tasks/plan.py), worked out while Prefect's temporary server starts.

Before the flow's first line, `python -m flows.pipeline` on the embedded default waits for a
temporary Prefect server (a subprocess: 4 s, 10 s with a new Prefect home, on 2 cores). The plan
the flow logs first (DVC's status of every stage, each training stage's memory: 4-6 s) depends only
on the workspace and params.yaml, so the command line starts it in a thread before the flow and the
two overlap. The flow takes that plan only when the workspace and params.yaml are the ones it was
made from; otherwise (a run with `--set`, a deployment's run) the flow makes its own.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tasks.core.config import Params
    from tasks.plan import Plan

log = logging.getLogger(__name__)
_pending: PlanAhead | None = None  # started by the command line, taken by the flow's first plan check


def make_run_plan(root: Path, loaded: Params, here: bool) -> Plan:
    """The plan of a run in `root`; `here`: training runs on this machine (its memory is the limit)."""
    from contextlib import chdir

    from tasks.plan import make_plan, memory_limit

    with chdir(root):  # the plan reads the workspace's outputs by their relative paths
        return make_plan(loaded, root, limit_bytes=memory_limit(loaded, here), only_running=True)


@dataclass
class PlanAhead:
    """A plan being made in a background thread for the workspace `root` (the current directory:
    the thread's chdir is then a no-op) as `params_file` reads now."""

    root: Path
    params_file: Path
    params_text: str
    here: bool
    plan: Plan | None = None
    thread: threading.Thread = field(init=False)

    @classmethod
    def begin(cls, params_file: Path, here: bool) -> PlanAhead:
        root, params_file = Path.cwd().resolve(), params_file.resolve()
        ahead = cls(root, params_file, params_file.read_text(), here)
        ahead.thread = threading.Thread(target=ahead._make, name="plan-ahead", daemon=True)
        ahead.thread.start()
        return ahead

    def _make(self) -> None:
        from tasks.core.config import load_params

        try:
            self.plan = make_run_plan(self.root, load_params(self.params_file), self.here)
        except Exception as error:  # noqa: BLE001 - the flow makes the plan again and reports the error there
            log.debug("plan ahead of the flow failed (the flow plans again): %s", error)

    def take(self, root: Path, params_file: Path, here: bool) -> Plan | None:
        """The plan, if it was made for this run (same workspace, params.yaml unchanged since, same
        place of training); else None."""
        self.thread.join()
        params_file = params_file.resolve()
        same = (root.resolve(), params_file, here) == (self.root, self.params_file, self.here)
        if not same or params_file.read_text() != self.params_text:
            return None
        return self.plan


def start(params_file: Path, here: bool) -> None:
    """Start planning the run the command line is about to start."""
    global _pending
    _pending = PlanAhead.begin(params_file, here)


def take(root: Path, params_file: Path, here: bool) -> Plan | None:
    """The plan started for this run, once; None when there is none or it was for another run."""
    global _pending
    ahead, _pending = _pending, None
    return ahead.take(root, params_file, here) if ahead else None


def settle() -> None:
    """Wait for a plan nobody took (the flow failed before its plan check), so no thread is still
    importing when the interpreter exits."""
    if _pending:
        _pending.thread.join()
