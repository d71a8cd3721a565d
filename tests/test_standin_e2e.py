"""End to end on the Qwen3-shaped stand-in: the whole DAG with `dvc repro`, real data, NF4.

The base is a stand-in of Qwen3-30B-A3B-Base (`python -m tasks.tools.standin`: Qwen3's real
tokenizer and chat template, 152k vocabulary, 128 fused experts, 2 narrow layers, random weights),
built next to the workspace and named by `model.name_or_path`, so `base` only resolves it
(tests/standin_workspace.py says why it lives outside the workspace). Each stage reads a small
slice of a real set (Tiny Shakespeare, SNIPS, GSM8K, OpenAssistant trees), every stage trains a few
steps in NF4 (`train.quantization` is one key for the whole chain, so the whole chain is QLoRA),
`export` merges in bf16 and checks parity, `register` records the version, `serve` answers from
the registry. Checked: a multi-turn OpenAssistant conversation became one row per reply, each
trained on exactly that reply as Qwen3's template writes it; a second `dvc repro` has nothing to
do; the version's lineage names the local base folder; serve answers.
"""

from __future__ import annotations

import json
import re
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.pipeline_workspace import Workspace
from tests.shared_data import SHARED_DATA
from tests.standin_workspace import make_standin_workspace

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not SHARED_DATA.exists(), reason="needs ../shared/data")]

STAGES = ["embedding", "syntax", "thinking", "instructions"]
MODEL = "stagewise-assistant"
IGNORE_INDEX = -100


def ran_stages(dvc_output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", dvc_output)


@dataclass(frozen=True)
class StandinRun:
    workspace: Workspace
    standin: Path
    repro: str  # what the first `dvc repro` printed


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> StandinRun:
    tmp = tmp_path_factory.mktemp("standin-e2e")
    ws = make_standin_workspace(tmp)
    return StandinRun(ws, tmp / "standin", ws.dvc("repro").stdout)


def test_every_stage_ran_on_the_standin_in_nf4(run):
    root = run.workspace.root
    assert set(ran_stages(run.repro)) == {"ingest", "base", "prepare", "validate", *[f"train@{s}" for s in STAGES],
                                          "evaluate", "export", "register"}
    base = json.loads((root / "models/base/base.json").read_text())
    assert base["kind"] == "external" and base["name_or_path"] == str(run.standin.resolve())
    assert not (root / "models/base/model.safetensors").exists()  # resolved, not copied or built
    for stage in STAGES:
        assert json.loads((root / f"models/{stage}/stage.json").read_text())["quantization"] == "nf4"
    export = json.loads((root / "metrics/export.json").read_text())
    assert export["passed"] is True and export["dtype"] == "bfloat16"
    assert (root / "exports/merged/model.safetensors").exists()


def qwen3_last_reply(message: dict) -> str:
    """How Qwen3's template writes the last assistant reply of a conversation, from its end-of-
    prompt newline to <|im_end|>: a think block always (empty without reasoning), then the answer."""
    content = message["content"]
    reasoning = ""
    if "</think>" in content:
        reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
        content = content.split("</think>")[-1].lstrip("\n")
    return f"<think>\n{reasoning.strip(chr(10))}\n</think>\n\n{content.lstrip(chr(10))}<|im_end|>"


def qwen3_history(messages: list[dict]) -> str:
    """Qwen3's render of the turns before a reply, with its generation prompt: earlier replies
    without their think blocks (the template drops reasoning before the last user message)."""
    out = []
    for m in messages:
        content = m["content"]
        if m["role"] == "assistant" and "</think>" in content:
            content = content.split("</think>")[-1].lstrip("\n")
        out.append(f"<|im_start|>{m['role']}\n{content}<|im_end|>\n")
    return "".join(out) + "<|im_start|>assistant\n"


def test_a_multi_turn_oasst_record_trains_each_reply_as_qwen3_writes_it(run):
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    root = run.workspace.root
    tokenizer = AutoTokenizer.from_pretrained(run.standin)
    rows = [r for split in ("train", "eval")
            for r in pq.read_table(root / f"data/prepared/instructions/{split}.parquet").to_pylist()
            if r["source_stage"] == "instructions"]  # not the rows replayed from earlier stages
    by_record: dict[str, dict[int, dict]] = defaultdict(dict)
    for row in rows:
        digest, _, turn = row["content_hash"].partition("#")
        by_record[digest][int(turn or 0)] = row
    # a conversation with two replies whose rows all survived (per_turn: one row per reply, #1 #2)
    record = next(turns for turns in by_record.values() if sorted(turns) == [1, 2])
    conversation = json.loads(record[2]["record_json"])["messages"]
    assert [m["role"] for m in conversation] == ["user", "assistant", "user", "assistant"]
    source = [json.loads(line) for line in (root / "data/sources/oasst.jsonl").open()]
    assert conversation[0]["content"] in {tree["prompt"]["text"] for tree in source}  # the real OASST prompt
    for turn, upto in ((1, 2), (2, 4)):
        row = record[turn]
        messages = conversation[:upto]
        assert json.loads(row["record_json"])["messages"] == messages
        trained = [t for t, label in zip(row["input_ids"], row["labels"]) if label != IGNORE_INDEX]
        assert trained == [label for label in row["labels"] if label != IGNORE_INDEX]  # labels are the ids
        expected = qwen3_last_reply(messages[-1])
        assert tokenizer.decode(trained, skip_special_tokens=False) == expected, f"reply {turn}"
        # ...and the untrained part before it is the history as Qwen3 renders it, up to the generation prompt
        first = next(i for i, label in enumerate(row["labels"]) if label != IGNORE_INDEX)
        assert tokenizer.decode(row["input_ids"][:first], skip_special_tokens=False) == qwen3_history(messages[:-1])
    assert record[1]["roles"] == "user,assistant" and record[2]["roles"] == "user,assistant,user,assistant"


def test_dvc_repro_afterwards_is_a_no_op(run):
    ws = run.workspace
    lock = (ws.root / "dvc.lock").read_text()
    assert ran_stages(ws.dvc("repro").stdout) == []
    assert (ws.root / "dvc.lock").read_text() == lock
    assert ws.dvc("status").stdout.strip().endswith("Data and pipelines are up to date.")


def test_the_registered_version_names_the_local_base_folder(run):
    client = run.workspace.mlflow_client()
    version = client.get_model_version_by_alias(MODEL, "champion")
    assert version.tags["base_model"] == str(run.standin.resolve())
    assert version.tags["adapter_chain_order"] == "instructions"  # continue: one adapter carries the curriculum
    assert version.tags["git_dirty"] == "false"
    registration = json.loads((run.workspace.root / "reports/registration.json").read_text())
    assert registration["version"] == str(version.version)


def test_serve_answers_from_the_registry(run):
    out = run.workspace.run(sys.executable, "-m", "tasks.serve", "--json", "--max-new-tokens", "4",
                            "--prompt", "What is the capital of France?", timeout=300)
    answers = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
    assert len(answers) == 1 and answers[0]["prompt"] == "What is the capital of France?"
    assert answers[0]["reply"].strip()
