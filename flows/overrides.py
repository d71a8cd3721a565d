"""Parameter overrides by dotted key, written into params.yaml the way `dvc exp run --set-param`
does: comments and layout are kept, and the result is validated before the file is touched."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from tasks.core.config import ConfigError, load_params, parse_params, set_dotted


def parse_assignment(text: str) -> tuple[str, Any]:
    """`stages.syntax.train.max_steps=200` -> ("stages.syntax.train.max_steps", 200)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not KEY=VALUE (e.g. stages.syntax.train.max_steps=200)")
    parsed = yaml.safe_load(value)
    if isinstance(parsed, str):  # YAML 1.1 reads `1e-3` as a string; params want the number
        try:
            parsed = float(parsed) if not parsed.strip().lstrip("+-").isdigit() else int(parsed)
        except ValueError:
            pass
    return key.strip(), parsed


def check_overrides(params_file: Path, overrides: dict[str, Any]) -> None:
    """ConfigError unless params_file with `overrides` applied is valid config (nothing is written)."""
    if not overrides:
        load_params(params_file)
        return
    plain = yaml.safe_load(params_file.read_text()) or {}
    for key, value in overrides.items():
        set_dotted(plain, key, copy.deepcopy(value))
    parse_params(plain, f"{params_file} with overrides {sorted(overrides)}")


def apply_overrides(params_file: Path, overrides: dict[str, Any]) -> None:
    """Validate `overrides` against the typed config, then write them into params_file."""
    from ruamel.yaml import YAML

    check_overrides(params_file, overrides)

    rt = YAML()  # round-trip: keeps comments and key order
    rt.preserve_quotes = True
    rt.width = 4096  # never re-wrap a line the user wrote on one line
    rt.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    doc = rt.load(params_file.read_text())
    for key, value in overrides.items():
        set_dotted(doc, key, value)
    with params_file.open("w") as fh:
        rt.dump(doc, fh)
