"""The preflight's memory estimate against a measurement on the CPU: one training step of a
Qwen3-MoE with LoRA on attention and the fused experts, per model size.

    python bench/memory_model.py [--sizes tiny mid] [--seq-len 256] [--batch-size 8]

Each size runs in its own process: build the model in fp32 (as `load_base_model` does on a CPU),
attach the project's LoRA, take one warm-up step (so AdamW's moments exist), then measure the peak
resident memory of a second step. The figure compared with the estimate is that peak minus the
process's resident memory after its imports (torch, transformers, peft), with the plain loss and
with the chunked one (`train.loss_chunk_tokens`). What a CPU cannot check: bitsandbytes' NF4
kernels and paged 8-bit optimizer, and CUDA's caching allocator (`bench/gpu_qlora.py` measures
those on a GPU). Settings and figures are printed as JSON and written to
bench/results/memory_model.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

SIZES = {  # Qwen3-MoE shapes: the tiny default base, and one ~20x its size
    "tiny": {"hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
             "head_dim": 32, "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 128, "vocab_size": 1024},
    "mid": {"hidden_size": 512, "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 4,
            "head_dim": 64, "num_experts": 32, "num_experts_per_tok": 4, "moe_intermediate_size": 256, "vocab_size": 32000},
}

CHILD = """
import json, resource, sys, torch
sys.path.insert(0, {project!r})
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
from tasks.core.adapters import new_adapter
from tasks.core.config import LoraConfig
from tasks.core.lm_loss import chunked_loss
from tasks.core.preflight import estimate_terms

def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096

size, batch, seq, chunk = {size!r}, {batch}, {seq}, {chunk}
baseline = rss()
config = Qwen3MoeConfig(**size, intermediate_size=size["moe_intermediate_size"] * 2, decoder_sparse_step=1,
                        mlp_only_layers=[], tie_word_embeddings=True)
torch.manual_seed(0)
model = new_adapter(Qwen3MoeForCausalLM(config), LoraConfig(r=16, alpha=32, target_parameters=["mlp.experts.gate_up_proj",
                                                                                             "mlp.experts.down_proj"]))
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
ids = torch.randint(0, size["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(0))

def step():
    with chunked_loss(model, chunk or None):
        model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

step()
step()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
terms = estimate_terms(model, batch, seq, chunk or None)
print(json.dumps({{"measured_bytes": peak - baseline, "estimate": terms, "estimated_bytes": sum(terms.values()),
                  "parameters": sum(p.numel() for p in model.parameters()),
                  "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}}))
"""


def measure(size: str, batch: int, seq: int, chunk: int | None) -> dict:
    code = CHILD.format(project=str(PROJECT), size=SIZES[size], batch=batch, seq=seq, chunk=chunk or 0)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["error"] = round(result["estimated_bytes"] / result["measured_bytes"] - 1, 3)  # + over, - under
    return {"size": size, "loss_chunk_tokens": chunk} | result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=["tiny", "mid"])
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    settings = {"dtype": "fp32 (CPU)", "batch_size": args.batch_size, "seq_len": args.seq_len, "lora": "r 16, alpha 32, "
                "attention q/k/v/o and both expert stacks", "optimizer": "torch AdamW", "gradient_checkpointing": False,
                "measured": "peak RSS of the second step minus RSS after imports", "machine": platform.machine(),
                "python": platform.python_version()}
    rows = [measure(size, args.batch_size, args.seq_len, chunk) for size in args.sizes for chunk in (None, 1024)]
    out = {"settings": settings, "results": rows}
    print(json.dumps(out, indent=2))
    path = PROJECT / "bench" / "results" / "memory_model.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
