"""`ingest` stage: bring each curriculum stage's records into `data/raw/<stage>.jsonl`.

A stage with `stages.<stage>.data.sources` reads them (local files, globs, `save_to_disk` folders,
`s3://` URIs) and maps each item to stage records through its preset; a stage without sources gets
the embedded synthetic curriculum. Nothing is dropped silently: every item that cannot become a
record, and every repaired one, goes to the stage's rejects file with its reason.

    python -m tasks.ingest [--params params.yaml]

Per stage it writes:
    data/raw/<stage>.jsonl          {"text"} or {"messages"} records, each with its "origin"
    data/raw/<stage>.rejects.jsonl  what was dropped or repaired, where, and why
    data/raw/<stage>.report.json    records and reject reasons per source (read by `prepare`)
"""

from __future__ import annotations

import logging
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tasks.core import paths
from tasks.core.cli import exit_now, run_stage_cli
from tasks.core.config import ConfigError, Params, SourceSpec, StageSpec, load_params
from tasks.core.records import RecordError, write_json, write_jsonl
from tasks.data.errors import Reject, SourceError

log = logging.getLogger(__name__)


@dataclass
class SourceSummary:
    """What one source gave: how many records, and how many items it lost (or repaired) for each reason."""

    index: int
    path: str
    preset: str
    inputs: list[str] = field(default_factory=list)
    records: int = 0
    dropped: Counter = field(default_factory=Counter)
    repaired: Counter = field(default_factory=Counter)
    changed: Counter = field(default_factory=Counter)  # kept, with a change on record (a turn cut)
    limited_from: int | None = None  # records before the source's `limit` sampled them

    @property
    def reject_share(self) -> float:
        lost = sum(self.dropped.values())
        return lost / max(lost + self.records, 1)


@dataclass(frozen=True)
class IngestedStage:
    stage: str
    records: int
    sources: list[SourceSummary]  # empty for the synthetic curriculum

    @property
    def synthetic(self) -> bool:
        return not self.sources

    def report(self) -> dict:
        return {
            "stage": self.stage,
            "records": self.records,
            "synthetic": self.synthetic,
            "sources": [
                asdict(s) | {"dropped": dict(sorted(s.dropped.items())), "repaired": dict(sorted(s.repaired.items())),
                             "changed": dict(sorted(s.changed.items()))}
                for s in self.sources
            ],
        }


def _warn_if_untracked(spec: SourceSpec, stage: str) -> None:
    """DVC hashes data/sources/; a local file elsewhere can change without re-running the pipeline."""
    if spec.path.startswith("s3://"):
        log.info("stages.%s.data.sources: %s is read from S3; DVC does not see its content change "
                 "(run `dvc repro --force ingest` after updating it)", stage, spec.path)
        return
    try:
        Path(spec.path).resolve().relative_to(paths.SOURCES_DIR.resolve())
    except ValueError:
        log.warning("stages.%s.data.sources: %s is outside %s/: DVC does not track it, so editing it will not "
                    "re-run the pipeline; move it under %s/", stage, spec.path, paths.SOURCES_DIR, paths.SOURCES_DIR)


def ingest_source(spec: SourceSpec, index: int, kind: str,
                  sample_seed: str = "") -> tuple[list[dict], list[Reject], SourceSummary]:
    """Read one source through its preset; records carry their origin, rejects their reason.
    With `limit`, a sample of that many records, the same for the same `sample_seed`, in file order."""
    from tasks.data.presets import PresetError, build_preset
    from tasks.data.readers import read_items
    from tasks.data.sources import resolve_inputs

    try:
        preset = build_preset(spec.preset, kind, spec.fields, spec.options)
    except PresetError as exc:
        raise ConfigError(f"source {spec.path}: {exc}") from None
    summary = SourceSummary(index, spec.path, preset.name)
    records: list[dict] = []
    rejects: list[Reject] = []

    def reject(r: Reject) -> None:
        rejects.append(r)
        {"repaired": summary.repaired, "changed": summary.changed}.get(r.action, summary.dropped)[r.reason] += 1

    for inp in resolve_inputs(spec.path, spec.format):
        summary.inputs.append(inp.uri)
        for item in read_items(inp):
            if isinstance(item, Reject):
                reject(item)
                continue
            for produced in preset.records(item):
                if isinstance(produced, Reject):
                    reject(produced)
                    continue
                where, record = produced  # already checked by the preset (check_record)
                records.append(record | {"origin": {"source": index, "uri": inp.uri, "where": where}})
    if spec.limit is not None and len(records) > spec.limit:
        summary.limited_from = len(records)
        keep = sorted(random.Random(f"{sample_seed}:limit:{index}").sample(range(len(records)), spec.limit))
        records = [records[i] for i in keep]
    summary.records = len(records)
    return records, rejects, summary


def _check_losses(stage: str, summaries: list[SourceSummary], max_share: float) -> None:
    """Fail loudly when a source lost most of its items: a wrong preset or format, not bad luck."""
    for s in summaries:
        if s.records and s.reject_share <= max_share:
            continue
        top = ", ".join(f"{reason} x{n}" for reason, n in s.dropped.most_common(3)) or "no items found"
        raise SourceError(
            f"stages.{stage}.data.sources[{s.index}] ({s.path}): {s.records} records, "
            f"{sum(s.dropped.values())} rejected ({top}); more than data.max_reject_share={max_share} "
            f"of its items. Check its preset/format/fields; every reject and its reason is in "
            f"{paths.raw_rejects(stage)}"
        )


def ingest_stage(stage: str, spec: StageSpec, seed: int, max_reject_share: float) -> IngestedStage:
    """Write one stage's raw records, rejects and report; fails after writing if a source lost too much."""
    from tasks.data.synthetic import generate_stage_records

    if not spec.data.sources:
        generated = generate_stage_records(stage, spec.kind, spec.data.n_records or 0, seed)
        records = [r | {"origin": {"source": "synthetic", "where": f"#{i}"}} for i, r in enumerate(generated)]
        rejects, summaries = [], []
    else:
        if spec.data.n_records is not None:
            log.warning("stages.%s.data.n_records (%d) is ignored: it sizes the synthetic curriculum, and this stage "
                        "reads sources; cap a source with its `limit`", stage, spec.data.n_records)
        records, rejects, summaries = [], [], []
        for index, source in enumerate(spec.data.sources):
            _warn_if_untracked(source, stage)
            started = time.perf_counter()
            got, lost, summary = ingest_source(source, index, spec.kind, f"{seed}:{stage}")
            log.info("%s: %s (%s, %d input(s)): %d records, %d rejected, %d repaired in %.1f s", stage, source.path,
                     summary.preset, len(summary.inputs), summary.records, sum(summary.dropped.values()),
                     sum(summary.repaired.values()), time.perf_counter() - started)
            records += got
            rejects += lost
            summaries.append(summary)
    result = IngestedStage(stage, len(records), summaries)
    write_jsonl(paths.raw_file(stage), records)
    write_jsonl(paths.raw_rejects(stage), (r.to_json() for r in rejects))
    write_json(paths.raw_report(stage), result.report())
    _check_losses(stage, summaries, max_reject_share)
    return result


def ingest_all(params: Params) -> list[IngestedStage]:
    """Read every stage's sources (or generate the curriculum) into data/raw."""
    return [ingest_stage(stage, spec, params.seed, params.data.max_reject_share) for stage, spec in params.stages.items()]


def _describe(result: IngestedStage) -> str:
    if result.synthetic:
        return f"ingest: {result.stage}: {result.records} records (generated) -> {paths.raw_file(result.stage)}"
    dropped = sum(sum(s.dropped.values()) for s in result.sources)
    repaired = sum(sum(s.repaired.values()) for s in result.sources)
    return (f"ingest: {result.stage}: {result.records} records from {len(result.sources)} source(s), "
            f"{dropped} rejected, {repaired} repaired -> {paths.raw_file(result.stage)}")


def main(argv: list[str] | None = None) -> int:
    def run(args) -> list[str]:
        return [_describe(r) for r in ingest_all(load_params(args.params))]

    return run_stage_cli("ingest", __doc__, run, argv, expected=(SourceError, RecordError))


if __name__ == "__main__":
    exit_now(main())
