"""Optional lm-evaluation-harness tasks on the final model (`evaluate.lm_eval` in params.yaml).

The harness scores the model object `evaluate` already built (no second load from disk), through
`lm_eval.simple_evaluate`, and its results become `lm_eval.<task>.<metric>` in
metrics/evaluate.json. It is an extra: `pip install -e ".[lmeval]"`.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

from tasks.core.config import ConfigError, LmEvalConfig

log = logging.getLogger(__name__)
INSTALL = 'pip install -e ".[lmeval]"'


def require_harness(cfg: LmEvalConfig) -> None:
    """Fail before any model is scored when tasks are listed but the harness is missing: finding
    out after an hour of evaluation is the worse way."""
    if cfg.tasks and importlib.util.find_spec("lm_eval") is None:
        raise ConfigError(
            f"evaluate.lm_eval.tasks lists {cfg.tasks}, but lm-evaluation-harness (the `lm_eval` package) is "
            f"not installed: run `{INSTALL}`, or set evaluate.lm_eval.tasks: [] in params.yaml"
        )


def task_manager(cfg: LmEvalConfig):
    """The harness's task index: the built-in tasks and `include_path`; unknown names fail here,
    by name, rather than deep inside the harness."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=cfg.include_path)
    unknown = [name for name in cfg.tasks if name not in manager.all_tasks]
    if unknown:
        where = f" nor in evaluate.lm_eval.include_path ({cfg.include_path})" if cfg.include_path else ""
        raise ConfigError(f"evaluate.lm_eval.tasks: {unknown} not among the harness's tasks{where}: "
                          f"check the names with `lm_eval ls tasks`")
    return manager


def harness_scores(model, tokenizer, cfg: LmEvalConfig) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} of the listed tasks on this model (an already-loaded transformers
    or PEFT model), numbers only."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    manager = task_manager(cfg)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.batch_size)
    results = lm_eval.simple_evaluate(model=lm, tasks=list(cfg.tasks), task_manager=manager, limit=cfg.limit,
                                      num_fewshot=cfg.num_fewshot, log_samples=False)
    return {task: numeric_metrics(row) for task, row in results["results"].items()}


def numeric_metrics(row: dict[str, Any]) -> dict[str, float]:
    """`acc,none` -> `acc`; another filter stays in the name (`exact_match,strict-match` ->
    `exact_match.strict-match`); labels (alias, name) and "N/A" stderrs are dropped."""
    out = {}
    for key, value in row.items():
        if "," not in key or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        metric, filter_name = key.split(",", 1)
        out[metric if filter_name == "none" else f"{metric}.{filter_name}"] = float(value)
    return out
