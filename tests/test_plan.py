"""`python -m tasks.plan`: what will run and why, what each training stage will cost, and a
non-zero exit naming the stage and the cheapest lever when one cannot fit. The flagship is planned
from its real config.json on the meta device (nothing loaded, nothing downloaded)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from tasks.core.config import LoraConfig
from tasks.plan import Shape, cheapest_lever, lora_parameters, meta_model, stage_memory
from tests.pipeline_workspace import PROJECT, make_workspace, small_params

FLAGSHIP = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "qwen3" / "qwen3_30b_a3b_base_config.json"
if not FLAGSHIP.exists():
    FLAGSHIP = Path("/work/shared/fixtures/qwen3/qwen3_30b_a3b_base_config.json")
needs_flagship = pytest.mark.skipif(not FLAGSHIP.exists(), reason=f"Qwen3 fixtures not found at {FLAGSHIP}")
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
GIB = 2**30


@pytest.fixture(scope="module")
def flagship_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("flagship")
    shutil.copyfile(FLAGSHIP, folder / "config.json")
    return folder


@pytest.fixture(scope="module")
def flagship(flagship_folder):
    from transformers import AutoConfig

    return meta_model(AutoConfig.from_pretrained(flagship_folder))


def plan_in(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tasks.plan", *args], cwd=root, capture_output=True, text=True,
                          timeout=300, env={**__import__("os").environ, "PYTHONPATH": str(PROJECT)})


@needs_flagship
def test_lora_on_the_meta_flagship_counts_what_peft_would_add(flagship):
    """48 layers x 128 experts x r x (2 x 2048 + 3 x 768) on the experts, 13.4 M on attention at r 16."""
    assert next(flagship.parameters()).is_meta
    assert lora_parameters(flagship, LoraConfig(r=16, alpha=32, target_modules=ATTENTION)) == 13_369_344
    assert lora_parameters(flagship, LoraConfig(r=16, alpha=32, target_modules=ATTENTION, target_parameters=EXPERTS)) == (
        13_369_344 + 629_145_600)
    quarter = LoraConfig(r=16, alpha=32, target_modules=ATTENTION, target_parameters=EXPERTS, expert_r=4)
    assert lora_parameters(flagship, quarter) == 13_369_344 + 629_145_600 // 4


@needs_flagship
def test_flagship_memory_terms_and_the_cheapest_lever(flagship):
    lora = LoraConfig(r=16, alpha=32, target_modules=ATTENTION, target_parameters=EXPERTS)
    shape = Shape(1, 2048, "nf4", 1024, True, lora, "paged_adamw_8bit")
    terms = stage_memory(flagship, shape, dtype_bytes=2)
    # NF4 attention and experts (~15.4 GB) + bf16 embeddings, LM head, router, norms (~1.27 GB)
    assert terms["weights"] / 1e9 == pytest.approx(16.7, abs=0.1)
    assert terms["adapter"] == (13_369_344 + 629_145_600) * (4 + 4)  # fp32 weights and their gradients
    assert terms["optimizer_paged"] == (13_369_344 + 629_145_600) * 2  # 8-bit moments, in managed memory
    assert terms["logits"] == 1024 * 151_936 * 8  # one chunk's
    # routed (the default): one 4-bit stack dequantized at a time, the larger (gate_up_proj, 2/3 of the layer)
    assert terms["expert_dequant"] == 128 * 3 * 2048 * 768 * 2 * 2 // 3 and "expert_fold" not in terms
    folded = stage_memory(flagship, replace(shape, expert_compute="fold"), dtype_bytes=2)
    # fold: LoRA in one layer's 128 bf16 experts, kept for the backward, and its gradient
    assert folded["expert_fold"] == 2 * 128 * 3 * 2048 * 768 * 2 and "expert_dequant" not in folded
    peak = sum(terms.values())
    assert cheapest_lever(flagship, shape, 2, limit=peak + 1) == "train.loss_chunk_tokens: 512"  # fits already: the first that fits
    # expert adapters in host memory (-4.7 GiB of adapter, -1.2 of paged moments): before any trade in quality
    assert cheapest_lever(flagship, shape, 2, limit=peak - 2 * GIB) == "train.offload_expert_adapters: on"
    on_the_gpu_only = replace(shape, on_gpu=False)  # nothing moves on a CPU: the lever is not offered
    # next: bf16 adapter weights and gradients (8-bit AdamW keeps the math in fp32): -2.4 GiB
    assert cheapest_lever(flagship, on_the_gpu_only, 2, limit=peak - 2 * GIB) == "train.adapter_dtype: bf16"
    bf16 = stage_memory(flagship, replace(shape, adapter_dtype="bf16"), dtype_bytes=2)
    assert bf16["adapter"] == (13_369_344 + 629_145_600) * (2 + 2)
    # with it already, what is left is quality: a smaller expert rank
    bf16_cpu = replace(on_the_gpu_only, adapter_dtype="bf16", optimizer="adamw_8bit")
    bf16_peak = sum(stage_memory(flagship, bf16_cpu, 2).values())
    assert cheapest_lever(flagship, bf16_cpu, 2, limit=bf16_peak - 2 * GIB) == "train.lora.expert_r: 4"
    full_logits = Shape(1, 2048, "nf4", None, True, lora, "paged_adamw_8bit")
    extra = sum(stage_memory(flagship, full_logits, 2).values()) - peak
    assert cheapest_lever(flagship, full_logits, 2, limit=peak + extra // 2) == "train.loss_chunk_tokens: 1024"
    assert cheapest_lever(flagship, shape, 2, limit=GIB) is None
    # folded experts (+1.5 GiB) or upcast frozen weights (+1.2 GiB): switching them back is named
    # before any trade in quality, once the smallest loss chunk alone does not fit
    folded_upcast = replace(shape, expert_compute="fold", upcast_frozen=True)
    assert cheapest_lever(flagship, folded_upcast, 2, limit=peak + int(1.2 * GIB)) == "train.expert_compute: routed"
    assert cheapest_lever(flagship, replace(shape, upcast_frozen=True), 2, limit=peak) == "train.upcast_frozen: false"
    attention_only = replace(shape, lora=lora.model_copy(update={"target_parameters": []}))
    assert 18 * GIB < sum(stage_memory(flagship, attention_only, 2).values()) < peak  # still a chunk of logits too many
    assert sum(stage_memory(flagship, replace(attention_only, loss_chunk_tokens=256), 2).values()) < 18 * GIB
    # no lever alone fits 18 GiB; in order, each as far as it goes: the smallest chunks, then offloading
    assert cheapest_lever(flagship, shape, 2, limit=18 * GIB) == (
        "train.loss_chunk_tokens: 128 + train.experts_per_dequant: 8 + train.offload_expert_adapters: on")


@needs_flagship
def test_the_flagship_defaults_fit_18_gb(flagship):
    """Issue 15's goal (18 GB, 16.76 GiB), on params.yaml's own defaults as an nf4 stage on a GPU
    resolves them: r 16 on attention and experts, batch 1 x 2048, gradient checkpointing."""
    from tasks.core.config import load_params
    from tasks.core.expert_offload import resolve_expert_offload
    from tasks.core.trainer import resolve_optimizer

    train = load_params(PROJECT / "params.yaml").train.model_copy(update={"quantization": "nf4"})
    offload = resolve_expert_offload(train, train.lora, on_gpu=True)
    assert offload and train.lora.r == 16 and train.lora.expert_r is None and train.lora.target_parameters
    shape = Shape(1, 2048, "nf4", train.loss_chunk_tokens, True, train.lora, resolve_optimizer(train.optimizer, True, offload),
                  train.expert_compute, train.upcast_frozen, offload, True, train.experts_per_dequant)
    terms = stage_memory(flagship, shape, dtype_bytes=2)
    assert sum(terms.values()) <= 18e9
    assert terms["adapter"] == terms["optimizer"] == 13_369_344 * 8  # attention's LoRA only: experts' on the host
    assert terms["adapter_in_flight"] == 629_145_600 // 48 * (4 + 4 + 2)  # one layer's expert factors
    assert terms["expert_dequant"] == 128 * 3 * 2048 * 768 * 2 * 2 // 3 * 16 // 128  # 16 of 128 experts at once
    assert terms["logits"] == 128 * 151_936 * 8


def test_plan_on_a_fresh_workspace_runs_everything_and_estimates_tokens(tmp_path, monkeypatch):
    from tasks.core.config import load_params
    from tasks.plan import make_plan, render

    ws = make_workspace(tmp_path / "ws", small_params(yaml.safe_load((PROJECT / "params.yaml").read_text())))
    done = plan_in(ws.root, "--json", "--tokens-per-second", "1000")
    assert done.returncode == 0, done.stderr[-3000:]
    plan = json.loads(done.stdout)
    assert [s["stage"] for s in plan["stages"]][:4] == ["ingest", "base", "prepare", "validate"]
    assert all(s["runs"] and s["reasons"] for s in plan["stages"])  # nothing ran yet
    assert [t["stage"] for t in plan["training"]] == ["embedding", "syntax", "thinking", "instructions"]
    assert all(not t["tokens_per_row_measured"] and t["fits"] and t["peak_bytes"] > 0 for t in plan["training"])
    assert plan["device_hours"] == pytest.approx(sum(t["tokens"] for t in plan["training"]) / 1000 / 3600)
    monkeypatch.chdir(ws.root)  # the same plan, rendered for people
    text = render(make_plan(load_params("params.yaml"), ws.root, tokens_per_second=1000, for_gpu=False))
    assert "* prepare has not run" in text and "projected CPU-hours (no GPU here) for the stages that run: 0.0" in text


@needs_flagship
def test_a_stage_that_cannot_fit_exits_1_naming_it_and_a_lever(tmp_path, flagship_folder):
    params = small_params(yaml.safe_load((PROJECT / "params.yaml").read_text()))
    params["model"]["name_or_path"] = str(flagship_folder)
    params["train"].update(quantization="nf4", memory_limit_gb=18, gradient_checkpointing=True)
    params["prepare"]["max_length"] = 2048
    for stage in params["stages"].values():
        stage["train"]["batch_size"] = 1
    ws = make_workspace(tmp_path / "ws", params)
    done = plan_in(ws.root, "--device", "gpu")  # the defaults: expert adapters on the host, 256-token loss chunks
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "adapter_in_flight" in done.stdout and "weights 15.5" in done.stdout
    params["train"]["offload_expert_adapters"] = "off"
    (ws.root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    done = plan_in(ws.root, "--device", "gpu")
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    lever = "train.offload_expert_adapters: on"
    assert f"train@embedding: estimated peak 22.28 GiB > 18.00 GiB; try {lever}" in done.stderr
    assert f"does not fit: try {lever}" in done.stdout
    assert "weights 15.5" in done.stdout or "weights 15.6" in done.stdout  # GiB: NF4 experts and attention, bf16 rest
    # the plan reads train.expert_compute and train.upcast_frozen from params.yaml
    params["train"].update(expert_compute="fold", upcast_frozen=True)
    (ws.root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    done = plan_in(ws.root, "--device", "gpu", "--json")
    memory = json.loads(done.stdout)["training"][0]["memory"]
    assert "expert_fold" in memory and "expert_dequant" not in memory
    assert memory["weights"] / GIB == pytest.approx(16.73, abs=0.01)  # bf16 embeddings, LM head, norms, router in fp32


@pytest.mark.slow
def test_the_flow_logs_the_plan_and_stops_before_any_stage_on_a_stage_that_cannot_fit(tmp_path):
    ws = make_workspace(tmp_path / "ws", small_params(yaml.safe_load((PROJECT / "params.yaml").read_text())))
    before = (ws.root / "params.yaml").read_text()
    done = ws.flow("--set", "train.memory_limit_gb=0.001", check=False)
    assert done.returncode == 1
    assert (ws.root / "params.yaml").read_text() == before  # the override that cannot fit is not kept
    assert "train@embedding: estimated peak" in done.stderr and "> 0.00 GiB" in done.stderr
    assert not (ws.root / "dvc.lock").exists() and not (ws.root / "data" / "raw").exists()  # nothing ran
    # a run that fits logs the plan: tests/test_pipeline_e2e.py::test_flow_runs_every_stage_in_dag_order


def test_the_flows_plan_builds_no_model_when_every_training_stage_is_cached(tmp_path, monkeypatch):
    from tasks import plan as plan_module
    from tasks.core.config import load_params

    ws = make_workspace(tmp_path / "ws", small_params(yaml.safe_load((PROJECT / "params.yaml").read_text())))
    monkeypatch.chdir(ws.root)
    all_cached = [plan_module.StagePlan(name, name == "export", ["changed params: export.max_kl"] * (name == "export"))
                  for name in ("prepare", "train@embedding", "export")]
    monkeypatch.setattr(plan_module, "stage_plans", lambda root: all_cached)
    monkeypatch.setattr(plan_module, "meta_model", lambda config: pytest.fail("no model is needed"))
    plan = plan_module.make_plan(load_params("params.yaml"), ws.root, only_running=True)
    assert plan.training == [] and plan.fits
    assert "nothing to train (every training stage is cached)" in plan_module.render(plan)
