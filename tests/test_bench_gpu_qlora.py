"""bench/gpu_qlora.py runs its GPU code path on the tiny config on CPU: the meta-built model has the
production nf4 layout with nothing left on meta, the default LoRA reaches attention and the 4-bit
experts, a few steps train the expert adapters, the JSON holds the report; the flagship refuses to
run without a GPU; and the memory arithmetic the report quotes is the flagship's."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.gpu_qlora import (
    BenchSettings,
    adapt,
    build_for,
    flagship_config,
    lora_parameter_count,
    main,
    run_benchmark,
    tiny_config,
)
from tasks.core.config import load_params

ROOT = Path(__file__).resolve().parents[1]
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
REPORT_KEYS = {
    "device", "config", "seq_len", "batch_size", "steps", "attention_rank", "expert_rank", "trainable_parameters",
    "four_bit_parameters", "peak_build_gib", "peak_train_gib", "tokens_per_second", "loss_first", "loss_last",
    "goal", "versions", "preflight",
}


@pytest.fixture(scope="module")
def lora():
    return load_params(ROOT / "params.yaml").train.lora


def tiny(dtype_name: str = "fp32", **overrides) -> BenchSettings:
    values = {"config_name": "tiny", "device": "cpu", "dtype_name": dtype_name, "seq_len": 32, "batch_size": 2,
              "steps": 2, "warmup": 1, "attention_rank": 16, "expert_rank": 16}
    return BenchSettings(**{**values, **overrides})


@pytest.fixture(scope="module", params=["fp32", "bf16"])  # bf16: the dtypes the GPU run uses
def benchmarked(request, lora):
    model, result = run_benchmark(tiny(request.param), lora)
    return request.param, model, result


def expert_lora_b(model) -> dict[str, torch.Tensor]:
    """Every expert stack's LoRA B factor (peft starts them at zero, so nonzero means learned)."""
    from peft.tuners.lora.layer import ParamWrapper

    return {f"{name}:{m.parameter_name}": m.lora_B["default"].weight.detach().clone()
            for name, m in model.named_modules() if isinstance(m, ParamWrapper)}


class TestBuild:
    def test_meta_built_model_has_the_production_nf4_layout(self):
        import bitsandbytes as bnb
        from bitsandbytes.nn.parametrize import Bnb4bitParametrization

        model = build_for(tiny())
        assert [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta] == []
        for layer in model.model.layers:
            for proj in ATTENTION:
                linear = getattr(layer.self_attn, proj)
                assert isinstance(linear, bnb.nn.Linear4bit), proj
                assert linear.weight.quant_state.quant_type == "nf4" and linear.weight.quant_state.nested
            stacks = layer.mlp.experts.parametrizations
            assert {p: type(stacks[p][0]) for p in ("gate_up_proj", "down_proj")} == {
                "gate_up_proj": Bnb4bitParametrization, "down_proj": Bnb4bitParametrization}
            assert layer.mlp.gate.weight.dtype == torch.float32  # router stays full precision
        assert model.lm_head.weight.dtype == model.model.embed_tokens.weight.dtype == torch.float32
        # Random weights at std 0.02 give near-uniform predictions: the loss is ln(vocab).
        ids = torch.randint(0, 512, (4, 64), generator=torch.Generator().manual_seed(0))
        loss = model(input_ids=ids, labels=ids).loss.item()
        assert loss == pytest.approx(math.log(512), abs=0.1)

    def test_adapt_turns_on_checkpointing_and_starts_expert_lora_at_zero(self, lora):
        settings = tiny()
        model = adapt(build_for(settings), settings, lora)
        assert model.is_activation_checkpointing and model.training
        factors = expert_lora_b(model)
        assert len(factors) == 2 * tiny_config().num_hidden_layers  # gate_up_proj and down_proj per layer
        assert all(torch.count_nonzero(b) == 0 for b in factors.values())


class TestRun:
    def test_experts_in_4bit_and_lora_on_experts_and_attention(self, benchmarked):
        _, _, result = benchmarked
        preflight = result["preflight"]
        assert preflight["four_bit_by_part"]["experts"] == preflight["parameters_by_part"]["experts"] > 0
        # q/k/v/o and both expert stacks in 4 bits; embeddings, router and norms are not.
        assert result["four_bit_parameters"]["by_part"] == {"attention": 24576, "experts": 49152}
        # Exactly the default r 16 on both: attention 2 x 16 x (2 x 128 + 2 x 96), experts 2 x 16 x 4 x (2 x 64 + 3 x 32).
        assert result["trainable_parameters"]["by_part"] == {"attention": 14336, "experts": 28672}
        assert result["trainable_parameters"]["by_part"] == lora_parameter_count(tiny_config(), 16, 16)

    def test_steps_train_the_expert_adapters_with_a_finite_loss(self, benchmarked):
        dtype, model, result = benchmarked
        assert len(result["losses"]) == 3 and all(math.isfinite(x) for x in result["losses"])
        assert result["loss_first"] == pytest.approx(math.log(512), abs=0.1)
        factors = expert_lora_b(model)
        assert factors and all(torch.count_nonzero(b) > 0 for b in factors.values()), dtype
        assert result["tokens_per_second"] > 0 and result["peak_train_gib"] is None  # no GPU: not measured
        assert result["goal"] == {"peak_train_gb_at_most": 18.0, "met": None}
        assert result["expert_compute"] == "routed" and result["estimate"]["error"] is None
        assert result["estimate"]["gib"] == pytest.approx(sum(result["estimate"]["terms_gib"].values()), abs=0.01)

    def test_cli_writes_the_report_with_separate_expert_rank(self, tmp_path, capsys):
        out = tmp_path / "tiny.json"
        argv = ["--config", "tiny", "--device", "cpu", "--steps", "2", "--warmup", "1", "--seq-len", "16",
                "--attention-rank", "8", "--expert-rank", "4", "--out", str(out)]
        assert main(argv) == 0
        result = json.loads(out.read_text())
        assert REPORT_KEYS <= result.keys()
        assert (result["attention_rank"], result["expert_rank"], result["steps"], result["seq_len"]) == (8, 4, 2, 16)
        assert result["trainable_parameters"]["by_part"] == {"attention": 7168, "experts": 7168}
        assert result["versions"]["torch"] == torch.__version__
        assert "tokens/s" in capsys.readouterr().out


class TestFlagship:
    @pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the flagship would run")
    def test_without_a_gpu_exits_2_with_a_message(self):
        done = subprocess.run([sys.executable, "bench/gpu_qlora.py", "--config", "flagship"], cwd=ROOT,
                              capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 2
        assert "needs a CUDA GPU" in done.stderr and "--config tiny --device cpu" in done.stderr
        assert "Traceback" not in done.stderr

    def test_estimate_counts_one_chunk_of_logits_under_the_chunked_loss(self, capsys):
        assert main(["--estimate", "--loss-chunk-tokens", "0"]) == 0
        full = json.loads(capsys.readouterr().out)
        assert main(["--estimate"]) == 0  # params.yaml's train.loss_chunk_tokens
        chunked = json.loads(capsys.readouterr().out)
        chunk = load_params(ROOT / "params.yaml").train.loss_chunk_tokens
        assert (full["loss_chunk_tokens"], chunked["loss_chunk_tokens"]) == (None, chunk)
        gib = 2**30
        assert full["terms_gib"]["logits"] == pytest.approx(2048 * 151_936 * 8 / gib, abs=1e-3)
        assert chunked["terms_gib"]["logits"] == pytest.approx(chunk * 151_936 * 8 / gib, abs=1e-3)
        assert chunked["total_gib"] < full["total_gib"]

    def test_estimate_is_the_project_memory_model_for_the_flagship(self, capsys):
        """Not a second model: the terms tasks.plan prints for the same shape."""
        from dataclasses import replace

        from tasks.plan import Shape, meta_model, stage_memory

        assert main(["--estimate"]) == 0
        estimate = json.loads(capsys.readouterr().out)
        # Default r 16: one rank-16 pair per expert, 48 layers x 128 experts x 16 x (2 x 2048 + 3 x 768).
        assert estimate["lora_parameters"] == {"attention": 13_369_344, "experts": 629_145_600}
        assert estimate["lora_parameters"] == lora_parameter_count(flagship_config(), 16, 16)
        train = load_params(ROOT / "params.yaml").train
        # as an nf4 stage on a GPU resolves params.yaml: expert adapters on the host, torch AdamW
        assert estimate["offload_expert_adapters"] and estimate["experts_per_dequant"] == train.experts_per_dequant
        shape = Shape(1, 2048, "nf4", train.loss_chunk_tokens, True, train.lora, "adamw_torch", train.expert_compute,
                      offload_expert_adapters=True, experts_per_dequant=train.experts_per_dequant)
        terms = stage_memory(meta_model(flagship_config()), shape, dtype_bytes=2)
        assert estimate["total_gib"] == pytest.approx(sum(terms.values()) / 2**30, abs=1e-3)
        assert estimate["total_gib"] * 2**30 <= 18e9  # issue 15's 18 GB
        assert main(["--estimate", "--no-offload-expert-adapters"]) == 0  # on the GPU: the paged 8-bit optimizer
        on_gpu = json.loads(capsys.readouterr().out)
        on_gpu_terms = stage_memory(meta_model(flagship_config()), replace(
            shape, optimizer="paged_adamw_8bit", offload_expert_adapters=False), dtype_bytes=2)
        assert on_gpu["total_gib"] == pytest.approx(sum(on_gpu_terms.values()) / 2**30, abs=1e-3)
        assert "adapter_in_flight" not in on_gpu["terms_gib"] and on_gpu["terms_gib"]["adapter"] > 4.7
        assert estimate["terms_gib"]["weights"] == pytest.approx(15.55, abs=0.01)
        assert main(["--estimate", "--expert-rank", "0", "--expert-compute", "fold"]) == 0
        attention_only = json.loads(capsys.readouterr().out)
        assert attention_only["lora_parameters"]["experts"] == 0 and "expert_fold" not in attention_only["terms_gib"]
        no_experts = stage_memory(meta_model(flagship_config()), replace(
            shape, lora=train.lora.model_copy(update={"target_parameters": []}), expert_compute="fold",
            optimizer="paged_adamw_8bit", offload_expert_adapters=False), dtype_bytes=2)
        assert attention_only["total_gib"] == pytest.approx(sum(no_experts.values()) / 2**30, abs=1e-3)

    def test_attention_only_and_fold_run_on_the_tiny_config(self, tmp_path, capsys):
        for extra in (["--expert-rank", "0"], ["--expert-compute", "fold", "--loss-chunk-tokens", "0"]):
            out = tmp_path / "run.json"
            argv = ["--config", "tiny", "--device", "cpu", "--steps", "1", "--warmup", "0", "--seq-len", "16",
                    "--out", str(out), *extra]
            assert main(argv) == 0
            result = json.loads(out.read_text())
            routed = extra[0] == "--expert-rank"
            assert result["expert_compute"] == ("routed" if routed else "fold")
            assert (result["trainable_parameters"]["by_part"].get("experts", 0) == 0) == routed
            assert ("expert_fold" in result["estimate"]["terms_gib"]) != routed


def test_bf16_adapters_run_on_the_tiny_config_with_8bit_adamw(tmp_path):
    out = tmp_path / "run.json"
    argv = ["--config", "tiny", "--device", "cpu", "--steps", "1", "--warmup", "0", "--seq-len", "16", "--out", str(out)]
    assert main([*argv, "--adapter-dtype", "bf16"]) == 0
    result = json.loads(out.read_text())
    assert (result["adapter_dtype"], result["optimizer"]) == ("bf16", "adamw_8bit")
    trainable = result["trainable_parameters"]["total"]
    assert result["preflight"]["adapter_bytes"] == trainable * 2  # bf16 weights
    with pytest.raises(SystemExit, match="drop one"):
        main([*argv, "--adapter-dtype", "bf16", "--offload-expert-adapters"])


def test_the_trainer_path_bench_runs_what_train_runs_on_the_tiny_config():
    """bench/gpu_trainer_path.py: the adapters module and the Trainer, as a training stage calls them."""
    from bench.gpu_trainer_path import trainer_path_run

    result = trainer_path_run("tiny", steps=2, seq_len=32, device="cpu")
    assert result["steps"] == 2 and math.isfinite(result["first_loss"]) and result["tokens_per_second"] > 0
    train = load_params(ROOT / "params.yaml").train
    assert (result["expert_compute"], result["upcast_frozen"]) == (train.expert_compute, train.upcast_frozen)
    assert result["peak_train_gib"] is None  # no GPU here
