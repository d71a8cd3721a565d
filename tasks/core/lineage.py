"""What a registered version was made from, as MLflow tags: code, data, params, base model,
adapter chain and library versions — enough to tell two versions apart and to rebuild one."""

from __future__ import annotations

import hashlib
import importlib.metadata
import subprocess
from pathlib import Path

import yaml

from tasks.core import paths

LIBRARIES = ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate")


def git_lineage() -> dict[str, str]:
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], capture_output=True, text=True, check=False)
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "HEAD") or "unknown"
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    return {"git_commit": commit, "git_dirty": str(dirty).lower()}


def data_lineage(stages: list[str], lock_file: Path = Path("dvc.lock")) -> dict[str, str]:
    """md5 of each stage's prepared data, as DVC recorded it in dvc.lock."""
    if not lock_file.exists():
        return {}
    lock = yaml.safe_load(lock_file.read_text()) or {}
    tags = {}
    for stage in stages:
        for dep in lock.get("stages", {}).get(f"train@{stage}", {}).get("deps", []):
            if dep.get("path") == str(paths.PREPARED_DIR / stage):
                tags[f"data_md5.{stage}"] = dep.get("md5", "")
    return tags


def eval_data_fingerprint(stages: list[str]) -> str:
    """One hash of every stage's eval split: two versions' scores compare only when it matches."""
    digest = hashlib.sha256()
    for stage in stages:
        digest.update(stage.encode())
        digest.update(paths.prepared_file(stage, "eval").read_bytes())
    return digest.hexdigest()


def model_lineage(final_stage: str) -> dict[str, str]:
    """Base model (hub id / path and revision, or the tiny base's weights hash) and the sha256 of
    every adapter in the final model's chain, in order."""
    from tasks.core.chain import merged_chain_of
    from tasks.core.modeling import BaseInfo
    from tasks.core.tracking import file_sha256

    info = BaseInfo.load()
    tags = {"base_model": info.name_or_path if info.kind == "external" else "tiny (built from params.model.tiny)",
            "base_revision": info.revision or ""}
    weights = Path(info.name_or_path) / "model.safetensors"
    if info.kind == "tiny" and weights.exists():
        tags["base_sha256"] = file_sha256(weights)
    chain = [*merged_chain_of(final_stage), final_stage]
    tags["adapter_chain_order"] = " -> ".join(chain)
    for stage in chain:
        tags[f"adapter_sha256.{stage}"] = file_sha256(paths.adapter_dir(stage) / "adapter_model.safetensors")
    return tags


def library_versions() -> dict[str, str]:
    out = {}
    for name in LIBRARIES:
        try:
            out[f"version.{name}"] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[f"version.{name}"] = "not installed"
    return out
