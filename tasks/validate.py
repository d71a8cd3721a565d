"""Validate each stage's prepared dataset with Great Expectations: the gate before training.

    python -m tasks.validate                    # reads params.yaml, writes reports/validation/
    python -m tasks.validate --params my.yaml

Per stage and split, one suite holds every row to the schema (columns, types, non-empty text) and
the thresholds (token lengths, trainable share, row counts, no duplicates, no train/eval overlap).
A second suite, `<stage>/<split> (own records)`, holds the stage's own rows to its content
contracts: chats whose turns alternate and end with the assistant, and the checks set in
`stages.<stage>.checks` (one <think> block then an answer; a JSON reply). Replayed rows from
earlier stages answer to their own stage's contracts, not this one's.

Every stage gets one JSON report (written even when another stage fails) that holds only what the
data decides, so DVC sees a byte-identical file for identical data. The run also builds Great
Expectations Data Docs, an HTML site with every suite's results (timestamps included), under
reports/validation/docs/. If any expectation fails, the step raises `DataValidationError` with one
line per failure and the pages to open, and exits 1 from the command line.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from tasks.core import paths
from tasks.core.cli import exit_now, run_stage_cli
from tasks.core.config import Params, StageChecks, StageSpec, ValidateConfig, load_params

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
    "source_stage",
    "text",
    "roles",
    "last_reply",
)
# dtypes a scalar column may have once read from Parquet ("str": pandas strings, or Python str values).
COLUMN_TYPES: dict[str, tuple[str, ...]] = {
    "n_tokens": ("int64", "int32"),
    "n_trainable": ("int64", "int32"),
    "trainable_share": ("float64",),
    **{c: ("str",) for c in ("content_hash", "split", "record_json", "source_stage", "text", "roles", "last_reply")},
}
# An optional system prompt, then user/assistant pairs: the model learns from the final reply.
ROLES_PATTERN = r"^(?:system,)?(?:user,assistant,)*user,assistant$"
_NO_TAG = r"(?:(?!</?think>)[\s\S])"  # a character that does not start a think tag
# One <think>...</think> block first, then a non-empty answer; no other think tag anywhere. Built so
# that no part can match the same text two ways: linear time even on replies that fail.
THINK_PATTERN = rf"^<think>{_NO_TAG}*</think>\s*(?!</?think>)\S{_NO_TAG}*$"
OWN = " (own records)"  # dataset suffix of a stage's content suite
MAX_EXAMPLES = 5  # offending values kept per expectation: enough to find them, small enough to read
DOCS_SITE = "validation"  # the one Data Docs site of a run


class DataValidationError(RuntimeError):
    """A prepared dataset broke an expectation; the message lists every failure."""


@dataclass(frozen=True)
class StageContract:
    """What a stage's rows owe beyond the shared thresholds: its kind and content checks, and which
    stages its training rows may come from (itself, and earlier ones through replay)."""

    stage: str
    kind: Literal["pretrain", "sft"]
    checks: StageChecks = field(default_factory=StageChecks)
    earlier: tuple[str, ...] = ()

    @classmethod
    def of(cls, stages: dict[str, StageSpec], stage: str) -> StageContract:
        names, spec = list(stages), stages[stage]
        return cls(stage, spec.kind, spec.checks, tuple(names[: names.index(stage)]))


@dataclass(frozen=True)
class ExpectationResult:
    """One expectation on one split, reduced to what the data decides (no ids, no timestamps)."""

    dataset: str  # `<stage>/<split>`, or `<stage>/<split> (own records)` for the content suite
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


@dataclass(frozen=True)
class DataDocs:
    """The run's HTML site: its index, and each validated dataset's page (paths as the user types them)."""

    index: Path
    pages: dict[str, Path]


# --- the suites -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Check:
    """An expectation to run, with its readable name and how to phrase its failure."""

    name: str
    expectation: Any  # a gx.expectations.Expectation; typed loosely to keep gx imports lazy
    describe: Callable[[dict[str, Any], int | None, int | None], str]  # (gx result, n, unexpected) -> words


def _column_checks(df: pd.DataFrame) -> list[_Check]:
    """Columns exist, hold no nulls, have their types, and `text` is never empty. Checks of a
    missing column are skipped: its absence already fails, once."""
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
    for column, types in COLUMN_TYPES.items():
        if column not in present:
            continue
        expected = " or ".join(types)
        describe = lambda r, n, u, expected=expected: f"values are {r.get('observed_value')}, expected {expected}"
        if len(types) == 1:
            checks.append(_Check(f"expect_column_values_to_be_of_type({column}, {types[0]})",
                                 E.ExpectColumnValuesToBeOfType(column=column, type_=types[0]), describe))
        else:
            checks.append(_Check(f"expect_column_values_to_be_in_type_list({column}, {'|'.join(types)})",
                                 E.ExpectColumnValuesToBeInTypeList(column=column, type_list=list(types)), describe))
    if "text" in present:
        checks.append(_Check(
            "expect_column_value_lengths_to_be_between(text, >= 1)",
            E.ExpectColumnValueLengthsToBeBetween(column="text", min_value=1),
            lambda r, n, u: f"{u} of {n} records have empty text",
        ))
    return checks


def _threshold_checks(split: str, df: pd.DataFrame, cfg: ValidateConfig, contract: StageContract) -> list[_Check]:
    """Row count, token lengths, trainable share, and that each row sits in the right split and stage."""
    import great_expectations as gx

    E = gx.expectations
    present = set(df.columns)
    min_rows = cfg.min_records if split == "train" else 1
    checks = [_Check(
        f"expect_table_row_count_to_be_between(>= {min_rows})",
        E.ExpectTableRowCountToBeBetween(min_value=min_rows),
        lambda r, n, u: f"{r.get('observed_value')} records, need at least {min_rows}",
    )]
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
    if "source_stage" in present:  # replay only draws on earlier stages, and only into train
        allowed = [*contract.earlier, contract.stage] if split == "train" else [contract.stage]
        checks.append(_Check(
            f"expect_column_values_to_be_in_set(source_stage, {{{', '.join(allowed)}}})",
            E.ExpectColumnValuesToBeInSet(column="source_stage", value_set=allowed),
            lambda r, n, u: f"{u} of {n} records come from a stage not allowed in {contract.stage}/{split}",
        ))
    return checks


def _hash_checks(df: pd.DataFrame, train_hashes: list[str] | None) -> list[_Check]:
    """No duplicate rows within the split, and (for eval) none shared with train."""
    import great_expectations as gx

    E = gx.expectations
    if "content_hash" not in df.columns:
        return []
    checks = [_Check(
        "expect_column_values_to_be_unique(content_hash)",
        E.ExpectColumnValuesToBeUnique(column="content_hash"),
        lambda r, n, u: f"{u} of {n} records share their content_hash with another (duplicates)",
    )]
    if train_hashes is not None:
        checks.append(_Check(
            "expect_column_values_to_not_be_in_set(content_hash, train hashes)",
            E.ExpectColumnValuesToNotBeInSet(column="content_hash", value_set=train_hashes),
            lambda r, n, u: f"{u} of {n} eval records are in both train and eval",
        ))
    return checks


def _content_checks(contract: StageContract, df: pd.DataFrame) -> list[_Check]:
    """The stage's contracts on its own chats; empty for a pretrain stage without checks."""
    import great_expectations as gx

    E = gx.expectations
    present = set(df.columns)
    checks = []
    if contract.kind == "sft" and "roles" in present:
        checks.append(_Check(
            "expect_column_values_to_match_regex(roles, [system,](user,assistant,)*user,assistant)",
            E.ExpectColumnValuesToMatchRegex(column="roles", regex=ROLES_PATTERN),
            lambda r, n, u: f"{u} of {n} own records do not alternate user/assistant turns ending with the assistant",
        ))
    if contract.checks.think_block and "last_reply" in present:
        checks.append(_Check(
            "expect_column_values_to_match_regex(last_reply, <think>...</think> answer)",
            E.ExpectColumnValuesToMatchRegex(column="last_reply", regex=THINK_PATTERN),
            lambda r, n, u: f"{u} of {n} own records' final reply is not one <think>...</think> block followed by an answer",
        ))
    if contract.checks.json_target and "last_reply" in present:
        checks.append(_Check(
            "expect_column_values_to_be_json_parseable(last_reply)",
            E.ExpectColumnValuesToBeJsonParseable(column="last_reply"),
            lambda r, n, u: f"{u} of {n} own records' final reply is not valid JSON",
        ))
    return checks


def _own_rows(df: pd.DataFrame, stage: str) -> pd.DataFrame | None:
    """The rows this stage contributed; None when `source_stage` is missing (that fails already)."""
    if "source_stage" not in df.columns:
        return None
    return df[df["source_stage"] == stage].reset_index(drop=True)


# --- Great Expectations -------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """numpy scalars -> Python, so the report serialises the same way every time."""
    return value.item() if hasattr(value, "item") else value


def _observed(expectation: str, result: dict[str, Any]) -> dict[str, Any]:
    """The values worth keeping: the row count, or a few offending values (none for nulls: NaN is not JSON)."""
    if "observed_value" in result:
        return {"observed_value": _plain(result["observed_value"])}
    if not result.get("unexpected_count"):
        return {}
    origins = [row["origin"] for row in result.get("partial_unexpected_index_list") or []
               if isinstance(row, dict) and row.get("origin")]  # row numbers, without an origin column
    where = {"unexpected_origins": list(dict.fromkeys(origins))[:MAX_EXAMPLES]} if origins else {}
    if expectation == "expect_column_values_to_not_be_null":
        return where
    counts = result.get("partial_unexpected_counts") or []
    return {"unexpected_examples": [_plain(c["value"]) for c in counts[:MAX_EXAMPLES]]} | where


def _short(value: Any) -> str:
    """A value as it fits in one log line: strings quoted with newlines escaped, long ones cut."""
    if not isinstance(value, str):
        return str(value)
    cut = value[:32] + ("..." if len(value) > 32 else "")
    return json.dumps(cut, ensure_ascii=False)


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
        problem += f" (e.g. {', '.join(_short(v) for v in observed['unexpected_examples'][:3])})"
    if problem and u and observed.get("unexpected_origins"):
        problem += f"; from {', '.join(observed['unexpected_origins'][:3])}"
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


def _suite_name(dataset: str) -> str:
    """`syntax/train (own records)` -> `syntax.train.own_records`: Data Docs turns dots into folders
    and rejects slashes in names."""
    name = dataset.replace(OWN, ".own_records").replace("/", ".").replace("\\", ".")
    return name.replace(" ", "_")


class GxSession:
    """One ephemeral GX context for one validation run. Results stay in memory until `build_docs`
    renders them, so the site holds this run and nothing older."""

    def __init__(self, docs_dir: Path | None = None) -> None:
        # GX logs hundreds of INFO lines on import; the CLI's INFO logging would put them in DVC's log.
        logging.getLogger("great_expectations").setLevel(logging.WARNING)
        import great_expectations as gx
        from great_expectations.data_context.types.base import (
            DataContextConfig,
            InMemoryStoreBackendDefaults,
            ProgressBarsConfig,
        )

        self.docs_dir = docs_dir
        if docs_dir:  # the site shows this run only, even one that stops before building it
            shutil.rmtree(docs_dir, ignore_errors=True)
        sites = {DOCS_SITE: _site_config(docs_dir.resolve())} if docs_dir else {}
        config = DataContextConfig(
            store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
            data_docs_sites=sites,
            progress_bars=ProgressBarsConfig(globally=False),  # keep DVC's log readable
            analytics_enabled=False,  # a pipeline step should not phone home
        )
        self.context = gx.get_context(mode="ephemeral", project_config=config)
        self.batch = (
            self.context.data_sources.add_pandas("prepared")
            .add_dataframe_asset("split")
            .add_batch_definition_whole_dataframe("whole")
        )
        self._datasets: dict[str, str] = {}  # suite name -> dataset, to find each one's page

    def run(self, dataset: str, df: pd.DataFrame, checks: list[_Check]) -> list[ExpectationResult]:
        """Run the checks as one suite through a validation definition; results come back in our order."""
        import great_expectations as gx

        name = _suite_name(dataset)
        if name in self._datasets:  # only when a caller validates the same dataset twice
            name = f"{name}-{len(self._datasets)}"
        self._datasets[name] = dataset
        # All at once: adding expectations one by one re-serialises the suite each time (quadratic).
        suite = self.context.suites.add(gx.ExpectationSuite(name=name, expectations=[c.expectation for c in checks]))
        by_id = {e.id: c for e, c in zip(suite.expectations, checks, strict=True)}
        definition = self.context.validation_definitions.add(
            gx.ValidationDefinition(name=name, data=self.batch, suite=suite)
        )
        # With the rows' `origin` (file and line), a failure names where the offending rows came from.
        result_format = ({"result_format": "SUMMARY", "unexpected_index_column_names": ["origin"]}
                         if "origin" in df.columns else "SUMMARY")
        outcome = definition.run(batch_parameters={"dataframe": df}, result_format=result_format)  # stored for the docs
        summaries = {
            r.expectation_config.id: _summarise(dataset, by_id[r.expectation_config.id], r) for r in outcome.results
        }
        return [summaries[i] for i in by_id]  # GX lists errored expectations first; keep suite order

    def build_docs(self) -> DataDocs | None:
        """Render every result of this run to HTML; None when the session has no site."""
        if self.docs_dir is None:
            return None
        self.context.build_data_docs(site_names=[DOCS_SITE])  # logs rendering errors instead of raising
        if not (self.docs_dir / "index.html").exists():
            return None  # the failure message then points to the JSON reports alone
        _prune_unused_images(self.docs_dir)
        pages = {}
        for key in self.context.validation_results_store.list_keys():
            [site] = self.context.get_docs_sites_urls(resource_identifier=key, site_name=DOCS_SITE)
            pages[self._datasets[key.expectation_suite_identifier.name]] = self._local(site["site_url"])
        return DataDocs(self.docs_dir / "index.html", dict(sorted(pages.items())))

    def _local(self, url: str) -> Path:
        """`file:///abs/.../docs/validations/x.html` -> `reports/validation/docs/validations/x.html`."""
        from urllib.parse import urlparse
        from urllib.request import url2pathname

        page = Path(url2pathname(urlparse(url).path))
        return self.docs_dir / page.relative_to(self.docs_dir.resolve())


def _site_config(base_directory: Path) -> dict[str, Any]:
    """A local filesystem Data Docs site (the GX 1.x config: only base_directory is user-set)."""
    return {
        "class_name": "SiteBuilder",
        "show_how_to_buttons": False,  # tutorial pop-ups have no place in a pipeline report
        "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(base_directory)},
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
    }


def _prune_unused_images(site: Path) -> None:
    """GX copies ~3 MB of tutorial GIFs that no page links; dropping them keeps DVC's cache and
    MLflow's artifacts lean. An image named by any page, style sheet or script stays."""
    images = site / "static" / "images"
    if not images.is_dir():
        return
    texts = [p.read_text(errors="ignore") for p in site.rglob("*") if p.suffix in {".html", ".css", ".js"}]
    for image in images.iterdir():
        if image.is_file() and not any(image.name in t for t in texts):
            image.unlink()


# --- the step -------------------------------------------------------------------------------------


def validate_dataset(
    contract: StageContract,
    train_df: pd.DataFrame,
    eval_df: pd.DataFrame,
    cfg: ValidateConfig,
    session: GxSession | None = None,
) -> DatasetReport:
    """Run one stage's suites: per split, every row's schema and thresholds (with the train/eval
    leakage check on eval), then the stage's content contracts on its own rows."""
    session = session or GxSession()
    stage = contract.stage
    has_hashes = "content_hash" in train_df.columns
    train_hashes = sorted(set(train_df["content_hash"].dropna().astype(str))) if has_hashes else None
    results: list[ExpectationResult] = []
    for split, df in (("train", train_df), ("eval", eval_df)):
        checks = _column_checks(df) + _threshold_checks(split, df, cfg, contract)
        checks += _hash_checks(df, train_hashes if split == "eval" else None)
        results += session.run(f"{stage}/{split}", df, checks)
        own = _own_rows(df, stage)
        content = _content_checks(contract, df)
        if own is not None and content:
            results += session.run(f"{stage}/{split}{OWN}", own, content)
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


def failure_message(reports: list[DatasetReport], docs: DataDocs | None = None) -> str:
    """One line per failed expectation, the HTML pages to open, then what to do: this is what a
    person reads in the DVC log."""
    failures = [f for r in reports for f in r.failures]
    bad = [r.dataset for r in reports if not r.success]
    lines = [f"Data validation failed: {len(failures)} expectation(s) in {', '.join(bad)}:"]
    lines += [f"  {f.dataset}: {f.name}: {f.problem}" for f in failures]
    if docs is not None:
        lines.append(f"Data Docs (HTML): {docs.index}")
        failed_datasets = dict.fromkeys(f.dataset for f in failures)  # in order, once each
        lines += [f"  {d}: {docs.pages[d]}" for d in failed_datasets if d in docs.pages]
    reports_at = ", ".join(str(paths.validation_report(d)) for d in bad)
    lines.append(
        f"Fix the data (details in {reports_at}), the validate.* thresholds in params.yaml or the "
        "stage's stages.<stage>.checks, then rerun `dvc repro validate`."
    )
    return "\n".join(lines)


def validate_all(params: Params) -> list[DatasetReport]:
    """Validate every stage, write all reports and the Data Docs, then fail once with every problem listed."""
    cfg = params.validate_
    session = GxSession(paths.VALIDATION_DOCS_DIR)
    reports = []
    for stage in params.stage_names:
        train_df, eval_df = _read_split(stage, "train"), _read_split(stage, "eval")
        thresholds = cfg.for_stage(params.stages[stage].validate_)
        report = validate_dataset(StageContract.of(params.stages, stage), train_df, eval_df, thresholds, session)
        write_report(report)
        reports.append(report)
    docs = session.build_docs()
    if not all(r.success for r in reports):
        raise DataValidationError(failure_message(reports, docs))
    return reports


def main(argv: list[str] | None = None) -> int:
    def run(args) -> list[str]:
        return [
            f"{r.dataset}: train {r.records['train']} records, eval {r.records['eval']} records, "
            f"{len(r.expectations)} expectations passed -> {paths.validation_report(r.dataset)}"
            for r in validate_all(load_params(args.params))
        ] + [f"Data Docs -> {paths.VALIDATION_DOCS_INDEX}"]

    return run_stage_cli("validate", __doc__, run, argv, expected=(DataValidationError,), exit_code=1)

if __name__ == "__main__":
    exit_now(main())
