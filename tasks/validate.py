"""Validate each stage's prepared dataset with Great Expectations: the gate before training.

    python -m tasks.validate                    # reads params.yaml, writes reports/validation/*.json
    python -m tasks.validate --params my.yaml

Every stage gets one JSON report (written even when another stage fails) that holds only what the
data decides, so DVC sees a byte-identical file for identical data. If any expectation fails, the
step raises `DataValidationError` with one line per failure and exits 1 from the command line.
"""

from __future__ import annotations

import functools
import itertools
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.core import paths
from tasks.core.cli import run_stage_cli
from tasks.core.config import Params, ValidateConfig, load_params

if TYPE_CHECKING:
    import pandas as pd

# The contract written by `prepare`; validation fails if any of these is missing.
REQUIRED_COLUMNS = (
    "input_ids",
    "labels",
    "n_tokens",
    "n_trainable",
    "trainable_share",
    "content_hash",
    "split",
    "record_json",
)
MAX_EXAMPLES = 5  # offending values kept per expectation: enough to find them, small enough to read


class DataValidationError(RuntimeError):
    """A prepared dataset broke an expectation; the message lists every failure."""


@dataclass(frozen=True)
class ExpectationResult:
    """One expectation on one split, reduced to what the data decides (no ids, no timestamps)."""

    dataset: str  # `<stage>/<split>`
    name: str  # expectation type and its arguments, as a person would write it
    expectation: str
    column: str | None
    success: bool
    element_count: int | None
    unexpected_count: int | None
    observed: dict[str, Any] = field(default_factory=dict)
    problem: str = ""  # how a failure reads in the error message; empty when it passed


@dataclass(frozen=True)
class DatasetReport:
    """Everything validation found for one stage; `to_json` is what DVC hashes."""

    dataset: str
    records: dict[str, int]
    expectations: list[ExpectationResult]

    @property
    def success(self) -> bool:
        return all(e.success for e in self.expectations)

    @property
    def failures(self) -> list[ExpectationResult]:
        return [e for e in self.expectations if not e.success]

    def to_json(self) -> str:
        body = {"dataset": self.dataset, "success": self.success, "records": self.records}
        body["expectations"] = [asdict(e) for e in self.expectations]
        return json.dumps(body, sort_keys=True, indent=2) + "\n"


# --- Great Expectations -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Check:
    """An expectation to run, with its readable name and how to phrase its failure."""

    name: str
    expectation: Any  # a gx.expectations.Expectation; typed loosely to keep gx imports lazy
    describe: Callable[[dict[str, Any], int | None, int | None], str]  # (gx result, n, unexpected) -> words


@functools.cache
def _gx() -> tuple[Any, Any]:
    """One ephemeral context and batch definition for the whole process: setup is the slow part."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),  # no data docs
        progress_bars=ProgressBarsConfig(globally=False),  # keep DVC's log readable
        analytics_enabled=False,  # a pipeline step should not phone home
    )
    context = gx.get_context(mode="ephemeral", project_config=config)
    batch = (
        context.data_sources.add_pandas("prepared")
        .add_dataframe_asset("split")
        .add_batch_definition_whole_dataframe("whole")
    )
    return context, batch


_run_ids = itertools.count()  # suite names must be unique in the shared context; never reported


def _checks(split: str, df: pd.DataFrame, cfg: ValidateConfig, train_hashes: list[str] | None) -> list[_Check]:
    """The suite for one split. Column checks are skipped for a missing column, which already fails."""
    import great_expectations as gx

    E = gx.expectations
    present = set(df.columns)
    found = ", ".join(map(str, df.columns)) or "none"
    checks = [
        _Check(f"expect_column_to_exist({c})", E.ExpectColumnToExist(column=c),
               lambda r, n, u, found=found: f"column missing (columns found: {found})")
        for c in REQUIRED_COLUMNS
    ]
    checks += [
        _Check(f"expect_column_values_to_not_be_null({c})", E.ExpectColumnValuesToNotBeNull(column=c),
               lambda r, n, u: f"{u} of {n} records are null")
        for c in REQUIRED_COLUMNS if c in present
    ]
    min_rows = cfg.min_records if split == "train" else 1
    checks.append(_Check(
        f"expect_table_row_count_to_be_between(>= {min_rows})",
        E.ExpectTableRowCountToBeBetween(min_value=min_rows),
        lambda r, n, u: f"{r.get('observed_value')} records, need at least {min_rows}",
    ))
    if "n_tokens" in present:
        checks.append(_Check(
            f"expect_column_values_to_be_between(n_tokens, {cfg.min_tokens}..{cfg.max_tokens})",
            E.ExpectColumnValuesToBeBetween(column="n_tokens", min_value=cfg.min_tokens, max_value=cfg.max_tokens),
            lambda r, n, u: f"{u} of {n} records out of range",
        ))
    if "trainable_share" in present:
        checks.append(_Check(
            f"expect_column_values_to_be_between(trainable_share, >= {cfg.min_trainable_share})",
            E.ExpectColumnValuesToBeBetween(column="trainable_share", min_value=cfg.min_trainable_share),
            lambda r, n, u: f"{u} of {n} records have too few trainable tokens",
        ))
    if "split" in present:  # catches swapped or mislabelled files
        checks.append(_Check(
            f"expect_column_values_to_be_in_set(split, {{{split}}})",
            E.ExpectColumnValuesToBeInSet(column="split", value_set=[split]),
            lambda r, n, u: f"{u} of {n} records are labelled with another split",
        ))
    if "content_hash" in present:
        checks.append(_Check(
            "expect_column_values_to_be_unique(content_hash)",
            E.ExpectColumnValuesToBeUnique(column="content_hash"),
            lambda r, n, u: f"{u} of {n} records share their content_hash with another (duplicates)",
        ))
        if train_hashes is not None:
            checks.append(_Check(
                "expect_column_values_to_not_be_in_set(content_hash, train hashes)",
                E.ExpectColumnValuesToNotBeInSet(column="content_hash", value_set=train_hashes),
                lambda r, n, u: f"{u} of {n} eval records are in both train and eval",
            ))
    return checks


def _plain(value: Any) -> Any:
    """numpy scalars -> Python, so the report serialises the same way every time."""
    return value.item() if hasattr(value, "item") else value


def _observed(expectation: str, result: dict[str, Any]) -> dict[str, Any]:
    """The values worth keeping: the row count, or a few offending values (none for nulls: NaN is not JSON)."""
    if "observed_value" in result:
        return {"observed_value": _plain(result["observed_value"])}
    if expectation == "expect_column_values_to_not_be_null" or not result.get("unexpected_count"):
        return {}
    counts = result.get("partial_unexpected_counts") or []
    return {"unexpected_examples": [_plain(c["value"]) for c in counts[:MAX_EXAMPLES]]}


def _summarise(dataset: str, check: _Check, gx_result: Any) -> ExpectationResult:
    """Reduce one GX result to the deterministic fields the report and the error message need."""
    config = gx_result.expectation_config
    result = dict(gx_result.result or {})
    error = (gx_result.exception_info or {}).get("exception_message")
    n, u = result.get("element_count"), result.get("unexpected_count")
    success = bool(gx_result.success)
    problem = "" if success else (f"could not run: {error}" if error else check.describe(result, n, u))
    observed = _observed(config.type, result)
    if problem and u and observed.get("unexpected_examples"):
        examples = [str(v)[:16] for v in observed["unexpected_examples"][:3]]  # hashes are long
        problem += f" (e.g. {', '.join(examples)})"
    return ExpectationResult(
        dataset=dataset,
        name=check.name,
        expectation=config.type,
        column=config.kwargs.get("column"),
        success=success,
        element_count=_plain(n),
        unexpected_count=_plain(u),
        observed=observed,
        problem=problem,
    )


def _run_suite(dataset: str, df: pd.DataFrame, checks: list[_Check]) -> list[ExpectationResult]:
    """Run the checks as one suite through a validation definition; results come back in our order."""
    import great_expectations as gx

    context, batch = _gx()
    run = next(_run_ids)
    suite = context.suites.add(gx.ExpectationSuite(name=f"{dataset}#{run}"))
    by_id = {suite.add_expectation(c.expectation).id: c for c in checks}
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name=f"{dataset}#{run}", data=batch, suite=suite)
    )
    outcome = definition.run(batch_parameters={"dataframe": df})
    summaries = {
        r.expectation_config.id: _summarise(dataset, by_id[r.expectation_config.id], r) for r in outcome.results
    }
    return [summaries[i] for i in by_id]  # GX lists errored expectations first; keep suite order


# --- the step -------------------------------------------------------------------------------------


def validate_dataset(stage: str, train_df: pd.DataFrame, eval_df: pd.DataFrame, cfg: ValidateConfig) -> DatasetReport:
    """Run the train and eval suites of one stage, including the train/eval leakage check."""
    has_hashes = "content_hash" in train_df.columns
    train_hashes = sorted(set(train_df["content_hash"].dropna().astype(str))) if has_hashes else None
    results = _run_suite(f"{stage}/train", train_df, _checks("train", train_df, cfg, None))
    results += _run_suite(f"{stage}/eval", eval_df, _checks("eval", eval_df, cfg, train_hashes))
    return DatasetReport(stage, {"train": len(train_df), "eval": len(eval_df)}, results)


def _read_split(stage: str, split: str) -> pd.DataFrame:
    import pandas as pd

    path = paths.prepared_file(stage, split)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run the prepare step first (`dvc repro prepare`)")
    return pd.read_parquet(path)


def write_report(report: DatasetReport) -> Path:
    path = paths.validation_report(report.dataset)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(report.to_json())
    return path


def failure_message(reports: list[DatasetReport]) -> str:
    """One line per failed expectation, then what to do: this is what a person reads in the DVC log."""
    failures = [f for r in reports for f in r.failures]
    bad = [r.dataset for r in reports if not r.success]
    lines = [f"Data validation failed: {len(failures)} expectation(s) in {', '.join(bad)}:"]
    lines += [f"  {f.dataset}: {f.name}: {f.problem}" for f in failures]
    reports_at = ", ".join(str(paths.validation_report(d)) for d in bad)
    lines.append(
        f"Fix the data (details in {reports_at}) or the validate.* thresholds in params.yaml, "
        "then rerun `dvc repro validate`."
    )
    return "\n".join(lines)


def validate_all(params: Params) -> list[DatasetReport]:
    """Validate every stage, write all reports, then fail once with every problem listed."""
    cfg = params.validate_
    reports = []
    for stage in params.stage_names:
        report = validate_dataset(stage, _read_split(stage, "train"), _read_split(stage, "eval"), cfg)
        write_report(report)
        reports.append(report)
    if not all(r.success for r in reports):
        raise DataValidationError(failure_message(reports))
    return reports


# Never cache: the inputs are files on disk that params alone do not identify.
@task(name="validate", cache_policy=NO_CACHE)
def validate_task(params: Params) -> list[DatasetReport]:
    """Gate training on the prepared data's expectations."""
    return validate_all(params)


def main(argv: list[str] | None = None) -> int:
    def run(args) -> list[str]:
        return [
            f"{r.dataset}: train {r.records['train']} records, eval {r.records['eval']} records, "
            f"{len(r.expectations)} expectations passed -> {paths.validation_report(r.dataset)}"
            for r in validate_all(load_params(args.params))
        ]

    return run_stage_cli("validate", __doc__, run, argv, expected=(DataValidationError,), exit_code=1)

if __name__ == "__main__":
    sys.exit(main())
