"""What a training stage cost in device time, written where a user compares runs: the stage's
metrics file (`metrics/train/<stage>.json`), its MLflow run, the model card, and the registered
version (the chain's total GPU-hours).

GPU-hours are devices x wall time of the stage's whole run on them (loading, training, the eval
loss, saving): the time the devices were held, which is what a GPU bill counts. On a CPU they are 0.
A stage resumed after a kill records the time of its last run only (`resumed_from_step` says so).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from tasks.core import paths

COST_FIELDS = ("device", "device_count", "wall_seconds", "gpu_hours", "tokens_trained", "tokens_per_second")


@dataclass(frozen=True)
class DeviceUse:
    """The devices one training stage ran on, and for how long."""

    device: str  # e.g. "NVIDIA H200", or "cpu"
    device_count: int  # GPUs across all of the stage's processes (0 on a CPU)
    wall_seconds: float

    @property
    def gpu_hours(self) -> float:
        return self.device_count * self.wall_seconds / 3600

    def fields(self, tokens_trained: int, tokens_per_second: float) -> dict[str, float | int | str]:
        """The cost fields of `metrics/train/<stage>.json`."""
        return {"device": self.device, "device_count": self.device_count, "wall_seconds": round(self.wall_seconds, 3),
                "gpu_hours": round(self.gpu_hours, 6), "tokens_trained": tokens_trained,
                "tokens_per_second": round(tokens_per_second, 6)}


def this_device() -> str:
    """The GPU this process trains on (its name), or "cpu"."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.cuda.current_device())
    return "cpu"


class StageClock:
    """Started when a stage begins; `use` is the stage's device use so far."""

    def __init__(self, processes: int) -> None:
        self.processes = processes
        self.started = time.perf_counter()

    def use(self) -> DeviceUse:
        device = this_device()
        return DeviceUse(device, 0 if device == "cpu" else self.processes, time.perf_counter() - self.started)


def stage_cost(stage: str) -> dict:
    """A trained stage's cost fields, read from its metrics file ({} when it has none, or was
    trained before they were recorded)."""
    path = paths.train_metrics(stage)
    metrics = json.loads(path.read_text()) if path.exists() else {}
    return {k: metrics[k] for k in COST_FIELDS if k in metrics}


def chain_gpu_hours(stages: list[str]) -> float:
    """GPU-hours of every stage the final model was trained through."""
    return round(sum(float(stage_cost(s).get("gpu_hours", 0.0)) for s in stages), 6)


def cost_table(stages: list[str], read=stage_cost) -> list[list[str]]:
    """One row per stage for people: device, wall time, GPU-hours, tokens, tokens/s."""
    rows = []
    for stage in stages:
        c = read(stage)
        count = c.get("device_count", 0)
        device = f"{count} x {c['device']}" if count else c.get("device", "–")
        rows.append([stage, device, f"{c.get('wall_seconds', 0):.0f} s", f"{c.get('gpu_hours', 0):.4f}",
                     f"{c.get('tokens_trained', 0):,}", f"{c.get('tokens_per_second', 0):,.0f}"])
    return rows
