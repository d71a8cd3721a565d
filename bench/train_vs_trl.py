"""Tokens/s of a stagewise training stage vs a plain TRL `SFTTrainer` on the same data and model.

Same tiny base, same LoRA config, same batch size, steps, seed and precision (fp32 on CPU); the
same objective: cross-entropy on assistant tokens only (TRL gets prompt/completion pairs rendered
with the model's chat template), and no MoE router load-balancing loss on either side. TRL turns
that auxiliary loss on by default for MoE models (`router_aux_loss_coef` from the model config), so
it computed router logits and optimised another objective; here it is set to 0.0, and stagewise
leaves it off by design: the router is frozen, so the balancing term could only bend the attention
adapters toward balanced routing, not toward the task (and it costs the router logits' memory).
Both settings are printed with the figures. Run after `make run` (it needs models/base and
data/prepared):

    .venv/bin/python bench/train_vs_trl.py [--stage syntax] [--steps 60] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def own_rows(stage: str) -> list[dict]:
    """The stage's own training rows (no replay), so both trainers see the same records."""
    import pyarrow.parquet as pq

    table = pq.read_table(f"data/prepared/{stage}/train.parquet", columns=["input_ids", "labels", "source_stage", "record_json"])
    return [r for r in table.to_pylist() if r["source_stage"] == stage]


def stagewise_tokens_per_second(stage: str, steps: int, params) -> float:
    from peft import get_peft_model
    from transformers import set_seed

    from tasks.core.modeling import BaseInfo, load_base_model, load_tokenizer
    from tasks.core.trainer import Schedule, run_trainer
    from tasks.core.adapters import peft_lora_config

    info = BaseInfo.load()
    tokenizer = load_tokenizer(info)
    set_seed(params.seed)
    spec = params.stages[stage].train
    base = load_base_model(info)
    if getattr(base.config, "output_router_logits", False):
        raise RuntimeError("the base's config turns the router's load-balancing loss on: not the compared objective")
    model = get_peft_model(base, peft_lora_config(params.train.lora, base))
    schedule = Schedule(max_steps=steps, batch_size=spec.batch_size, learning_rate=spec.learning_rate,
                        warmup_ratio=spec.warmup_ratio, seed=params.seed,
                        loss_chunk_tokens=params.train.loss_chunk_tokens)  # as a stage trains (same loss)
    rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in own_rows(stage)]
    with tempfile.TemporaryDirectory() as work:
        summary = run_trainer(model, rows, schedule, tokenizer.pad_token_id, Path(work))
    return summary.tokens_per_second


def trl_tokens_per_second(stage: str, steps: int, params) -> float:
    from datasets import Dataset
    from transformers import set_seed
    from trl import SFTConfig, SFTTrainer

    from tasks.core.chat import generation_prompt
    from tasks.core.modeling import BaseInfo, load_base_model, load_tokenizer
    from tasks.core.adapters import peft_lora_config

    info = BaseInfo.load()
    tokenizer = load_tokenizer(info)
    pairs = []
    for row in own_rows(stage):
        messages = json.loads(row["record_json"]).get("messages")
        if messages:
            pairs.append({"prompt": generation_prompt(tokenizer, messages),
                          "completion": messages[-1]["content"] + tokenizer.eos_token})
    set_seed(params.seed)
    model = load_base_model(info)
    spec = params.stages[stage].train
    with tempfile.TemporaryDirectory() as work:
        config = SFTConfig(
            output_dir=work, max_steps=steps, per_device_train_batch_size=spec.batch_size,
            learning_rate=spec.learning_rate, lr_scheduler_type="cosine", warmup_steps=spec.warmup_ratio,
            logging_steps=5, save_strategy="no", report_to="none", use_cpu=True, seed=params.seed,
            completion_only_loss=True, max_length=params.prepare.max_length, disable_tqdm=True,
            include_num_input_tokens_seen="non_padding",
            router_aux_loss_coef=0.0,  # the objective stagewise trains: no load-balancing term
        )
        trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(pairs),
                             processing_class=tokenizer, peft_config=peft_lora_config(params.train.lora, model))
        if trainer.aux_loss_enabled:
            raise RuntimeError("TRL would add the router's load-balancing loss: not the objective stagewise trains")
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
        tokens = int(trainer.state.num_input_tokens_seen or 0)  # non-padding, as stagewise counts
    return tokens / seconds


def main() -> int:
    from tasks.core.config import load_params

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", default="syntax")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    params = load_params()
    ours, theirs = [], []
    for _ in range(args.repeats):  # interleaved, so drift on the machine hits both alike
        ours.append(stagewise_tokens_per_second(args.stage, args.steps, params))
        theirs.append(trl_tokens_per_second(args.stage, args.steps, params))
    best_ours, best_theirs = max(ours), max(theirs)
    print(f"stage {args.stage}, {args.steps} steps x batch {params.stages[args.stage].train.batch_size}, {args.repeats} repeats; "
          f"same records ({len(own_rows(args.stage))}), LoRA r {params.train.lora.r}, fp32 on CPU, seed {params.seed}")
    print("objective on both: cross-entropy on assistant tokens only; MoE router load-balancing loss off "
          "(stagewise: output_router_logits false; TRL: router_aux_loss_coef=0.0)")
    print(f"stagewise: {', '.join(f'{x:.0f}' for x in ours)} tokens/s (best {best_ours:.0f})")
    print(f"TRL SFTTrainer: {', '.join(f'{x:.0f}' for x in theirs)} tokens/s (best {best_theirs:.0f})")
    print(f"ratio (best/best): {best_ours / best_theirs:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
