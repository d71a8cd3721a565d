"""The command line every stage shares: `python -m tasks.<step> [--params params.yaml] ...`.

Expected failures (bad config, bad data, a missing upstream output) print one readable message
and exit non-zero without a traceback; DVC then stops the DAG at that stage, leaving earlier
outputs in place.
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import sys
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import NoReturn

from tasks.core.config import ConfigError


def check_declared(step: str, params_file: str) -> None:
    """Fail before any work when dvc.yaml does not list a curriculum stage's keys this step reads."""
    from tasks.core.config import load_params
    from tasks.core.dvc_params import undeclared_stage_keys

    dvc_file = Path("dvc.yaml")  # the project DVC runs the stage in
    if not Path(params_file).exists() or not dvc_file.exists():
        return  # load_params reports a missing params file; no dvc.yaml here: not run as a DVC stage
    try:
        missing = undeclared_stage_keys(step, load_params(params_file).stage_names, dvc_file)
    except KeyError:
        return  # not a DVC stage (serve, report)
    if missing:
        raise ConfigError(
            f"dvc.yaml's `{step}` stage does not list {', '.join(missing)}, which it reads: add them under "
            f"stages.{step}.params in {dvc_file.resolve()}, or DVC will not re-run {step} when they change"
        )


def quiet_expected_refusals() -> None:
    """Imported on a CPU with AVX512-BF16, bitsandbytes asks the Hub's `kernels-community` for a
    4-bit matmul kernel; the `kernels` package refuses the unverified repository before anything is
    downloaded (what this project wants: no remote code), bitsandbytes keeps its own kernel, and
    logs a warning that every stage would repeat. Errors from it still show."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def run_stage_cli(
    step: str,
    doc: str,
    run: Callable[[argparse.Namespace], Iterable[str]],
    argv: list[str] | None = None,
    *,
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
    expected: tuple[type[BaseException], ...] = (),
    exit_code: int = 2,
) -> int:
    """Parse arguments, call `run` (which returns the summary lines to print), map failures."""
    parser = argparse.ArgumentParser(prog=f"python -m tasks.{step}", description=doc.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="path to params.yaml")
    if add_arguments:
        add_arguments(parser)
    args = parser.parse_args(argv)
    # force: a second call in one process (tests) replaces handlers whose stream may be gone
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", force=True)
    quiet_expected_refusals()
    try:
        check_declared(step, args.params)
        lines = list(run(args))
    except (ConfigError, FileNotFoundError, *expected) as exc:
        print(f"{step}: {exc}", file=sys.stderr)
        return exit_code
    for line in lines:
        print(line)
    return 0


def exit_now(code: int) -> NoReturn:
    """End a stage's process with `code`, skipping the interpreter's teardown of its modules.

    That teardown does nothing a finished stage needs, and after torch, peft and bitsandbytes are
    loaded it takes 1-2 s (2.0 s after train@embedding's last line, 2 cores), paid by every stage of
    every run. What matters of it is done here first: other threads finish, the atexit handlers
    run (MLflow ends its runs, logging flushes), a distributed process group is left, and the
    standard streams are flushed."""
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    distributed = sys.modules.get("torch.distributed")
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        distributed.destroy_process_group()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)
