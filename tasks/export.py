"""`export` stage: the final model merged into one checkpoint, checked against its adapter chain.

The chain the final stage was trained on (`tasks/core/chain.py`: earlier adapters merged into a
full-precision copy of the base, the final adapter on top; never 4-bit weights) is merged with
`merge_and_unload` and saved with `save_pretrained` as safetensors in `export.dtype` (bf16), with
the tokenizer and `merge.json` (chain, adapter hashes, dtype, parity figures), to `exports/merged/`.

Parity, before `register` runs: the saved checkpoint is loaded back and its next-token
distributions on held-out rows (the first `export.n_prompts` rows of each stage's eval split) are
compared with the adapted model's, in float32, so the figure includes the bf16 rounding. The mean
per-token KL(adapted || merged) must not exceed `export.max_kl`, or the stage fails and the DAG
stops. On the tiny MoE bf16 rounding costs ~1e-3 (single tokens reach ~0.4 where rounding flips an
expert choice, so the maximum is reported, not gated); a dropped expert LoRA costs ~1, one layer's
q_proj LoRA ~0.09, one zeroed expert ~0.06. One model is in memory at a time: the adapted model's
log-probabilities wait on the CPU (rows x tokens x vocabulary x 4 bytes: ~5 GB for 32 rows of 256
tokens at Qwen3's 152k vocabulary) while the saved copy loads.

    python -m tasks.export [--params params.yaml]
"""

from __future__ import annotations

import gc
import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tasks.core import paths
from tasks.core.cli import exit_now, run_stage_cli
from tasks.core.config import ExportConfig, Params, load_params
from tasks.core.records import write_json

if TYPE_CHECKING:
    import torch

    from tasks.core.modeling import BaseInfo

log = logging.getLogger(__name__)
TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


class MergeParityError(RuntimeError):
    """The saved merged model does not reproduce the adapter chain it was merged from."""


@dataclass(frozen=True)
class Parity:
    kl_mean: float  # mean over every position of every held-out row
    kl_max: float
    n_tokens: int
    threshold: float
    dtype: str  # of the comparison: float32, or the loaded dtype on a GPU without room for float32

    @property
    def passed(self) -> bool:
        return self.kl_mean <= self.threshold


@dataclass(frozen=True)
class ExportResult:
    enabled: bool
    out_dir: str
    final_stage: str
    chain: list[str]  # adapters merged, in order (the final stage last)
    dtype: str | None = None  # of the saved weights
    parity: Parity | None = None

    def metrics(self) -> dict:
        """metrics/export.json: what `dvc metrics show` and `register` read."""
        if not self.enabled or self.parity is None:
            return {"enabled": False, "skipped": True, "passed": None, "final_stage": self.final_stage}
        p = self.parity
        return {"enabled": True, "kl_mean": p.kl_mean, "kl_max": p.kl_max, "threshold": p.threshold,
                "passed": p.passed, "n_tokens": p.n_tokens, "parity_dtype": p.dtype, "dtype": self.dtype,
                "final_stage": self.final_stage}


def held_out_rows(stages: list[str], n: int) -> list[list[int]]:
    """Token ids of the first `n` rows of each stage's eval split: text no adapter trained on."""
    import pyarrow.parquet as pq

    rows: list[list[int]] = []
    for stage in stages:
        table = pq.read_table(paths.prepared_file(stage, "eval"), columns=["input_ids"])
        rows += [r["input_ids"] for r in table.slice(0, n).to_pylist() if r["input_ids"]]
    if not rows:
        raise FileNotFoundError(f"no eval rows in {paths.PREPARED_DIR}/<stage>/eval.parquet for {stages}: run prepare")
    return rows


def next_token_logprobs(model, rows: list[list[int]]) -> list[torch.Tensor]:
    """Log-probabilities of the next token at every position of each row, float32, on the CPU
    (so the model that made them can be freed before the next one loads)."""
    import torch

    model.eval()
    out = []
    with torch.no_grad():
        for row in rows:  # one row at a time: no padding to get wrong, and little memory
            logits = model(input_ids=torch.tensor([row], device=model.device)).logits[0]
            out.append(logits.float().log_softmax(-1).cpu())
    return out


def kl_per_token(reference: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
    """KL(reference || candidate) at each position, from log-probabilities."""
    return (reference.exp() * (reference - candidate)).sum(-1).clamp_min(0.0)


def parity_dtype(model) -> torch.dtype:
    """float32, unless the model sits on a GPU without room for a float32 copy (the flagship's
    would be 120 GB): then the dtype it was loaded in, which the figure records."""
    import torch

    if model.device.type != "cuda":
        return torch.float32
    free, _ = torch.cuda.mem_get_info(model.device)
    extra = sum(p.numel() * (4 - p.element_size()) for p in model.parameters())
    return torch.float32 if free > 1.2 * extra else model.dtype


def save_merged(model, tokenizer, out_dir: Path, dtype: str) -> None:
    import torch

    from tasks.evaluation.scoring import stop_token_ids

    if out_dir.exists():
        shutil.rmtree(out_dir)
    model.to(getattr(torch, TORCH_DTYPES[dtype]))
    # generation_config.json's eos: the end of turn too, or a server of this copy (vLLM, generate())
    # runs every chat reply to its token limit, since a Base model's names only <|endoftext|>
    stop = stop_token_ids(tokenizer, model)
    model.generation_config.eos_token_id = stop[0] if len(stop) == 1 else stop
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def load_merged(out_dir: Path, dtype: torch.dtype, trust_remote_code: bool = False):
    """The saved checkpoint, as a consumer loads it: safetensors, upcast to `dtype`."""
    import torch
    from transformers import AutoModelForCausalLM

    device_map = {"": torch.cuda.current_device()} if torch.cuda.is_available() else None
    return AutoModelForCausalLM.from_pretrained(out_dir, dtype=dtype, use_safetensors=True, device_map=device_map,
                                                trust_remote_code=trust_remote_code, use_kernels=False)  # no Hub kernels


def measure_parity(reference: list[torch.Tensor], model, rows: list[list[int]], threshold: float) -> Parity:
    """Mean and max per-token KL(reference || model) over every position of `rows`."""
    import torch

    kls = torch.cat([kl_per_token(ref, cand) for ref, cand in zip(reference, next_token_logprobs(model, rows))])
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return Parity(round(kls.mean().item(), 8), round(kls.max().item(), 6), kls.numel(), threshold, dtype)


def export_model(info: BaseInfo, final_stage: str, stages: list[str], cfg: ExportConfig,
                 out_dir: Path = paths.MERGED_DIR) -> ExportResult:
    """Merge the final stage's chain, save it in `cfg.dtype`, and measure the saved model's parity."""
    import torch

    from tasks.core.chain import load_stage_model, merged_chain_of
    from tasks.core.modeling import load_tokenizer

    chain = [*merged_chain_of(final_stage), final_stage]
    rows = held_out_rows(stages, cfg.n_prompts)
    adapted = load_stage_model(info, final_stage, "none")  # the chain exactly as trained, full precision
    if torch.cuda.is_available():
        adapted.to("cuda")  # the loader leaves a full-precision model where it loaded it
    compare_in = parity_dtype(adapted)
    adapted.to(compare_in)
    reference = next_token_logprobs(adapted, rows)
    # load_stage_model already merged the earlier adapters into a full-precision base; merging the
    # final one as well leaves the base with every adapter of the chain merged in.
    merged = adapted.merge_and_unload()
    save_merged(merged, load_tokenizer(info), out_dir, cfg.dtype)
    del adapted, merged
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    parity = measure_parity(reference, load_merged(out_dir, compare_in, info.trust_remote_code), rows, cfg.max_kl)
    log.info("export: mean KL %.3g (max %.3g) over %d tokens, threshold %g", parity.kl_mean, parity.kl_max,
             parity.n_tokens, parity.threshold)
    return ExportResult(True, str(out_dir), final_stage, chain, TORCH_DTYPES[cfg.dtype], parity)


def export_final_model(params: Params, out_dir: Path = paths.MERGED_DIR) -> ExportResult:
    """The export of this pipeline's final stage (or its skipped record), written to disk."""
    from tasks.core.chain import merged_chain_of
    from tasks.core.modeling import BaseInfo

    final = params.final_stage
    if params.export.enabled:
        info = BaseInfo.load()
        result = export_model(info, final, params.stage_names, params.export, out_dir)
    else:
        info = None
        result = ExportResult(False, str(out_dir), final, [*merged_chain_of(final), final])
        shutil.rmtree(out_dir, ignore_errors=True)
    write_export(result, info, out_dir)
    return result


def write_export(result: ExportResult, info: BaseInfo | None, out_dir: Path = paths.MERGED_DIR,
                 metrics_file: Path = paths.EXPORT_METRICS) -> None:
    """`merge.json` next to the weights (what they are, and whether they passed) and the metrics."""
    from tasks.core.chain import STAGE_INFO_FILE
    from tasks.core.tracking import file_sha256

    record = result.metrics() | {
        "chain": result.chain,
        "chain_policy": json.loads((paths.adapter_dir(result.final_stage) / STAGE_INFO_FILE).read_text()).get("policy"),
        "adapter_sha256": {s: file_sha256(paths.adapter_dir(s) / "adapter_model.safetensors") for s in result.chain},
        "base": asdict(info) if info else None,
    }
    write_json(out_dir / "merge.json", record)
    write_json(metrics_file, result.metrics())


def check_parity(result: ExportResult) -> None:
    """Stop the DAG before `register` when the merged model does not reproduce the chain."""
    p = result.parity
    if p is None or p.passed:
        return
    raise MergeParityError(
        f"the merged model in {result.out_dir} does not match its adapter chain ({' + '.join(result.chain)}): "
        f"mean next-token KL {p.kl_mean:.4g} over {p.n_tokens} held-out tokens exceeds export.max_kl {p.threshold:g} "
        f"(max {p.kl_max:.3g}, compared in {p.dtype}). An adapter is missing from the merge or a weight changed on "
        f"save; do not serve this copy (see {paths.EXPORT_METRICS}). bf16 rounding alone is ~1e-3 on the tiny model: "
        f"raise export.max_kl only if you have checked that the gap is rounding."
    )


def main(argv: list[str] | None = None) -> int:
    def run(args) -> list[str]:
        result = export_final_model(load_params(args.params))
        check_parity(result)
        if result.parity is None:
            return [f"export: skipped (export.enabled is false); nothing written to {result.out_dir} but merge.json"]
        p = result.parity
        return [f"export: {' + '.join(result.chain)} merged into {result.out_dir} ({result.dtype}); "
                f"mean KL {p.kl_mean:.3g}, max {p.kl_max:.3g} over {p.n_tokens} tokens (threshold {p.threshold:g}): passed"]

    return run_stage_cli("export", __doc__, run, argv, expected=(MergeParityError,))


if __name__ == "__main__":
    exit_now(main())
