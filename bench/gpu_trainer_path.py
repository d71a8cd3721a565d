"""The flagship through `train`'s own path: the calls `tasks/train.py` makes, not the bench's loop.

    python bench/gpu_trainer_path.py [--steps 4] [--seq-len 2048] [--out FILE.json]   # on a GPU
    python bench/gpu_trainer_path.py --config tiny --steps 2                          # same path, CPU

`bench/gpu_qlora.py` measures a QLoRA step with its own short loop. This runs what a training
stage runs on the same model (Qwen3-30B-A3B's architecture, random weights, production NF4 layout,
built by `bench/gpu_qlora.py`): `prepare_quantized`, `new_adapter` and `with_expert_compute` from
`tasks/core/adapters.py` with params.yaml's `train` settings (as an nf4 stage resolves them, expert
adapters in host memory included), then `tasks.core.trainer.run_trainer`
(the transformers Trainer with the stage's optimizer, bf16, non-reentrant gradient checkpointing,
the chunked loss and the router-load callback) on random rows of `--seq-len` tokens, batch 1. It
prints and writes peak allocated / reserved GPU memory over the training, tokens/s as the Trainer
counts them, and the settings; the gap to gpu_qlora.py's peak is what the Trainer adds.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))
sys.path.insert(0, str(PROJECT / "bench"))


def trainer_path_run(config_name: str, steps: int, seq_len: int, device: str) -> dict:
    import torch

    from gpu_qlora import (BenchSettings, allocated_gib, build_for, device_name, peak_gib, peak_reserved_gib, reset_peak,
                           versions)
    from tasks.core.adapters import cast_trainable, new_adapter, prepare_quantized, with_expert_compute
    from tasks.core.config import load_params
    from tasks.core.expert_offload import offload_expert_adapters, resolve_expert_offload
    from tasks.core.trainer import Schedule, resolve_optimizer, run_trainer

    train = load_params(PROJECT / "params.yaml").train.model_copy(update={"quantization": "nf4"})  # the bench is QLoRA
    on_gpu = device == "cuda"
    offload = resolve_expert_offload(train, train.lora, on_gpu)
    settings = BenchSettings(config_name=config_name, device=device, dtype_name="bf16" if on_gpu else "fp32",
                             seq_len=seq_len, batch_size=1, steps=steps, warmup=0, attention_rank=train.lora.r,
                             expert_rank=train.lora.expert_r or train.lora.r)
    model = build_for(settings)
    model = prepare_quantized(model, train.upcast_frozen)
    model = cast_trainable(new_adapter(model, train.lora), train.adapter_dtype)  # as attach_adapter does
    model = with_expert_compute(model, train.expert_compute, train.experts_per_dequant)
    schedule = Schedule(max_steps=steps, batch_size=1, learning_rate=2e-4, warmup_ratio=0.0, gradient_checkpointing=True,
                        optimizer=resolve_optimizer(train.optimizer, on_gpu, offload, train.adapter_dtype),
                        loss_chunk_tokens=train.loss_chunk_tokens)
    generator = torch.Generator().manual_seed(0)
    rows = [{"input_ids": ids, "labels": ids} for ids in
            torch.randint(0, model.config.vocab_size, (steps, seq_len), generator=generator).tolist()]
    with_adapter = allocated_gib(device)  # peft makes the factors beside the experts, on the GPU
    if offload:  # as train does before run_trainer; the peak is reset after it, so it is training's own
        offload_expert_adapters(model)
    after_offload = allocated_gib(device)
    reset_peak(device)
    with tempfile.TemporaryDirectory() as work:
        summary = run_trainer(model, rows, schedule, pad_token_id=0, workdir=Path(work))
    return {
        "device": device_name(device), "config": config_name, "seq_len": seq_len, "batch_size": 1, "steps": summary.steps,
        "path": "tasks/core/adapters.py + tasks.core.trainer.run_trainer (the Trainer)",
        "optimizer": schedule.optimizer, "gradient_checkpointing": True, "loss_chunk_tokens": train.loss_chunk_tokens,
        "expert_compute": train.expert_compute, "upcast_frozen": train.upcast_frozen, "offload_expert_adapters": offload,
        "experts_per_dequant": train.experts_per_dequant,
        "lora": {"r": train.lora.r, "expert_r": train.lora.expert_r or train.lora.r},
        "resident_with_adapter_gib": with_adapter, "resident_before_training_gib": after_offload,
        "peak_train_gib": peak_gib(device), "peak_train_reserved_gib": peak_reserved_gib(device),
        "tokens_per_second": summary.tokens_per_second, "first_loss": summary.first_loss, "last_loss": summary.last_loss,
        "versions": versions(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=["flagship", "tiny"], default="flagship")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=None, help="default: 2048 (flagship), 64 (tiny)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.config == "flagship" and device != "cuda":
        print("bench/gpu_trainer_path.py: the flagship needs a CUDA GPU; try --config tiny", file=sys.stderr)
        return 2
    result = trainer_path_run(args.config, args.steps, args.seq_len or (2048 if args.config == "flagship" else 64), device)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
