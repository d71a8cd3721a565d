"""`evaluate` stage: every model of the curriculum scored with the same code.

The base and the model after each stage, on every stage's eval split: loss and perplexity over
trainable tokens, which form the forgetting matrix (`metrics/evaluate.json`, `plots/forgetting.csv`
for `dvc plots`, `reports/evaluation/forgetting.png`). By generation (greedy, batched, with the KV
cache; batches shrink on out-of-memory), scored per chat stage by its data contract (see
`reply_scores`): final-answer exact match and well-formed `<think>` blocks, valid JSON with slot
precision/recall/F1 and SQL exact match, or ROUGE-L and reply lengths. The base and the final
model are scored on every eval set; each stage's model on its own. A few replies per eval set go
to `reports/evaluation/generations.jsonl` for people to read. Tasks of lm-evaluation-harness listed
in `evaluate.lm_eval.tasks` run on the final model too (`lm_eval.<task>.<metric>`;
tasks/evaluation/harness.py).

    python -m tasks.evaluate [--params params.yaml]
"""

from __future__ import annotations

import json
from pathlib import Path

from tasks.core import paths
from tasks.core.cli import exit_now, run_stage_cli
from tasks.core.config import Params, load_params
from tasks.core.records import write_json
from tasks.evaluation.scoring import score_model


def evaluate_pipeline(params: Params) -> dict:
    """Every model of the curriculum on every stage's eval split, with the same code.

    Rows: the base and the model after each stage (its chain rebuilt as it was trained). Each row
    has every eval loss (the forgetting matrix); generation metrics run on every eval set for the
    base and the final model, and on its own stage's set for the models in between (did the stage
    teach what it was for). `base` and `final` keep the shape the promotion gates read."""
    import torch

    from tasks.core.chain import load_stage_model
    from tasks.core.modeling import BaseInfo, load_base_model, load_tokenizer
    from tasks.evaluation.forgetting import change_since_trained
    from tasks.evaluation.harness import require_harness

    require_harness(params.evaluate.lm_eval)
    torch.manual_seed(params.seed)
    info = BaseInfo.load()
    tokenizer = load_tokenizer(info)
    final, quantization = params.final_stage, params.train.quantization
    samples: dict[str, list[dict]] = {"base": [], final: []}

    def score(model, only: list[str] | None, kept: list[dict] | None) -> dict[str, float]:
        return score_model(model, tokenizer, params.stages, params.evaluate, only, kept)

    rows = {"base": score(load_base_model(info, quantization), None, samples["base"])}
    harness: dict[str, dict[str, float]] = {}
    for stage in params.stage_names:
        own = None if stage == final else [stage]
        stage_model = load_stage_model(info, stage, quantization)
        rows[stage] = score(stage_model, own, samples.get(stage))
        if stage == final and params.evaluate.lm_eval.tasks:  # the model is loaded now: no second load
            from tasks.evaluation.harness import harness_scores

            harness = harness_scores(stage_model, tokenizer, params.evaluate.lm_eval)
    matrix = {row: {s: scores[f"{s}_eval_loss"] for s in params.stage_names} for row, scores in rows.items()}
    return {
        "base": rows["base"],
        "final": rows[final],
        "final_stage": final,
        "after": {stage: rows[stage] for stage in params.stage_names},
        "forgetting": matrix,
        "forgetting_change": change_since_trained(matrix, params.stage_names),
        "samples": [{"model": model, **row} for model, rows_ in samples.items() for row in rows_],
    } | ({"lm_eval": harness} if harness else {})


def write_metrics(results: dict, path: Path = paths.EVALUATE_METRICS) -> None:
    """The scores, the forgetting matrix as a `dvc plots` CSV and a heatmap, and sample replies."""
    from tasks.evaluation.forgetting import write_csv, write_heatmap

    results = dict(results)
    samples = results.pop("samples", [])
    write_json(path, results)
    paths.GENERATION_SAMPLES.parent.mkdir(parents=True, exist_ok=True)
    paths.GENERATION_SAMPLES.write_text("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))
    write_csv(results["forgetting"], paths.FORGETTING_PLOT)
    write_heatmap(results["forgetting"], paths.FORGETTING_HEATMAP)


def main(argv: list[str] | None = None) -> int:
    def run(args) -> list[str]:
        results = evaluate_pipeline(load_params(args.params))
        write_metrics(results)
        return [
            f"evaluate: {key:32s} base {results['base'][key]:10.4f}  final {results['final'][key]:10.4f}"
            for key in sorted(results["base"])
        ] + [f"evaluate: lm_eval.{task}.{metric} {value:.4f}"
             for task, row in sorted(results.get("lm_eval", {}).items()) for metric, value in sorted(row.items())]

    return run_stage_cli("evaluate", __doc__, run, argv)

if __name__ == "__main__":
    exit_now(main())
