"""Data-preparation throughput on real data, side by side with a naive `datasets.map` baseline.

    python bench/prepare_throughput.py [--data ../shared/data] [--runs 3] [--tokenizer tiny|qwen3]

Builds a throwaway project whose stages read every set in `--data` through the presets, ingests
them, trains the tokenizer the way `base` does (BPE on the embedding corpus; no model), then times:

  stagewise   `prepare_all`: clean, exact + near dedupe, decontamination, chat template with
              assistant masks, batched tokenization, length policy, weights, replay, BFD packing,
              Parquet, rejects and report
  baseline    per stage, `datasets.Dataset.map(batched=True)` rendering the same records with the
              same chat template and tokenizing them with the same fast tokenizer: no cleaning,
              no masks, nothing written (num_proc 1 and 2)

Throughput is input tokens per second: the tokens the baseline produces, divided by each side's
time, so dropping records never makes stagewise look faster. Prints one JSON object and writes it
to bench/results/prepare_throughput.json (`_qwen3.json` with `--tokenizer qwen3`). Also reports
packing efficiency on GSM8K at 1024.

`--tokenizer qwen3` uses Qwen3's real tokenizer and chat template (tasks/tools/qwen3_tokenizer.py)
instead of the tiny BPE, and then also runs `prepare` once per multi-turn policy that applies to
the template (`prepare.multi_turn`), reporting per stage the share of ingested records that reach
the prepared splits and the rows they make.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

ROW = 1024


def sources(data: Path) -> dict[str, list[dict]]:
    return {
        "embedding": [
            {"path": f"{data}/tinyshakespeare/input.txt"},
            {"path": f"{data}/wikitext2/valid.txt", "options": {"split": "pattern", "pattern": r"^ = [^=].* = $"}},
        ],
        "syntax": [
            {"path": f"{data}/snips_nlu/train_*_full.json", "preset": "snips"},
            {"path": f"{data}/text2sql_advising/advising.json", "preset": "text2sql"},
        ],
        "thinking": [{"path": f"{data}/gsm8k/train.jsonl", "preset": "gsm8k"}],
        "instructions": [
            {"path": f"{data}/llms_from_scratch_instruct/instruction-data.json", "preset": "alpaca"},
            {"path": f"{data}/self_instruct/seed_tasks.jsonl", "preset": "alpaca", "options": {"explode": "instances"}},
            {"path": f"{data}/oasst_en100/en_100_tree.jsonl", "preset": "oasst"},
        ],
    }


def bench_params(data: Path):
    from tasks.core.config import parse_params

    raw = yaml.safe_load((PROJECT / "params.yaml").read_text())
    for stage, srcs in sources(data).items():
        raw["stages"][stage]["data"]["sources"] = srcs
    raw["stages"]["thinking"]["data"]["replay_share"] = 0.0  # so its packed rows are GSM8K alone
    raw["prepare"].update(max_length=ROW, packing={"enabled": True, "row_length": ROW})
    return parse_params(raw)


def build_tokenizer(params, which: str) -> None:
    """What `base` does for the tiny model, minus pretraining: BPE trained on the embedding corpus;
    or Qwen3's real tokenizer and template, as a user pointing at Qwen3 gets them."""
    from tasks.core import paths
    from tasks.core.modeling import BaseInfo, train_tokenizer
    from tasks.core.records import read_jsonl

    if which == "qwen3":
        from tasks.tools.qwen3_tokenizer import build_qwen3_tokenizer

        tok = build_qwen3_tokenizer()
    else:
        texts = [r["text"] for r in read_jsonl(paths.raw_file("embedding"))]
        tok = train_tokenizer(texts, params.model.tiny.vocab_size)
    tok.save_pretrained("tok")
    kind = "external" if which == "qwen3" else "tiny"
    BaseInfo(kind=kind, name_or_path=str(Path("tok").resolve())).save(paths.BASE_DIR)


def records_kept(params, ingested) -> dict[str, dict[str, float]]:
    """Per stage: the share of ingested records with at least one prepared row, and rows per record."""
    import pyarrow.parquet as pq

    from tasks.core import paths

    out = {}
    for result in ingested:
        if params.stages[result.stage].kind != "sft":
            continue  # raw text has no turns
        own = []
        for split in ("train", "eval"):
            table = pq.read_table(paths.prepared_file(result.stage, split), columns=["content_hash", "source_stage"]).to_pydict()
            own += [h.split("~")[0] for h, s in zip(table["content_hash"], table["source_stage"]) if s == result.stage]
        records = {h.split("#")[0] for h in own}
        out[result.stage] = {"records": result.records, "records_kept_share": round(len(records) / max(result.records, 1), 4),
                             "rows": len(set(own))}
    return out


def baseline(params, tokenizer, num_proc: int | None) -> tuple[float, int]:
    """Seconds and tokens for the naive pass over every stage's ingested records."""
    from datasets import Dataset, disable_progress_bars

    from tasks.core import paths
    from tasks.core.records import read_jsonl

    disable_progress_bars()

    def tokenize(batch):
        if "text" in batch:
            texts = batch["text"]
        else:
            texts = [tokenizer.apply_chat_template(m, tokenize=False) for m in batch["messages"]]
        return {"input_ids": tokenizer(texts, add_special_tokens=False)["input_ids"]}

    frames = []
    for stage, spec in params.stages.items():
        key = "text" if spec.kind == "pretrain" else "messages"
        frames.append(Dataset.from_list([{key: r[key]} for r in read_jsonl(paths.raw_file(stage))]))
    started = time.perf_counter()
    tokens = 0
    for frame in frames:
        out = frame.map(tokenize, batched=True, num_proc=num_proc, remove_columns=frame.column_names,
                        load_from_cache_file=False, keep_in_memory=True)
        tokens += sum(len(ids) for ids in out["input_ids"])
    return time.perf_counter() - started, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=PROJECT.parent / "shared" / "data")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tokenizer", choices=["tiny", "qwen3"], default="tiny")
    args = parser.parse_args()
    data = args.data.resolve()

    from tasks.core.modeling import BaseInfo, load_tokenizer
    from tasks.ingest import ingest_all
    from tasks.prepare import prepare_all

    with tempfile.TemporaryDirectory() as work:
        os.chdir(work)
        params = bench_params(data)
        t0 = time.perf_counter()
        ingested = ingest_all(params)
        ingest_s = time.perf_counter() - t0
        build_tokenizer(params, args.tokenizer)
        tokenizer = load_tokenizer(BaseInfo.load())
        ours, base1, base2 = [], [], []
        for _ in range(args.runs):
            # datasets sets TOKENIZERS_PARALLELISM=false when it forks (num_proc=2); every side
            # starts with the Rust tokenizer free to use both cores again.
            os.environ["TOKENIZERS_PARALLELISM"] = "true"
            t0 = time.perf_counter()
            prepare_all(params)
            ours.append(time.perf_counter() - t0)
            os.environ["TOKENIZERS_PARALLELISM"] = "true"
            seconds, tokens = baseline(params, tokenizer, None)
            base1.append(seconds)
            os.environ["TOKENIZERS_PARALLELISM"] = "true"
            base2.append(baseline(params, tokenizer, 2)[0])
        report = json.loads(Path("metrics/data.json").read_text())
        policies = {}
        if args.tokenizer == "qwen3":
            for policy in ("per_turn", "last_turn"):
                prepare_all(params.model_copy(update={"prepare": params.prepare.model_copy(update={"multi_turn": policy})}))
                policies[policy] = records_kept(params, ingested)
    ours_s, b1, b2 = statistics.median(ours), statistics.median(base1), statistics.median(base2)
    result = {
        "machine": f"{os.cpu_count()} cores",
        "records_ingested": sum(r.records for r in ingested),
        "input_tokens": tokens,
        "ingest_seconds": round(ingest_s, 2),
        "stagewise_prepare_seconds": round(ours_s, 2),
        "baseline_map_seconds": {"num_proc_1": round(b1, 2), "num_proc_2": round(b2, 2)},
        "tokens_per_second": {"stagewise": round(tokens / ours_s), "baseline_num_proc_1": round(tokens / b1),
                              "baseline_num_proc_2": round(tokens / b2)},
        "speedup_vs_best_baseline": round(min(b1, b2) / ours_s, 2),
        "seconds_per_run": {"stagewise": [round(t, 2) for t in ours], "baseline_num_proc_1": [round(t, 2) for t in base1],
                            "baseline_num_proc_2": [round(t, 2) for t in base2]},
        "gsm8k_packing_efficiency_at_1024": report["thinking"]["packing"]["efficiency"],
        "dropped_or_changed": {stage: r["prepare"] for stage, r in report.items()},
        "runs": args.runs,
        "tokenizer": args.tokenizer,
        "multi_turn_used": {stage: r.get("multi_turn") for stage, r in report.items()},
    } | ({"multi_turn_policies": policies} if policies else {})
    suffix = "_qwen3" if args.tokenizer == "qwen3" else ""
    out = PROJECT / "bench" / "results" / f"prepare_throughput{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
