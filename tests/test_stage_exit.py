"""A stage's process ends without the interpreter's teardown, and loses nothing by it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import atexit, logging, sys, threading, time
    from pathlib import Path
    from tasks.core.cli import exit_now

    out = Path(sys.argv[1])
    atexit.register(lambda: (out / "atexit.txt").write_text("ran"))

    def late_writer():
        time.sleep(0.3)
        (out / "thread.txt").write_text("finished")

    threading.Thread(target=late_writer).start()  # not a daemon: the process waits for it
    logging.basicConfig(filename=out / "stage.log", level=logging.INFO)
    logging.getLogger("stage").info("logged before the exit")
    print("summary line without a newline", end="")
    print("an error line", file=sys.stderr, end="")
    exit_now(int(sys.argv[2]))
""")


@pytest.mark.parametrize("code", [0, 2])
def test_exit_now_keeps_the_exit_code_streams_threads_atexit_and_logs(tmp_path, code):
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), str(code)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == code
    assert done.stdout == "summary line without a newline"
    assert done.stderr == "an error line"
    assert (tmp_path / "thread.txt").read_text() == "finished"
    assert (tmp_path / "atexit.txt").read_text() == "ran"
    assert "logged before the exit" in (tmp_path / "stage.log").read_text()


def test_a_stage_module_exits_through_it_with_its_error_code(tmp_path):
    """`python -m tasks.<stage>` as DVC runs it: a bad params path is exit 2 and one readable line."""
    done = subprocess.run([sys.executable, "-m", "tasks.prepare", "--params", str(tmp_path / "none.yaml")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().startswith("prepare:") and "none.yaml" in done.stderr


def test_a_stage_does_not_repeat_bitsandbytes_refused_hub_kernel(tmp_path):
    """bitsandbytes' request for a Hub kernel is refused (no remote code); the stage log stays clean."""
    script = textwrap.dedent("""
        from tasks.core.cli import run_stage_cli

        def run(args):
            import bitsandbytes  # noqa: F401 - logs at import, where the CPU has AVX512-BF16
            return ["imported"]

        raise SystemExit(run_stage_cli("probe", "probe", run, ["--params", "none.yaml"]))
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "imported"
    assert "kernels-community" not in done.stderr
