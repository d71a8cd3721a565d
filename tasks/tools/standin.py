"""A Qwen3-30B-A3B-Base-shaped stand-in model folder: the flagship's config with only the sizes cut.

The folder loads as the flagship does (`AutoModelForCausalLM` / `AutoTokenizer`, offline, no remote
code) and takes its code paths: `Qwen3MoeForCausalLM` with fused experts, the full 151,936-row
vocabulary, the same attention layout (32 query and 4 KV heads of 128), top-8 routing over the same
128 experts with normalized top-k weights, RoPE base, untied embeddings and bf16 weights. Only
depth and widths shrink (2 layers, hidden 128, experts 48 wide; the flagship's 48 x 2048 x 768),
so a CPU trains it: ~46 M parameters, three quarters of them the two vocabulary matrices. Weights
are random (seeded); the tokenizer is Qwen3's real one (tasks/tools/qwen3_tokenizer.py).

    python -m tasks.tools.standin /tmp/qwen3-standin
    python -m tasks.tools.standin /tmp/qwen3-standin --layers 4 --hidden 256 --experts 32 --seed 1

Why keep 128 experts: on CPU a training step costs the same with 16 or 128 experts (the 151,936-
wide output layer dominates), and 128 keeps the router's shape, the 8-of-128 sparsity and the
expert tensors' leading dimension as the flagship has them. The attention projections keep the
flagship's output widths (4096 query, 512 KV) for the same reason: adapters, KV-cache arithmetic and
attention kernels see the real head layout.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Qwen3-30B-A3B-Base's config.json, architecture fields (shared/fixtures/qwen3; a test checks the copy).
FLAGSHIP_CONFIG: dict[str, Any] = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "vocab_size": 151936,
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "moe_intermediate_size": 768,
    "num_hidden_layers": 48,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "hidden_act": "silu",
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "attention_bias": False,
    "tie_word_embeddings": False,
    "router_aux_loss_coef": 0.001,
    "output_router_logits": False,
    "bos_token_id": 151643,
    "eos_token_id": 151643,
    "max_position_embeddings": 32768,
    "torch_dtype": "bfloat16",
}
# The only fields the stand-in changes; everything else is copied.
SIZE_FIELDS = ("hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers", "num_experts")
# As Qwen3 Base's generation_config.json (bos and eos <|endoftext|> 151643, greedy, 2048 new tokens), plus
# pad 151643: the tokenizer's pad, so generate() needs no fallback.
GENERATION_CONFIG: dict[str, Any] = {
    "bos_token_id": 151643,
    "eos_token_id": 151643,
    "pad_token_id": 151643,
    "do_sample": False,
    "max_new_tokens": 2048,
}


@dataclass(frozen=True)
class StandinShape:
    """The sizes a stand-in picks; widths default to the flagship's ratios to hidden_size."""

    layers: int = 2
    hidden: int = 128
    experts: int = 128
    moe_intermediate: int | None = None  # default hidden * 768 / 2048 (48 at hidden 128)
    seed: int = 0

    def config_fields(self) -> dict[str, Any]:
        """The flagship's config with the size fields replaced."""
        if self.experts < FLAGSHIP_CONFIG["num_experts_per_tok"]:
            raise ValueError(
                f"--experts {self.experts}: routing picks {FLAGSHIP_CONFIG['num_experts_per_tok']} experts per token "
                f"(num_experts_per_tok, kept from the flagship), so at least that many are needed"
            )
        if self.layers < 1 or self.hidden < 1:
            raise ValueError(f"--layers and --hidden must be positive, got {self.layers} and {self.hidden}")
        flagship_hidden = FLAGSHIP_CONFIG["hidden_size"]
        moe_width = self.moe_intermediate or max(
            1, self.hidden * FLAGSHIP_CONFIG["moe_intermediate_size"] // flagship_hidden
        )
        return FLAGSHIP_CONFIG | {
            "hidden_size": self.hidden,
            # dense MLP width: unused while every layer is sparse (decoder_sparse_step 1), kept in ratio
            "intermediate_size": self.hidden * FLAGSHIP_CONFIG["intermediate_size"] // flagship_hidden,
            "moe_intermediate_size": moe_width,
            "num_hidden_layers": self.layers,
            "num_experts": self.experts,
        }


@dataclass(frozen=True)
class StandinReport:
    out_dir: Path
    num_parameters: int
    files: dict[str, int]  # name -> bytes
    seconds: dict[str, float]  # tokenizer, model, save

    def summary(self) -> str:
        lines = [
            f"wrote {self.out_dir}: {self.num_parameters:,} parameters, {sum(self.files.values()) / 2**20:.1f} MiB"
        ]
        lines += [f"  {name:<24} {size:>12,} bytes" for name, size in sorted(self.files.items())]
        lines.append("  seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in self.seconds.items()))
        return "\n".join(lines)


def write_standin(out_dir: Path, shape: StandinShape = StandinShape()) -> StandinReport:
    """Build the stand-in with random weights (seeded) and save it, with Qwen3's tokenizer, to out_dir."""
    import torch
    from transformers import GenerationConfig, Qwen3MoeConfig, Qwen3MoeForCausalLM

    from tasks.tools.qwen3_tokenizer import build_qwen3_tokenizer

    fields = shape.config_fields()  # checks the shape before the slow part
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(
            f"{out_dir} is not empty: remove it or choose another folder (a stand-in is written whole)"
        )
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    tokenizer = build_qwen3_tokenizer()
    seconds["tokenizer"] = time.perf_counter() - started

    started = time.perf_counter()
    dtype = getattr(torch, fields.pop("torch_dtype"))  # transformers 5 calls it `dtype`
    config = Qwen3MoeConfig(**fields, dtype=dtype)
    if config.vocab_size < len(tokenizer):
        raise ValueError(f"vocab_size {config.vocab_size} is smaller than the tokenizer ({len(tokenizer)} tokens)")
    torch.manual_seed(shape.seed)
    model = Qwen3MoeForCausalLM(config).to(dtype)  # initialised in float32, stored as the flagship stores it
    model.generation_config = GenerationConfig(**GENERATION_CONFIG)
    seconds["model"] = time.perf_counter() - started

    started = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)  # safetensors: transformers 5 writes nothing else
    tokenizer.save_pretrained(out_dir)
    seconds["save"] = time.perf_counter() - started
    files = {p.name: p.stat().st_size for p in sorted(out_dir.iterdir()) if p.is_file()}
    return StandinReport(out_dir, sum(p.numel() for p in model.parameters()), files, seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="folder to create (must be empty or absent)")
    defaults = StandinShape()
    parser.add_argument("--layers", type=int, default=defaults.layers, help="decoder layers (flagship 48)")
    parser.add_argument("--hidden", type=int, default=defaults.hidden, help="hidden size (flagship 2048)")
    parser.add_argument("--experts", type=int, default=defaults.experts, help="experts per layer, >= 8 (flagship 128)")
    parser.add_argument(
        "--moe-intermediate", type=int, default=None, help="expert width (default: hidden * 3/8, as the flagship)"
    )
    parser.add_argument("--seed", type=int, default=defaults.seed)
    args = parser.parse_args(argv)
    shape = StandinShape(args.layers, args.hidden, args.experts, args.moe_intermediate, args.seed)
    try:
        report = write_standin(args.out_dir, shape)
    except (ValueError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
