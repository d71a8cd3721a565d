"""`prepare` stage: per curriculum stage, render with the chat template, tokenize, build loss
labels, split train/eval by content hash, and write Parquet.

Loss labels: every token for `pretrain` stages; assistant replies only for `sft` stages. The split
depends only on a record's content, so adding records never moves old ones between splits.

    python -m tasks.prepare [--params params.yaml]
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from prefect import task

from tasks.core import paths
from tasks.core.chat import Encoded, encode_chat, encode_text
from tasks.core.cli import run_stage_cli
from tasks.core.config import Params, load_params
from tasks.core.records import content_hash, read_jsonl, write_jsonl


@dataclass(frozen=True)
class PreparedStage:
    stage: str
    n_train: int
    n_eval: int
    n_rejected: int
    n_replayed: int = 0


def split_of(digest: str, eval_fraction: float) -> str:
    """Deterministic split from the content hash: the same record always lands in the same split."""
    return "eval" if int(digest[:12], 16) / 16**12 < eval_fraction else "train"


def encode_record(tokenizer, record: dict, kind: str, max_length: int) -> list[Encoded]:
    """One record -> one or more rows. Long raw text is cut into rows; a long chat cannot be."""
    if kind == "pretrain":
        enc = encode_text(tokenizer, record["text"])
        # Equal-size pieces, so a long document never leaves a stub of a few tokens at its end.
        n = len(enc.input_ids)
        pieces = -(-n // max_length)
        bounds = [i * n // pieces for i in range(pieces + 1)]
        return [Encoded(enc.input_ids[a:b], enc.labels[a:b]) for a, b in zip(bounds, bounds[1:])]
    enc = encode_chat(tokenizer, record["messages"])
    if len(enc.input_ids) > max_length:
        raise ValueError(f"conversation is {len(enc.input_ids)} tokens, over prepare.max_length={max_length}")
    return [enc]


def prepare_stage(stage: str, kind: str, records: list[dict], tokenizer, params: Params) -> tuple[dict[str, list[dict]], list[dict]]:
    """Rows per split, and the records rejected with their reason."""
    cfg = params.prepare
    splits: dict[str, list[dict]] = {s: [] for s in paths.SPLITS}
    rejects = []
    for index, record in enumerate(records):
        digest = content_hash(record)
        try:
            encoded = encode_record(tokenizer, record, kind, cfg.max_length)
        except ValueError as exc:
            rejects.append({"file": str(paths.raw_file(stage)), "line": index + 1, "reason": str(exc), "record": record})
            continue
        split = split_of(digest, cfg.eval_fraction)
        record_json = json.dumps(record, ensure_ascii=False, sort_keys=True)
        for part, enc in enumerate(encoded):
            n_trainable = enc.n_trainable
            splits[split].append({
                "input_ids": enc.input_ids,
                "labels": enc.labels,
                "n_tokens": len(enc.input_ids),
                "n_trainable": n_trainable,
                "trainable_share": n_trainable / max(len(enc.input_ids), 1),
                "content_hash": digest if len(encoded) == 1 else f"{digest}:{part}",
                "split": split,
                "record_json": record_json,
                "source_stage": stage,
            })
    return splits, rejects


def replay_rows(stage: str, own: list[dict], earlier: list[list[dict]], share: float, seed: int) -> list[dict]:
    """Rows sampled from earlier stages' training data so that `share` of the mix is replay."""
    import random

    pool = [row for rows in earlier for row in rows]
    wanted = round(len(own) * share / (1 - share)) if share else 0
    if not pool or not wanted:
        return []
    rng = random.Random(f"{seed}:replay:{stage}")
    return rng.sample(pool, min(wanted, len(pool)))


def prepared_schema():
    """The Parquet schema of a prepared split: the contract `validate` and `train` read."""
    import pyarrow as pa

    return pa.schema([
        ("input_ids", pa.list_(pa.int32())),
        ("labels", pa.list_(pa.int32())),  # -100 where the token is not trained on
        ("n_tokens", pa.int64()),
        ("n_trainable", pa.int64()),
        ("trainable_share", pa.float64()),
        ("content_hash", pa.string()),
        ("split", pa.string()),
        ("record_json", pa.string()),
        ("source_stage", pa.string()),  # the stage the row came from (differs for replayed rows)
    ])


def write_split(rows: list[dict], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=prepared_schema()), path, compression="zstd")


def prepare_all(params: Params) -> list[PreparedStage]:
    from tasks.core.modeling import BaseInfo, load_tokenizer

    tokenizer = load_tokenizer(BaseInfo.load())
    results = []
    own_train: list[list[dict]] = []  # each earlier stage's own training rows, in plan order
    for stage, spec in params.data.stages.items():
        records = read_jsonl(paths.raw_file(stage))
        splits, rejects = prepare_stage(stage, spec.kind, records, tokenizer, params)
        replayed = replay_rows(stage, splits["train"], own_train, spec.replay_share, params.seed)
        own_train.append(splits["train"])
        write_split(splits["train"] + replayed, paths.prepared_file(stage, "train"))
        write_split(splits["eval"], paths.prepared_file(stage, "eval"))
        write_jsonl(paths.PREPARED_DIR / stage / "rejects.jsonl", rejects)
        results.append(PreparedStage(stage, len(splits["train"]), len(splits["eval"]), len(rejects), len(replayed)))
    return results


@task(name="prepare")
def prepare_task(params: Params) -> list[PreparedStage]:
    """Tokenize and split every stage's data."""
    return prepare_all(params)


def main(argv: list[str] | None = None) -> int:
    def run(args) -> list[str]:
        return [
            f"prepare: {r.stage}: {r.n_train} train (+{r.n_replayed} replayed), {r.n_eval} eval, {r.n_rejected} rejected"
            for r in prepare_all(load_params(args.params))
        ]

    return run_stage_cli("prepare", __doc__, run, argv)

if __name__ == "__main__":
    sys.exit(main())
