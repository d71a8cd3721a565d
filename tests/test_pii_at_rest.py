"""With `prepare.clean.scrub_pii` on, no original e-mail, phone number, IP address or key is left in
anything `prepare` writes: not in the training rows, and not in the rejects, whether the record was
scrubbed and kept, dropped later (a duplicate), or rejected by ingest (a broken line)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from tasks.core import paths
from tasks.core.config import parse_params
from tasks.core.records import read_jsonl, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
EMAIL, PHONE, IP, KEY = "ada.lovelace@example.org", "+44 20 7946 0958", "203.0.113.77", "sk-live-9fQ2xLp7Rt4Vb8Nw3Kz6Hd1Ms5Jc0Ya"
ORIGINALS = (EMAIL, PHONE, IP, KEY, "ada.lovelace", "7946 0958", "9fQ2xLp7Rt4Vb8Nw3Kz6Hd1Ms5Jc0Ya")


def chat(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


@pytest.fixture
def prepared(tmp_path, monkeypatch, unit_tokenizer) -> Path:
    from tasks.core.modeling import BaseInfo
    from tasks.ingest import ingest_all
    from tasks.prepare import prepare_all

    monkeypatch.chdir(tmp_path)
    unit_tokenizer.save_pretrained(tmp_path / "tok")
    BaseInfo(kind="tiny", name_or_path=str(tmp_path / "tok")).save(paths.BASE_DIR)
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for spec in raw["stages"].values():
        spec["data"]["n_records"] = 30
    raw["prepare"]["clean"]["scrub_pii"] = True
    source = Path("data/sources/support.jsonl")
    records = [chat(f"Ticket {i}: how do I reset my password?", f"Open settings, step {i}.") for i in range(20)]
    leaky = chat(f"Mail me at {EMAIL} or call {PHONE}.", f"Done. Your server {IP} now uses the key {KEY}.")
    records += [leaky, copy.deepcopy(leaky)]  # the second is a duplicate: dropped after cleaning
    write_jsonl(source, records)
    with source.open("a") as f:  # a broken line ingest rejects, with PII in it
        f.write(f'{{"messages": [{{"role": "user", "content": "write to {EMAIL}, from {IP}"\n')
    raw["stages"]["instructions"]["data"]["sources"] = [{"path": str(source)}]
    params = parse_params(raw)
    ingest_all(params)
    prepare_all(params)
    return tmp_path


def test_no_original_pii_in_anything_prepare_wrote(prepared):
    import pyarrow.parquet as pq

    written = [p for p in (prepared / "data" / "prepared").rglob("*") if p.is_file()] + [prepared / paths.DATA_REPORT]
    assert len(written) > 4
    for path in written:
        text = json.dumps(pq.read_table(path).to_pylist(), default=str) if path.suffix == ".parquet" else path.read_text()
        leaked = [s for s in ORIGINALS if s in text]
        assert not leaked, f"{path.relative_to(prepared)} holds {leaked}"


def test_every_loss_is_still_on_record_with_where_to_find_the_original(prepared):
    rejects = read_jsonl(paths.prepared_rejects("instructions"))
    by_reason = {(r["step"], r["reason"].split(",")[0]): r for r in rejects}
    changed = next(r for r in rejects if r["action"] == "changed")
    assert set(changed["reason"].split(",")) == {"pii_email", "pii_phone", "pii_ip", "pii_secret"}
    assert "data/sources/support.jsonl line 21" in changed["detail"] and "scrubbed" in changed["detail"]
    assert "<EMAIL>" in json.dumps(changed["record"]) and "<SECRET>" in json.dumps(changed["record"])
    assert ("prepare", "exact_duplicate") in by_reason and ("ingest", "malformed_json") in by_reason
    assert "<EMAIL>" in by_reason[("ingest", "malformed_json")]["record"]
