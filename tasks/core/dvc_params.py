"""The params.yaml keys (and the files) each DVC stage declares in dvc.yaml, and their values.

dvc.yaml is the one definition of what a stage's result depends on: DVC re-runs a stage when one
of its keys changes, and `train` resumes a checkpoint only when the same keys hold the same values
(its resume key), so the two can never drift apart.
"""

from __future__ import annotations

import posixpath
from pathlib import Path
from typing import Any

import yaml

DVC_FILE = Path(__file__).resolve().parents[2] / "dvc.yaml"
WHOLE_FILE = ""  # a stage that lists `params.yaml:` depends on every key


def _stage_body(name: str, dvc_file: Path) -> dict[str, Any]:
    """A DVC stage's definition as dvc.yaml writes it (a foreach stage's `do` template)."""
    stages = yaml.safe_load(dvc_file.read_text())["stages"]
    if name not in stages:
        raise KeyError(f"{dvc_file} has no stage {name!r}")
    spec = stages[name]
    return spec["do"] if "foreach" in spec else spec


def declared_keys(stage: str, dvc_file: Path = DVC_FILE) -> list[str]:
    """Dotted params.yaml keys of a DVC stage (`train@syntax`: the foreach template, `${key}` filled)."""
    name, _, key = stage.partition("@")
    entries = _stage_body(name, dvc_file).get("params", [])
    keys: list[str] = []
    for entry in entries:
        if isinstance(entry, dict):  # {file: [keys]} or {file: null} (every key)
            for listed in entry.values():
                keys += [WHOLE_FILE] if listed is None else list(listed)
        else:
            keys.append(str(entry))
    return [k.replace("${key}", key) for k in keys]


def value_at(tree: dict[str, Any], dotted: str) -> Any:
    """`tree["a"]["b"]` for "a.b"; the whole tree for WHOLE_FILE."""
    value: Any = tree
    for part in filter(None, dotted.split(".")):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(f"params.yaml has no key {dotted!r} (declared in dvc.yaml)")
        value = value[part]
    return value


def declared_values(stage: str, tree: dict[str, Any], dvc_file: Path = DVC_FILE) -> dict[str, Any]:
    """{dotted key: value} of every key the stage declares, read from a params tree."""
    return {key: value_at(tree, key) for key in declared_keys(stage, dvc_file)}


def undeclared_stage_keys(stage: str, stage_names: list[str], dvc_file: Path = DVC_FILE) -> list[str]:
    """Keys of curriculum stages that `stage` reads but dvc.yaml does not list: where dvc.yaml names
    `stages.<name>.<field>` for one curriculum stage, it must name it for every stage in params.yaml
    (a stage added to params.yaml but not to dvc.yaml would change without DVC re-running `stage`)."""
    spec = yaml.safe_load(dvc_file.read_text())["stages"].get(stage.partition("@")[0])
    if "@" in stage or (isinstance(spec, dict) and "foreach" in spec):
        # a foreach stage names its own block through ${key} (`python -m tasks.train` checks as `train`)
        return []
    declared = declared_keys(stage, dvc_file)
    fields = {key.split(".", 2)[2] for key in declared if key.startswith("stages.") and key.count(".") >= 2}
    return [f"stages.{name}.{field}" for name in stage_names for field in sorted(fields)
            if f"stages.{name}.{field}" not in declared]


def declared_deps(stage: str, dvc_file: Path = DVC_FILE) -> list[str]:
    """The file and folder deps a DVC stage lists, as written (relative to dvc.yaml's folder)."""
    return [str(d) for d in _stage_body(stage, dvc_file).get("deps", [])]


def undeclared_files(stage: str, files: list[str], dvc_file: Path = DVC_FILE) -> list[str]:
    """The local files among `files` that no dep of `stage` covers (the path itself, or a folder
    above it): DVC would not re-run the stage when they change. S3 URIs are not local files."""
    root = dvc_file.resolve().parent
    deps = [posixpath.normpath(d) for d in declared_deps(stage, dvc_file)]
    missing = []
    for name in files:
        if name.startswith("s3://"):
            continue
        path = Path(name)
        resolved = path.resolve() if path.is_absolute() else (root / path).resolve()
        try:
            rel = resolved.relative_to(root).as_posix()
        except ValueError:
            missing.append(name)
            continue
        if not any(rel == d or rel.startswith(f"{d}/") for d in deps):
            missing.append(name)
    return missing
