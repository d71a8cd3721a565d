"""Training stages on the tiny Qwen3-MoE: real LoRA steps on CPU, in-process, tiny sizes."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tasks import train as train_step
from tasks.core import paths
from tasks.core.adapters import attach_adapter, stage_lora
from tasks.core.config import parse_params
from tasks.core.modeling import BaseInfo, load_base_model
from tests.pipeline_workspace import PROJECT, build_prepared_project, small_params


def tiny_params(quantization: str = "none", expert_lora: bool = True, policy: str = "continue"):
    raw = small_params(yaml.safe_load((PROJECT / "params.yaml").read_text()))
    for stage in raw["stages"].values():
        stage["data"]["n_records"] = 60
    raw["model"]["tiny"]["pretrain"]["max_steps"] = 5
    for stage in raw["stages"].values():
        stage["train"].update(max_steps=6, batch_size=4)
    raw["train"]["quantization"] = quantization
    raw["train"]["chain_policy"] = policy
    if not expert_lora:
        raw["train"]["lora"]["target_parameters"] = []
    return parse_params(raw)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """ingest -> base -> prepare in a temp project root; yields that root."""
    root = tmp_path_factory.mktemp("train")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        build_prepared_project(root, tiny_params())
        yield root


@pytest.fixture
def in_project(prepared, monkeypatch):
    monkeypatch.chdir(prepared)
    return prepared


def lora_tensors(stage: str) -> dict:
    return load_file(paths.adapter_dir(stage) / "adapter_model.safetensors")


def test_first_stage_trains_a_new_adapter_on_attention_and_experts(in_project):
    result = train_step.train_stage("embedding", tiny_params())
    assert result.summary.steps == 6
    assert result.eval_loss == pytest.approx(result.eval_loss) and result.eval_loss > 0
    tensors = lora_tensors("embedding")
    assert any("q_proj.lora_A" in k for k in tensors)
    assert any("experts" in k for k in tensors), "LoRA must reach the fused MoE experts"
    assert not any("mlp.gate." in k for k in tensors), "the router is not adapted by default"
    info = json.loads((paths.adapter_dir("embedding") / "stage.json").read_text())
    assert info == {"stage": "embedding", "init_from": "base", "policy": "continue", "merged_chain": [],
                    "quantization": "none", "kind": "pretrain", "processes": 1}
    history = [json.loads(line) for line in paths.train_history("embedding").read_text().splitlines()]
    assert history[0]["step"] == 1 and all(row["tokens_per_second"] > 0 for row in history)
    layers = tiny_params().model.tiny.num_hidden_layers
    for row in history:  # MoE router load: normalised entropy per layer, 1.0 = perfectly balanced
        per_layer = [row[f"router_entropy.layer{i}"] for i in range(layers)]
        assert all(0.0 < e <= 1.0 for e in per_layer)
        assert row["router_entropy"] == pytest.approx(sum(per_layer) / layers)
    metrics = json.loads(paths.train_metrics("embedding").read_text())
    assert metrics["steps"] == 6 and metrics["trainable_parameters"] == result.trainable_parameters
    # what the stage cost: on a CPU, no GPU-hours, and the whole stage's wall time (more than training's)
    assert (metrics["device"], metrics["device_count"], metrics["gpu_hours"]) == ("cpu", 0, 0.0)
    assert metrics["wall_seconds"] > metrics["seconds"] > 0
    assert metrics["tokens_trained"] == metrics["tokens_seen"] > 0 and metrics["tokens_per_second"] > 0


def test_packed_training_reads_the_packed_rows_and_counts_only_real_tokens(in_project):
    import pyarrow.parquet as pq

    params = tiny_params()
    params = params.model_copy(update={"train": params.train.model_copy(update={"packing": True})})
    result = train_step.train_stage("embedding", params)
    assert result.summary.steps == 6
    packed = pq.read_table(paths.packed_file("embedding")).to_pylist()
    per_row = sorted(len(r["input_ids"]) for r in packed)
    # 6 steps x 4 packed rows, every token real (no padding is counted, none exists)
    assert 24 * per_row[0] <= result.summary.tokens_seen <= 24 * per_row[-1]
    assert per_row[0] > params.prepare.max_length * 0.5  # rows are mostly full: packing did its job
    assert train_step.run_key("embedding", params) != train_step.run_key("embedding", tiny_params())


def test_gradient_checkpointing_recomputes_layers_and_trains_the_same_steps(in_project, monkeypatch):
    from transformers.models.qwen3_moe import modeling_qwen3_moe as qwen3_moe

    calls = {"n": 0}
    # Count attention calls: the decoder layer's own forward is the checkpointed one, so it is left alone.
    forward = qwen3_moe.Qwen3MoeAttention.forward

    def counting(self, *args, **kwargs):
        if self.training:
            calls["n"] += 1
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(qwen3_moe.Qwen3MoeAttention, "forward", counting)
    params = tiny_params()
    checkpointed = params.model_copy(update={"train": params.train.model_copy(update={"gradient_checkpointing": True})})
    plain = train_step.train_stage("embedding", params).summary.history
    plain_calls, calls["n"] = calls["n"], 0
    recomputed = train_step.train_stage("embedding", checkpointed).summary.history
    assert calls["n"] == 2 * plain_calls  # every layer runs again in the backward pass
    assert [row["loss"] for row in recomputed] == pytest.approx([row["loss"] for row in plain], abs=1e-4)


def test_a_stage_trains_the_same_steps_with_the_chunked_loss(in_project, monkeypatch):
    """train.loss_chunk_tokens through the real Trainer: same losses step by step as full logits."""
    from tasks.core import lm_loss

    chunks = {"n": 0}
    chunk_loss = lm_loss._chunk_loss_sum

    def counting(*args):
        chunks["n"] += 1
        return chunk_loss(*args)

    monkeypatch.setattr(lm_loss, "_chunk_loss_sum", counting)
    params = tiny_params()

    def with_chunk(chunk):
        return params.model_copy(update={"train": params.train.model_copy(update={"loss_chunk_tokens": chunk})})

    full = train_step.train_stage("embedding", with_chunk(None)).summary.history
    assert chunks["n"] == 0
    chunked = train_step.train_stage("embedding", with_chunk(16)).summary.history
    assert chunks["n"] > 2 * len(chunked)  # the Trainer's steps went through the chunks (backward: again)
    assert len(full) >= 2
    assert [row["loss"] for row in chunked] == pytest.approx([row["loss"] for row in full], abs=1e-4)
    assert train_step.run_key("embedding", with_chunk(16)) == train_step.run_key("embedding", with_chunk(None))


def test_a_stage_trains_bf16_adapters_with_8bit_adamw(in_project):
    """train.adapter_dtype: bf16 through the Trainer: optimizer auto becomes bitsandbytes' 8-bit
    AdamW (fp32 math), the adapter trains and is saved in bf16, and the next stage loads it back
    as bf16 to keep training."""
    params = tiny_params()
    params = params.model_copy(update={"train": params.train.model_copy(update={"adapter_dtype": "bf16"})})
    assert train_step.stage_schedule(params.train_job("embedding"), on_gpu=False).optimizer == "adamw_8bit"
    result = train_step.train_stage("embedding", params)
    losses = [row["loss"] for row in result.summary.history]
    assert len(losses) >= 2 and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    saved = lora_tensors("embedding")
    assert saved and all(t.dtype == torch.bfloat16 for t in saved.values())
    model = attach_adapter(load_base_model(BaseInfo.load()), params.train_job("syntax"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.bfloat16 for p in trainable)


def test_next_stage_continues_the_previous_adapter(in_project):
    params = tiny_params()
    train_step.train_stage("embedding", params)
    before = lora_tensors("embedding")
    model = attach_adapter(load_base_model(BaseInfo.load()), params.train_job("syntax"))
    # The syntax stage starts exactly where the embedding stage ended, with trainable weights.
    state = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    key = next(k for k in before if "q_proj.lora_B" in k)
    match = next(v for k, v in state.items() if k.replace(".default", "") == key)
    assert match.equal(before[key])
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) > 0
    train_step.train_stage("syntax", params)
    after = lora_tensors("syntax")
    assert set(after) == set(before) and not after[key].equal(before[key])


def test_stage_without_its_previous_adapter_fails_clearly(in_project):
    params = tiny_params()
    shutil.rmtree(paths.adapter_dir("syntax"), ignore_errors=True)
    with pytest.raises(FileNotFoundError, match=r"models/syntax.* run train@syntax first"):
        train_step.train_stage("thinking", params)


def test_unknown_stage_is_a_config_error(in_project):
    from tasks.core.config import ConfigError

    with pytest.raises(ConfigError, match="no stage 'poetry'"):
        train_step.train_stage("poetry", tiny_params())


def test_nf4_quantizes_attention_and_experts_and_trains_lora_on_both(in_project):
    """Full QLoRA on the MoE: 4-bit attention and fused experts, LoRA on both, and every expert
    LoRA factor moves (with peft alone, the inner of two nested expert adapters never learns)."""
    import bitsandbytes as bnb

    model = load_base_model(BaseInfo.load(), "nf4")
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    assert any("parametrizations.gate_up_proj.original" in n for n, _ in model.named_parameters())
    result = train_step.train_stage("embedding", tiny_params("nf4", expert_lora=True))
    assert result.summary.steps == 6 and result.summary.last_loss == result.summary.last_loss  # not NaN
    expert_b = {k: v for k, v in lora_tensors("embedding").items() if "experts" in k and "lora_B" in k}
    assert len(expert_b) == 2 * 2  # two layers x (gate_up_proj, down_proj)
    assert all(v.abs().sum() > 0 for v in expert_b.values()), "an expert adapter did not learn"
    # `continue` reloads that adapter onto the 4-bit experts and keeps training it
    train_step.train_stage("syntax", tiny_params("nf4", expert_lora=True))
    after = {k: v for k, v in lora_tensors("syntax").items() if k in expert_b}
    assert after.keys() == expert_b.keys() and all(not torch.equal(after[k], expert_b[k]) for k in after)
    assert json.loads((paths.adapter_dir("embedding") / "stage.json").read_text())["quantization"] == "nf4"
    preflight = json.loads((paths.adapter_dir("embedding") / "preflight.json").read_text())
    assert preflight["four_bit_by_part"]["experts"] == preflight["parameters_by_part"]["experts"]


def test_preflight_stops_a_stage_before_its_first_step(in_project):
    from tasks.core.preflight import PreflightError

    history = paths.train_history("embedding")
    before = history.read_text() if history.exists() else None
    params = tiny_params("nf4")
    params = params.model_copy(update={"train": params.train.model_copy(update={"memory_limit_gb": 1e-6})})
    with pytest.raises(PreflightError, match="exceeds the"):
        train_step.train_stage("embedding", params)
    report = json.loads((paths.adapter_dir("embedding") / "preflight.json").read_text())
    assert len(report["problems"]) == 1
    assert (history.read_text() if history.exists() else None) == before  # no step was taken


def test_checkpoints_resume_only_the_same_work(in_project):
    params = tiny_params()
    train_step.train_stage("embedding", params)  # syntax starts from this adapter
    key = train_step.run_key("syntax", params)
    assert train_step.run_key("syntax", tiny_params()) == key
    raw = params.model_dump(by_alias=True)
    raw["stages"]["syntax"]["train"]["learning_rate"] = 0.01
    assert train_step.run_key("syntax", parse_params(raw)) != key  # other settings
    raw = params.model_dump(by_alias=True)
    raw["stages"]["embedding"]["train"]["max_steps"] = 3
    train_step.train_stage("embedding", parse_params(raw))
    assert train_step.run_key("syntax", params) != key  # another starting adapter


def test_two_runs_of_a_stage_make_the_same_adapter(in_project):
    train_step.train_stage("embedding", tiny_params())
    first = lora_tensors("embedding")
    train_step.train_stage("embedding", tiny_params())
    second = lora_tensors("embedding")
    assert all(first[k].equal(second[k]) for k in first)


def with_stage_steps(params, stage: str, steps: int):
    raw = params.model_dump(mode="json", by_alias=True)
    raw["stages"][stage]["train"]["max_steps"] = steps
    return parse_params(raw)


def test_a_stage_of_0_steps_passes_its_starting_adapter_on(in_project):
    """The ablation's `mixed` variant: stages before the mixture train nothing."""
    params = tiny_params()
    train_step.train_stage("embedding", params)
    result = train_step.train_stage("syntax", with_stage_steps(params, "syntax", 0))
    before, after = lora_tensors("embedding"), lora_tensors("syntax")
    assert result.summary.steps == 0 and result.summary.tokens_seen == 0
    assert set(after) == set(before) and all(after[k].equal(before[k]) for k in before)
    metrics = json.loads(paths.train_metrics("syntax").read_text())
    assert metrics["steps"] == 0 and metrics["first_loss"] is None and metrics["tokens_trained"] == 0
    assert paths.train_history("syntax").read_text() == ""


def test_train_seed_changes_training_and_only_training(in_project):
    params = tiny_params()
    raw = params.model_dump(mode="json", by_alias=True)
    raw["train"]["seed"] = params.seed + 1
    reseeded = parse_params(raw)
    assert reseeded.train_job("embedding").seed == params.seed + 1 and reseeded.seed == params.seed
    train_step.train_stage("embedding", params)
    first = lora_tensors("embedding")
    train_step.train_stage("embedding", reseeded)
    second = lora_tensors("embedding")
    assert any(not first[k].equal(second[k]) for k in first)


def test_merge_policy_trains_a_new_adapter_on_the_merged_chain(in_project):
    import torch
    from peft import PeftModel

    from tasks.core.chain import base_with_chain, load_stage_model

    params = tiny_params(policy="merge")
    train_step.train_stage("embedding", params)
    train_step.train_stage("syntax", params)
    train_step.train_stage("thinking", params)
    info = json.loads((paths.adapter_dir("thinking") / "stage.json").read_text())
    assert info["policy"] == "merge" and info["merged_chain"] == ["embedding", "syntax"]

    # The merged base equals the base with the adapters applied one after the other.
    ids = torch.tensor([[3, 17, 42, 99, 5, 8]])
    merged = base_with_chain(BaseInfo.load(), ["embedding"])(input_ids=ids).logits
    stacked = PeftModel.from_pretrained(load_base_model(BaseInfo.load()), str(paths.adapter_dir("embedding")))(input_ids=ids).logits
    assert torch.allclose(merged, stacked, atol=1e-4)
    # Evaluation rebuilds the same chain, and the last adapter changes the model.
    final = load_stage_model(BaseInfo.load(), "thinking")(input_ids=ids).logits
    under = base_with_chain(BaseInfo.load(), ["embedding", "syntax"])(input_ids=ids).logits
    assert not torch.allclose(final, under, atol=1e-4)


def test_merge_policy_never_merges_into_4bit_weights(in_project):
    params = tiny_params(policy="merge")
    train_step.train_stage("embedding", params)
    from tasks.core.chain import base_with_chain

    model = base_with_chain(BaseInfo.load(), ["embedding"], "nf4")  # merged in full precision, then quantized
    assert any("parametrizations.gate_up_proj.original" in n for n, _ in model.named_parameters())
    assert not any("lora_" in n for n, _ in model.named_parameters())


def newest_stage_run(client, stage: str):
    """The latest live MLflow run of train@<stage> in the project's `stagewise` experiment."""
    return client.search_runs([client.get_experiment_by_name("stagewise").experiment_id],
                              filter_string=f"attributes.run_name = 'train@{stage}'",
                              order_by=["attributes.start_time DESC"])[0]


def test_a_stage_logs_to_mlflow_while_it_trains(in_project, monkeypatch):
    """One live run per stage: every logged step's metrics (with peak memory and router load),
    the stage's params, system metrics, and the hash of the adapter it wrote."""
    from mlflow import MlflowClient

    from tasks.core import tracking

    monkeypatch.setattr(tracking, "SYSTEM_METRICS_INTERVAL_S", 0.2)  # the tiny stage lasts about a second
    seen: list[int] = []
    original = tracking.StageRun.log_step
    monkeypatch.setattr(tracking.StageRun, "log_step", lambda self, row: (seen.append(row["step"]), original(self, row)))
    train_step.train_stage("embedding", tiny_params())
    client = MlflowClient(tracking_uri=tracking.DEFAULT_TRACKING_URI)
    run = newest_stage_run(client, "embedding")
    assert run.info.status == "FINISHED"
    history = [json.loads(line) for line in paths.train_history("embedding").read_text().splitlines()]
    assert seen == [row["step"] for row in history]  # logged as each step happened, not afterwards
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == seen
    assert run.data.metrics["peak_memory_gib"] > 0 and 0 < run.data.metrics["router_entropy"] <= 1
    assert run.data.params["learning_rate"] == str(tiny_params().stages["embedding"].train.learning_rate)
    assert run.data.params["quantization"] == "none" and run.data.params["lora.r"] == "16"
    assert any(key.startswith("system/") for key in run.data.metrics), sorted(run.data.metrics)
    adapter = paths.adapter_dir("embedding") / "adapter_model.safetensors"
    assert run.data.tags["adapter_sha256"] == tracking.file_sha256(adapter)
    assert tracking.find_stage_run(client, run.info.experiment_id, "embedding", adapter) == run.info.run_id


def test_live_steps_reach_mlflow_with_each_checkpoint(in_project, monkeypatch):
    """Steps are written in batches, and at each checkpoint: a stage killed after one has every
    step it will not redo in MLflow, however long the batch interval."""
    from mlflow import MlflowClient

    from tasks.core import tracking

    monkeypatch.setattr(tracking, "STEP_FLUSH_INTERVAL_S", 3600.0)
    written: list[list[int]] = []
    flush = tracking.StageRun.flush
    monkeypatch.setattr(tracking.StageRun, "flush",
                        lambda self: (written.append(sorted({m.step for m in self.pending})), flush(self)))
    params = tiny_params()
    params = params.model_copy(update={"train": params.train.model_copy(update={"checkpoint_every": 2})})
    train_step.train_stage("embedding", params)
    assert written[0] == [1]  # the first logged step, written with the checkpoint at step 2
    client = MlflowClient(tracking_uri=tracking.DEFAULT_TRACKING_URI)
    run_id = newest_stage_run(client, "embedding").info.run_id
    history = [json.loads(line)["step"] for line in paths.train_history("embedding").read_text().splitlines()]
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == history


def test_paged_8bit_adamw_trains_the_adapter(in_project, monkeypatch):
    """The GPU default optimizer (bitsandbytes' paged 8-bit AdamW; on CPU bitsandbytes runs it
    unpaged) is the one the Trainer builds, and it trains."""
    from transformers import Trainer

    built: list[str] = []
    create = Trainer.create_optimizer
    monkeypatch.setattr(Trainer, "create_optimizer", lambda self: built.append(type(c := create(self)).__module__) or c)
    params = tiny_params()
    params = params.model_copy(update={"train": params.train.model_copy(update={"optimizer": "paged_adamw_8bit", "mlflow_live": False})})
    result = train_step.train_stage("embedding", params)
    assert built and built[0].startswith("bitsandbytes.optim")
    assert result.summary.last_loss < result.summary.first_loss


@pytest.mark.parametrize(
    ("choice", "on_gpu", "expected"),
    [("auto", True, "paged_adamw_8bit"), ("auto", False, "adamw_torch"), ("adamw_8bit", False, "adamw_8bit")],
)
def test_optimizer_choice(choice, on_gpu, expected):
    from tasks.core.trainer import resolve_optimizer

    assert resolve_optimizer(choice, on_gpu) == expected


def test_liger_on_without_a_gpu_is_a_clear_error():
    from tasks.core.config import ConfigError
    from tasks.core.trainer import resolve_liger

    assert resolve_liger("auto", on_gpu=False) is False
    assert resolve_liger("off", on_gpu=True) is False
    with pytest.raises(ConfigError, match="train.liger_kernels is on but this machine lacks a GPU"):
        resolve_liger("on", on_gpu=False)


def test_added_tokens_grow_the_embeddings_and_the_first_stage_trains_them(in_project, monkeypatch):
    """model.add_tokens: the tokenizer gains the token, the base's embeddings grow to match, the
    first stage saves the embeddings (modules_to_save) with its adapter, and later stages and
    evaluation load that chain."""
    import dataclasses

    from tasks.core.chain import load_stage_model
    from tasks.core.modeling import load_tokenizer, new_token_count

    info = dataclasses.replace(BaseInfo.load(), added_tokens=["<tool_call>", "<think>"])  # <think> exists
    monkeypatch.setattr(BaseInfo, "load", classmethod(lambda cls, directory=None: info))
    assert new_token_count(info) == 1
    tokenizer = load_tokenizer(info)
    new_id = tokenizer.convert_tokens_to_ids("<tool_call>")
    assert new_id == len(tokenizer) - 1
    params = tiny_params()
    params = params.model_copy(update={"train": params.train.model_copy(update={"mlflow_live": False})})
    train_step.train_stage("embedding", params)
    saved = lora_tensors("embedding")
    embeddings = [k for k in saved if "embed_tokens" in k and "lora" not in k]
    assert embeddings and saved[embeddings[0]].shape[0] == len(tokenizer)
    preflight = json.loads((paths.adapter_dir("embedding") / "preflight.json").read_text())
    assert preflight["trainable_by_part"]["embeddings"] >= len(tokenizer) * 64
    train_step.train_stage("syntax", params)  # continue: the adapter with its embeddings loads and trains
    model = load_stage_model(info, "syntax")
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    assert model(input_ids=torch.tensor([[1, new_id]])).logits.shape[-1] == len(tokenizer)


def test_without_added_tokens_the_embeddings_stay_frozen(in_project):
    from tasks.core.modeling import new_token_count

    assert new_token_count(BaseInfo.load()) == 0
    assert stage_lora(tiny_params().train_job("embedding"), BaseInfo.load()).modules_to_save == []
