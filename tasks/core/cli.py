"""The command line every stage shares: `python -m tasks.<step> [--params params.yaml] ...`.

Expected failures (bad config, bad data, a missing upstream output) print one readable message
and exit non-zero without a traceback; DVC then stops the DAG at that stage, leaving earlier
outputs in place.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Iterable

from tasks.core.config import ConfigError


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
    # force: importing prefect already configured logging, which would swallow our INFO lines
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", force=True)
    try:
        lines = list(run(args))
    except (ConfigError, FileNotFoundError, *expected) as exc:
        print(f"{step}: {exc}", file=sys.stderr)
        return exit_code
    for line in lines:
        print(line)
    return 0
