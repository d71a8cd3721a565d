"""Every preset ingests its real data set from ../shared/data through the whole `ingest` step
(path resolution, format reader, preset, record check): zero crashes, exact counts, no rejects
except the designed ones, and a few records checked field by field."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import yaml

from tasks.core import paths
from tasks.core.config import parse_params
from tasks.core.records import read_jsonl
from bench.prepare_throughput import sources
from tasks.ingest import ingest_all
from tests.shared_data import SHARED_DATA

ROOT = Path(__file__).resolve().parents[1]
SHARED = SHARED_DATA
pytestmark = pytest.mark.skipif(not SHARED.exists(), reason="needs ../shared/data")

# The benchmark's mapping of every shared set to a curriculum stage: one place says how they map.
SOURCES = sources(SHARED)


@pytest.fixture(scope="module")
def ingested(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for stage, sources in SOURCES.items():
        raw["stages"][stage]["data"]["sources"] = sources
    cwd = Path.cwd()
    try:
        import os

        os.chdir(root)
        results = {r.stage: r for r in ingest_all(parse_params(raw))}
        records = {stage: read_jsonl(paths.raw_file(stage)) for stage in SOURCES}
        rejects = {stage: read_jsonl(paths.raw_rejects(stage)) for stage in SOURCES}
    finally:
        os.chdir(cwd)
    return results, records, rejects


def test_counts_per_source(ingested):
    results, _, _ = ingested
    counts = {stage: [s.records for s in r.sources] for stage, r in results.items()}
    assert counts == {
        "embedding": [299, 60],  # paragraphs grouped into documents; one per WikiText article
        "syntax": [13784, 3431],  # every SNIPS training utterance; advising minus the `exclude` split
        "thinking": [7473],
        "instructions": [1100, 175, 100],
    }


def test_only_the_designed_rejects(ingested):
    _, _, rejects = ingested
    assert rejects["embedding"] == rejects["thinking"] == []
    # OASST paths ending in an unanswered prompter turn: the turn is cut, the change on record
    assert Counter((r["reason"], r["action"]) for r in rejects["instructions"]) == {("trailing_turns_cut", "changed"): 39}
    # the CESU-8 emoji in SNIPS PlayMusic: repaired, reported with its file and byte offset
    assert [(Path(r["source"]).name, r["where"], r["reason"], r["action"]) for r in rejects["syntax"]] == [
        ("train_PlayMusic_full.json", "byte 150732", "cesu8_repaired", "repaired")]


def test_records_field_by_field(ingested):
    _, records, _ = ingested
    gsm = records["thinking"][0]
    assert gsm["messages"][0]["content"].startswith("Natalia sold clips to 48 of her friends in April")
    assert gsm["messages"][1]["content"] == (
        "<think>\nNatalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether in April and May.\n"
        "</think>\nThe answer is 72.")
    snips = [r for r in records["syntax"] if r["origin"]["where"].startswith("PlayMusic")]
    assert any("\U0001F355" in r["messages"][0]["content"] for r in snips)
    first = json.loads(records["syntax"][0]["messages"][1]["content"])
    assert set(first) == {"intent", "slots"} and first["intent"] == "AddToPlaylist"
    sql = [r for r in records["syntax"] if r["origin"]["uri"].endswith("advising.json")]
    assert all("number0" not in r["messages"][0]["content"] + r["messages"][1]["content"] for r in sql)
    assert sql[0]["messages"][1]["content"].startswith("SELECT DISTINCT COURSEalias0.ADVISORY_REQUIREMENT")
    oasst = [r for r in records["instructions"] if r["origin"]["uri"].endswith("en_100_tree.jsonl")]
    assert {len(r["messages"]) for r in oasst} == {2, 4}
    assert all([m["role"] for m in r["messages"]] == ["user", "assistant"] * (len(r["messages"]) // 2) for r in oasst)
    assert oasst[0]["messages"][0]["content"] == "How can I find the best 401k plan for my needs?"
    wiki = [r for r in records["embedding"] if r["origin"]["uri"].endswith("valid.txt")]
    assert wiki[0]["text"].lstrip().startswith("= Homarus gammarus =")
