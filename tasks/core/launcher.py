"""Several training processes for one stage: `train.launcher.kind: accelerate` re-runs
`python -m tasks.train <stage>` under `accelerate launch`, so dvc.yaml and the flow keep calling the
same command. Each worker trains with the transformers Trainer, which reads the distributed setup
(DDP, FSDP, DeepSpeed) that accelerate leaves in the environment; only the main process writes the
stage's outputs. The configs and what has been run with each: infra/accelerate/README.md.

    # params.yaml
    train:
      launcher: {kind: accelerate, config_file: infra/accelerate/ddp_qlora.yaml, num_processes: 8}

    python -m tasks.train syntax   # runs: python -m accelerate.commands.launch --config_file ... -m tasks.train syntax
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

from tasks.core.config import ConfigError, LauncherConfig

log = logging.getLogger(__name__)

# Set in the environment of the processes `relaunch` starts, so a worker never relaunches itself,
# whichever launcher accelerate picked (its single-process launcher sets no LOCAL_RANK).
LAUNCHED_ENV = "STAGEWISE_LAUNCHED"
# What torchrun / accelerate / mpirun set in every worker they start (the same lists accelerate reads).
_RANK_ENV = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")
_SIZE_ENV = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def _env_int(names: tuple[str, ...], default: int) -> int:
    for name in names:
        if os.environ.get(name, "").strip():
            return int(os.environ[name])
    return default


def in_distributed_worker() -> bool:
    """True inside a process a launcher started (ours, accelerate, torchrun or mpirun)."""
    markers = (LAUNCHED_ENV, "LOCAL_RANK", "ACCELERATE_MIXED_PRECISION", *_SIZE_ENV)
    return any(os.environ.get(name) for name in markers)


def world_size() -> int:
    """How many training processes run this stage together (1 without a launcher)."""
    return _env_int(_SIZE_ENV, 1)


def process_rank() -> int:
    return _env_int(_RANK_ENV, 0)


def is_main_process() -> bool:
    """The process that writes the stage's outputs: rank 0, or the only one."""
    return process_rank() == 0


def gathered_adapter_state(model) -> dict | None:
    """The trainable (adapter) weights as whole tensors when the processes hold only shards of
    them (FSDP2 DTensors, DeepSpeed ZeRO-3 partitions); None when the model holds them whole.

    Gathering is a collective: every process must call this, the same number of times.
    """
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if any(hasattr(p, "ds_id") for _, p in trainable):  # ZeRO-3 (not run here: needs GPUs and deepspeed)
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in trainable], modifier_rank=None):
            return {name: p.detach().cpu().clone() for name, p in trainable}
    import torch.distributed

    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor

    if not any(isinstance(p, DTensor) for _, p in trainable):
        return None
    return {name: p.full_tensor().detach().cpu() if isinstance(p, DTensor) else p.detach().cpu() for name, p in trainable}


def launch_command(stage: str, params_file: str, launcher: LauncherConfig, main_process_port: int | None = None) -> list[str]:
    """The `accelerate launch` command line for one stage, with this interpreter (so it works
    when the venv's bin is not on PATH)."""
    if not launcher.config_file:
        raise ConfigError("train.launcher.config_file is not set: kind accelerate needs one (see infra/accelerate/)")
    config = Path(launcher.config_file)
    if not config.is_file():
        raise ConfigError(
            f"train.launcher.config_file: {config} not found (relative paths are from the project root, "
            f"{Path.cwd()}); use one of infra/accelerate/*.yaml or write one with `accelerate config --config_file`"
        )
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    if launcher.num_processes:
        cmd += ["--num_processes", str(launcher.num_processes)]
    if main_process_port is not None:
        cmd += ["--main_process_port", str(main_process_port)]
    return cmd + ["-m", "tasks.train", stage, "--params", params_file]


def relaunch(stage: str, params_file: str, launcher: LauncherConfig) -> int:
    """Run the stage under accelerate, its output streaming to ours; returns the launcher's exit
    code. A `MASTER_PORT` in the environment becomes the rendezvous port (else the config's)."""
    port = os.environ.get("MASTER_PORT")
    cmd = launch_command(stage, params_file, launcher, main_process_port=int(port) if port else None)
    log.info("train@%s: %s", stage, " ".join(cmd))
    sys.stdout.flush()
    sys.stderr.flush()
    proc = subprocess.Popen(cmd, env=os.environ | {LAUNCHED_ENV: "1"})
    try:
        return proc.wait()
    finally:
        if proc.poll() is None:  # we were interrupted: take the workers down with us
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
