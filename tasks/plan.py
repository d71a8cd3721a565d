"""What the next run will do and what it will cost, before anything runs.

    python -m tasks.plan [--params params.yaml] [--tokens-per-second N] [--json]

For the current params.yaml and workspace:
  stages     which DVC stages will run and why (DVC's own status: changed deps, params, outputs;
             and every stage downstream of one that runs), and which are cached;
  training   per training stage: rows and tokens per row (from `prepare`'s report when it ran,
             else prepare.max_length as an upper bound), steps, tokens to train, the preflight's
             memory estimate for the configured model (built on the meta device: nothing loaded
             or downloaded), whether it fits `train.memory_limit_gb` or the free memory here, and
             the projected time from a throughput figure (--tokens-per-second, else the stage's
             last measured run);
  total      projected device-hours (GPU-hours on a GPU).
It exits 1 when a stage cannot fit, naming the stage and the cheapest lever that would make it fit.
The pipeline flow logs the same plan when a run starts, and stops there on a stage that cannot fit.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.core import paths
from tasks.core.cli import run_stage_cli
from tasks.core.config import LoraConfig, Params, load_params
from tasks.core.preflight import NF4_BYTES_PER_PARAM

if TYPE_CHECKING:
    from torch import nn

GIB = 2**30


@dataclass(frozen=True)
class Shape:
    """What the memory of one training step depends on."""

    batch_size: int
    seq_len: int
    quantization: str
    loss_chunk_tokens: int | None
    gradient_checkpointing: bool
    lora: LoraConfig
    optimizer: str = "adamw_torch"  # resolved (tasks/core/trainer.py::resolve_optimizer)
    expert_compute: str = "routed"  # train.expert_compute
    upcast_frozen: bool = False  # train.upcast_frozen
    offload_expert_adapters: bool = False  # resolved (tasks/core/expert_offload.py::resolve_expert_offload)
    on_gpu: bool = True  # offloading moves something only from a GPU
    experts_per_dequant: int | None = None  # train.experts_per_dequant
    adapter_dtype: str = "fp32"  # train.adapter_dtype


@dataclass
class StagePlan:
    stage: str
    runs: bool
    reasons: list[str] = field(default_factory=list)


@dataclass
class TrainPlan:
    stage: str
    rows: int | None
    tokens_per_row: float
    tokens_per_row_measured: bool  # from prepare's report; else prepare.max_length, an upper bound
    steps: int
    tokens: int
    memory: dict[str, int]
    limit_bytes: int | None
    tokens_per_second: float | None
    processes: int
    lever: str | None = None  # the cheapest change that makes a stage fit, when it does not

    @property
    def peak_bytes(self) -> int:
        return sum(self.memory.values())

    @property
    def fits(self) -> bool:
        return self.limit_bytes is None or self.peak_bytes <= self.limit_bytes

    @property
    def seconds(self) -> float | None:
        return self.tokens / self.tokens_per_second if self.tokens_per_second else None


@dataclass
class Plan:
    stages: list[StagePlan]
    training: list[TrainPlan]
    on_gpu: bool

    @property
    def fits(self) -> bool:
        return all(t.fits for t in self.training)

    @property
    def device_hours(self) -> float | None:
        """Projected device-hours of the training stages that will run (None: no throughput known)."""
        running = {s.stage for s in self.stages if s.runs}
        times = [(t.seconds, t.processes) for t in self.training if f"train@{t.stage}" in running]
        if any(seconds is None for seconds, _ in times):
            return None
        return sum(seconds * n for seconds, n in times) / 3600  # type: ignore[operator]


# --- what DVC will run --------------------------------------------------------------------------


def _reasons(entries: list, shown: int = 3) -> list[str]:
    """DVC's status entries of a stage as short phrases (the first `shown` names of each kind)."""
    out = []
    for entry in entries:
        if isinstance(entry, str):
            out.append(entry)
            continue
        for kind, changes in entry.items():
            names = []
            for name, what in (changes or {}).items():
                names += [f"{key} {change}" for key, change in what.items()] if isinstance(what, dict) else [f"{name} {what}"]
            more = f" and {len(names) - shown} more" if len(names) > shown else ""
            out.append(f"{kind}: {', '.join(names[:shown])}{more}" if names else kind)
    return out


def stage_plans(root: Path) -> list[StagePlan]:
    """Every DVC stage in run order: whether `dvc repro` would run it, and why."""
    import networkx as nx
    from dvc.repo import Repo

    from tasks.core.dag import ordered_stages

    with Repo(str(root)) as repo:
        graph = repo.index.graph  # an edge points from a stage to a stage it depends on
        order = ordered_stages(repo)
        status = repo.status()
        changed = {s for s in order if s.addressing in status}
        plans = []
        for stage in order:
            reasons = _reasons(status.get(stage.addressing, []))
            upstream = sorted(u.addressing for u in nx.descendants(graph, stage) if u in changed)
            if upstream and stage not in changed:
                reasons.append(f"after {', '.join(upstream)}")
            plans.append(StagePlan(stage.addressing, bool(reasons), reasons))
        return plans


# --- the model, on the meta device --------------------------------------------------------------


def planned_config(params: Params):
    """The base's config: the built base's (its real vocabulary) once `base` ran, else the tiny
    model's from params.model.tiny, or the configured model's own config.json (no weights)."""
    from transformers import AutoConfig

    from tasks.core.modeling import tiny_config

    if (paths.BASE_DIR / "config.json").exists():
        return AutoConfig.from_pretrained(paths.BASE_DIR)
    model = params.model
    if model.name_or_path is None:
        return tiny_config(model.tiny, model.tiny.vocab_size)
    return AutoConfig.from_pretrained(model.name_or_path, revision=model.revision, trust_remote_code=model.trust_remote_code)


def meta_model(config) -> nn.Module:
    """The model with no storage behind its tensors: shapes and names only."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def weight_bytes(model: nn.Module, quantization: str, dtype_bytes: int, upcast_frozen: bool = False) -> int:
    """The weights as training would store them: attention and experts in NF4 under `nf4`, the rest
    (and everything otherwise) in the training dtype, or fp32 under `nf4` with `train.upcast_frozen`."""
    from tasks.core.preflight import part_of

    rest = 4 if quantization == "nf4" and upcast_frozen else dtype_bytes
    total = 0.0
    for name, param in {id(p): (n, p) for n, p in model.named_parameters()}.values():
        four_bit = quantization == "nf4" and param.ndim >= 2 and part_of(name) in ("attention", "experts")
        total += param.numel() * (NF4_BYTES_PER_PARAM if four_bit else rest)
    return int(total)


def lora_parameters(model: nn.Module, lora: LoraConfig) -> int:
    """LoRA parameters `lora` would add: r x (in + out) per targeted linear layer; per expert, the
    expert rank x (in + out) for each targeted fused stack ([experts, out, in])."""
    from torch import nn

    total = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in lora.target_modules:
            total += lora.r * (module.in_features + module.out_features)
    return total + expert_lora_parameters(model, lora)


def expert_lora_parameters(model: nn.Module, lora: LoraConfig) -> int:
    """The fused expert stacks' share of `lora_parameters`."""
    total = 0
    expert_r = lora.expert_r or lora.r
    for name, param in model.named_parameters():
        if param.ndim == 3 and any(name.endswith(t) for t in lora.target_parameters):
            experts, rows, cols = param.shape
            total += expert_r * experts * (rows + cols)
    return total


def stage_memory(model: nn.Module, shape: Shape, dtype_bytes: int) -> dict[str, int]:
    """The preflight's memory terms for one step of this shape (tasks/core/preflight.py::memory_terms)."""
    from tasks.core.preflight import memory_terms

    weights = weight_bytes(model, shape.quantization, dtype_bytes, shape.upcast_frozen)
    offloaded = shape.offload_expert_adapters and shape.on_gpu and shape.expert_compute == "routed"
    host_trainable = expert_lora_parameters(model, shape.lora) if offloaded else 0
    return memory_terms(model.config, weights, lora_parameters(model, shape.lora),
                        shape.batch_size * shape.seq_len, shape.loss_chunk_tokens, shape.gradient_checkpointing,
                        shape.optimizer, dtype_bytes, shape.lora.target_parameters, shape.quantization == "nf4",
                        shape.expert_compute == "routed", host_trainable, shape.experts_per_dequant,
                        adapter_bytes=2 if shape.adapter_dtype == "bf16" else 4)


def _halvings(value: int) -> list[int]:
    """value / 2, value / 4, ... down to 1."""
    out = []
    while value > 1:
        value //= 2
        out.append(value)
    return out


def _smaller_chunks(chunk: int | None) -> list[int]:
    """Loss chunks to try, mildest first: 1024 when the logits are whole, then halvings down to 128
    (below that the LM head's matmuls get thin; the logits term is small by then)."""
    return [c for c in ([1024, 512, 256, 128] if not chunk else _halvings(chunk)) if c >= 128]


def _expert_ranks(s: Shape) -> list[tuple[str, Shape]]:
    rank = s.lora.expert_r or s.lora.r
    if not s.lora.target_parameters:
        return []
    return [(f"train.lora.expert_r: {r}", replace(s, lora=s.lora.model_copy(update={"expert_r": r}))) for r in _halvings(rank)]


def _no_expert_adapters(s: Shape) -> list[tuple[str, Shape]]:
    """Adapters on attention only: no expert LoRA, so no expert fold either."""
    if not s.lora.target_parameters:
        return []
    return [("train.lora.target_parameters: [] (attention adapters only)",
             replace(s, lora=s.lora.model_copy(update={"target_parameters": []})))]


def _smaller_dequant_chunks(s: Shape) -> list[tuple[str, Shape]]:
    """Fewer 4-bit experts dequantized at once (routed, nf4), halvings down to 8."""
    if s.quantization != "nf4" or s.expert_compute != "routed":
        return []
    return [(f"train.experts_per_dequant: {c}", replace(s, experts_per_dequant=c))
            for c in _halvings(s.experts_per_dequant or 128) if c >= 8]


def _offload(s: Shape) -> list[tuple[str, Shape]]:
    """Expert adapters in host memory: slower steps, torch AdamW (fp32 moments); needs routed experts."""
    if s.offload_expert_adapters or not s.on_gpu or not s.lora.target_parameters:
        return []
    from tasks.core.trainer import resolve_optimizer

    optimizer = resolve_optimizer("auto", s.on_gpu, offload_expert_adapters=True)
    return [("train.offload_expert_adapters: on",
             replace(s, offload_expert_adapters=True, expert_compute="routed", optimizer=optimizer))]


def _bf16_adapters(s: Shape) -> list[tuple[str, Shape]]:
    """Adapter weights and gradients in bf16, the optimizer's math in fp32 (bitsandbytes' 8-bit AdamW);
    not with offloaded expert adapters (they step with torch's AdamW)."""
    from tasks.core.trainer import resolve_optimizer

    if s.adapter_dtype == "bf16" or s.offload_expert_adapters:
        return []
    optimizer = resolve_optimizer("auto", s.on_gpu, adapter_dtype="bf16")
    return [("train.adapter_dtype: bf16", replace(s, adapter_dtype="bf16", optimizer=optimizer))]


# Changes that lower a step's memory, cheapest in quality first; each gives its candidates, mildest
# first. The first four change no result; frozen weights left in bf16 change them by rounding;
# expert adapters in host memory trade speed (and step them with fp32 AdamW); bf16 adapters round
# their updates; the rest trade quality (4-bit weights, a smaller expert rank, no expert adapters)
# or the size of a step (batch).
LEVERS: tuple[Callable[[Shape], list[tuple[str, Shape]]], ...] = (
    lambda s: [(f"train.loss_chunk_tokens: {c}", replace(s, loss_chunk_tokens=c)) for c in _smaller_chunks(s.loss_chunk_tokens)],
    lambda s: [] if s.gradient_checkpointing else [("train.gradient_checkpointing: true", replace(s, gradient_checkpointing=True))],
    _smaller_dequant_chunks,
    lambda s: [] if s.expert_compute == "routed" else [("train.expert_compute: routed", replace(s, expert_compute="routed"))],
    lambda s: [("train.upcast_frozen: false", replace(s, upcast_frozen=False))] if s.upcast_frozen and s.quantization == "nf4" else [],
    _offload,
    _bf16_adapters,
    lambda s: [("train.quantization: nf4", replace(s, quantization="nf4"))] if s.quantization == "none" else [],
    _expert_ranks,
    _no_expert_adapters,
    lambda s: [(f"batch_size: {b}", replace(s, batch_size=b)) for b in _halvings(s.batch_size)],
)


def cheapest_lever(model: nn.Module, shape: Shape, dtype_bytes: int, limit: int) -> str | None:
    """The first change that alone makes the estimate fit `limit` (levers in order, each one's
    mildest candidate that fits); else the levers added up in order, each as far as it goes, until
    it fits; None when even all of them do not."""
    def fits(candidate: Shape) -> bool:
        return sum(stage_memory(model, candidate, dtype_bytes).values()) <= limit

    for lever in LEVERS:
        for description, candidate in lever(shape):
            if fits(candidate):
                return description
    applied, current = [], shape
    for lever in LEVERS:
        candidates = lever(current)
        for description, candidate in candidates:
            if fits(candidate):
                return " + ".join([*applied, description])
        if candidates:
            applied.append(candidates[-1][0])
            current = candidates[-1][1]
    return None


# --- the plan -----------------------------------------------------------------------------------


def _tokens_per_row(stage: str, report: dict, packed: bool, max_length: int) -> tuple[int | None, float, bool]:
    """(rows, mean tokens per row, measured?) of the stage's training data, from prepare's report."""
    line = report.get(stage)
    if not line:
        return None, float(max_length), False
    if packed and line.get("packing"):
        packing = line["packing"]
        return packing["n_rows"], packing["n_tokens"] / max(packing["n_rows"], 1), True
    own = max(line["train_rows"] - line.get("train_rows_replayed", 0), 1)
    return line["train_rows"], line["train_tokens"] / own, True


def _measured_throughput(stage: str) -> float | None:
    """Tokens/s of the stage's last run here, if it ran."""
    path = paths.train_metrics(stage)
    if not path.exists():
        return None
    return float(json.loads(path.read_text()).get("tokens_per_second") or 0) or None


def memory_limit(params: Params, here: bool = True) -> int | None:
    """`train.memory_limit_gb`; else, when training runs here, the free memory of this machine's
    GPU (else of the machine); else None (no limit known)."""
    from tasks.core.preflight import available_bytes

    limit = params.train.memory_limit_gb
    return int(limit * GIB) if limit else available_bytes() if here else None


def make_plan(params: Params, root: Path = Path("."), tokens_per_second: float | None = None,
              limit_bytes: int | None = None, for_gpu: bool | None = None, only_running: bool = False) -> Plan:
    """The plan; `for_gpu`: plan for a CUDA GPU (bf16, 8-bit optimizer under `auto`) whatever this
    machine has; None: for this machine. `only_running`: training stages that will run only (the
    flow's check: with every training stage cached no model is built, and it takes ~2 s)."""
    stages = stage_plans(root)
    running = {s.stage for s in stages if s.runs}
    names = [s for s in params.stage_names if not only_running or f"train@{s}" in running]
    if not names:
        return Plan(stages, [], bool(for_gpu))
    import torch

    from tasks.core.expert_offload import resolve_expert_offload
    from tasks.core.trainer import resolve_optimizer

    on_gpu = torch.cuda.is_available() if for_gpu is None else for_gpu
    dtype_bytes = 2 if on_gpu else 4  # bf16 on a GPU, fp32 on a CPU (tasks/core/modeling.py::load_base_model)
    report = json.loads(paths.DATA_REPORT.read_text()) if paths.DATA_REPORT.exists() else {}
    model = meta_model(planned_config(params))
    train = params.train
    processes = train.launcher.num_processes or 1
    training = []
    for stage in names:
        job = params.train_job(stage)
        spec = job.spec.train
        packed = train.packing
        seq_len = (params.prepare.packing.row_length or params.prepare.max_length) if packed else params.prepare.max_length
        rows, per_row, measured = _tokens_per_row(stage, report, packed, params.prepare.max_length)
        offload = resolve_expert_offload(train, job.lora, on_gpu)
        shape = Shape(spec.batch_size, seq_len, train.quantization, train.loss_chunk_tokens, train.gradient_checkpointing,
                      job.lora, resolve_optimizer(train.optimizer, on_gpu, offload, train.adapter_dtype),
                      train.expert_compute, train.upcast_frozen, offload, on_gpu, train.experts_per_dequant,
                      train.adapter_dtype)
        plan = TrainPlan(stage, rows, per_row, measured, spec.max_steps,
                         int(spec.max_steps * spec.batch_size * spec.gradient_accumulation_steps * per_row * processes),
                         stage_memory(model, shape, dtype_bytes), limit_bytes,
                         tokens_per_second or _measured_throughput(stage), processes)
        if not plan.fits:
            plan.lever = cheapest_lever(model, shape, dtype_bytes, limit_bytes)  # type: ignore[arg-type]
        training.append(plan)
    return Plan(stages, training, on_gpu)


def render(plan: Plan) -> str:
    """The plan as a few tables for people."""
    lines = ["stages:"]
    for s in plan.stages:
        lines.append(f"  {s.stage:22s} {'RUNS' if s.runs else 'cached'}" + (f"  ({'; '.join(s.reasons)})" if s.reasons else ""))
    if not plan.training:
        return "\n".join([*lines, "training: nothing to train (every training stage is cached)"])
    lines.append("training:")
    lines.append(f"  {'stage':14s} {'rows':>8s} {'tok/row':>8s} {'steps':>6s} {'tokens':>12s} {'memory GiB':>11s} "
                 f"{'limit GiB':>10s} {'fits':>5s} {'tok/s':>9s} {'hours':>7s}")
    for t in plan.training:
        rows = f"{t.rows:,}" if t.rows is not None else "?"
        per_row = f"{t.tokens_per_row:.0f}" + ("" if t.tokens_per_row_measured else "*")
        limit = f"{t.limit_bytes / GIB:.2f}" if t.limit_bytes else "-"
        speed = f"{t.tokens_per_second:,.0f}" if t.tokens_per_second else "?"
        hours = f"{t.seconds / 3600:.3f}" if t.seconds is not None else "?"
        lines.append(f"  {t.stage:14s} {rows:>8s} {per_row:>8s} {t.steps:>6d} {t.tokens:>12,d} {t.peak_bytes / GIB:>11.3f} "
                     f"{limit:>10s} {'yes' if t.fits else 'NO':>5s} {speed:>9s} {hours:>7s}")
        lines.append("    memory: " + ", ".join(f"{k} {v / GIB:.3f}" for k, v in t.memory.items()) + " GiB")
        if not t.fits:
            lines.append(f"    does not fit: {'try ' + t.lever if t.lever else 'no single lever here makes it fit'}")
    if any(not t.tokens_per_row_measured for t in plan.training):
        lines.append("  * prepare has not run: tokens per row is prepare.max_length, an upper bound")
    hours = plan.device_hours
    unit = "GPU-hours" if plan.on_gpu else "CPU-hours (no GPU here)"
    lines.append(f"projected {unit} for the stages that run: "
                 + (f"{hours:.3f}" if hours is not None else "unknown (give --tokens-per-second, or run a stage once)"))
    return "\n".join(lines)


def no_fit_message(plan: Plan) -> str:
    """Which stages cannot fit, by how much, and the cheapest lever for each."""
    lines = []
    for t in plan.training:
        if not t.fits:
            lever = f"try {t.lever}" if t.lever else "no lever here makes it fit (a smaller model or a larger device)"
            lines.append(f"train@{t.stage}: estimated peak {t.peak_bytes / GIB:.2f} GiB > {t.limit_bytes / GIB:.2f} GiB; {lever}")  # type: ignore[operator]
    return "cannot fit the memory limit (`python -m tasks.plan` shows every term):\n  " + "\n  ".join(lines)


def plan_json(plan: Plan) -> dict[str, Any]:
    return {"stages": [asdict(s) for s in plan.stages],
            "training": [asdict(t) | {"peak_bytes": t.peak_bytes, "fits": t.fits, "seconds": t.seconds} for t in plan.training],
            "on_gpu": plan.on_gpu, "device_hours": plan.device_hours, "fits": plan.fits}


def main(argv: list[str] | None = None) -> int:
    failed: list[str] = []

    def run(args) -> list[str]:
        params = load_params(args.params)
        here = args.device == "here"
        plan = make_plan(params, Path("."), args.tokens_per_second, memory_limit(params, here), None if here else True)
        print(json.dumps(plan_json(plan), indent=2) if args.json else render(plan))
        if not plan.fits:
            failed.append(no_fit_message(plan))
        return []

    def add_arguments(parser) -> None:
        parser.add_argument("--tokens-per-second", type=float, default=None,
                            help="training throughput to project time with (default: each stage's last measured run)")
        parser.add_argument("--device", choices=["here", "gpu"], default="here",
                            help="plan for this machine, or for a CUDA GPU (bf16; its memory is train.memory_limit_gb)")
        parser.add_argument("--json", action="store_true", help="the plan as JSON")

    status = run_stage_cli("plan", __doc__, run, argv, add_arguments=add_arguments)
    if status == 0 and failed:
        print(f"plan: {failed[0]}", file=sys.stderr)
        return 1
    return status


if __name__ == "__main__":
    sys.exit(main())
