"""A registered version, rebuilt from the registry alone: what `register` adds so a consumer can,
and the rebuilding.

What the registry holds for a version: its source is the final stage's adapter folder
(`runs:/<final run>/adapter`, with `stage.json` naming the adapters merged before it), and the
tags `adapter_run.<stage>` name the run whose `adapter/` artifact holds each stage's adapter. The
base model is not there: `log_serving_bundle` adds it to the final run as `base/` — `base.json`
(what `BaseInfo` records) and, for the tiny embedded base, its weights and tokenizer (a few MB);
an external base (hub id and revision) is recorded, not copied.

`load_version` then makes the model exactly as `tasks/core/chain.py::load_stage_model` makes it
from the working tree: the base, the merged chain merged in full precision, the final adapter on top.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from tasks.core import paths

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

    from tasks.core.modeling import BaseInfo

log = logging.getLogger(__name__)

BASE_ARTIFACT = "base"  # in the version's run, next to `adapter/`
ADAPTER_ARTIFACT = "adapter"
RUN_TAG_PREFIX = "adapter_run."
# The tiny base's own files; pretrain.json (its training history) is not needed to serve it.
TINY_BASE_SKIP = {"pretrain.json"}
MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


class BundleError(RuntimeError):
    """A registered version cannot be rebuilt from what the registry holds."""


def log_serving_bundle(client: MlflowClient, run_id: str, base_dir: Path = paths.BASE_DIR) -> None:
    """Add the base model a registry-only consumer needs to the version's run, under `base/`."""
    from tasks.core.modeling import BASE_INFO_FILE, BaseInfo

    info = BaseInfo.load(base_dir)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        if info.kind == "tiny":
            for file in sorted(base_dir.iterdir()):
                if file.is_file() and file.name not in TINY_BASE_SKIP | {BASE_INFO_FILE}:
                    shutil.copy2(file, out / file.name)
            info = replace(info, name_or_path=".")  # the files sit next to base.json
        elif Path(info.name_or_path).is_absolute():
            log.warning("the base is a local folder (%s): consumers need it at that path", info.name_or_path)
        (out / BASE_INFO_FILE).write_text(json.dumps(asdict(info), indent=2, sort_keys=True) + "\n")
        client.log_artifacts(run_id, tmp, BASE_ARTIFACT)


@dataclass(frozen=True)
class VersionFiles:
    """A version's files on disk: what `load_version` builds the model from."""

    name: str
    version: str
    base: BaseInfo  # name_or_path points at the downloaded folder for the tiny base
    merged_chain: list[tuple[str, Path]]  # (stage, adapter folder), merged into the base in order
    adapter: Path  # the final stage's adapter, applied on top

    def describe(self) -> str:
        return " + ".join(["base", *(f"{s} (merged)" for s, _ in self.merged_chain), self.adapter.name])


def resolve_version(client: MlflowClient, model_uri: str) -> ModelVersion:
    """`models:/<name>@<alias>` or `models:/<name>/<version>` -> the registered version."""
    match = MODEL_URI.match(model_uri)
    if not match:
        raise BundleError(f"{model_uri!r} is not a model URI: expected models:/<name>@<alias> or models:/<name>/<version>")
    name = match["name"]
    try:
        if match["alias"]:
            return client.get_model_version_by_alias(name, match["alias"])
        return client.get_model_version(name, match["version"])
    except Exception as error:  # noqa: BLE001 - MLflow raises RestException / MlflowException by store
        raise BundleError(f"{model_uri}: no such registered version in {client.tracking_uri} ({error})") from None


def download_version(client: MlflowClient, version: ModelVersion, dst: Path) -> VersionFiles:
    """The version's adapter, the adapters merged before it and the base, downloaded to
    `dst/adapters/<stage>/` and `dst/base/`."""
    from tasks.core.chain import STAGE_INFO_FILE
    from tasks.core.modeling import BaseInfo

    dst = Path(dst)
    # The version's own storage, asked of this client's registry: a `models:/` URI would be resolved
    # against the process-wide registry URI instead, which need not be the client's store.
    source = client.get_model_version_download_uri(version.name, version.version)
    final = _download(client, dst / "adapters" / ".final", artifact_uri=source)
    if not (final / STAGE_INFO_FILE).exists():
        raise BundleError(f"{version.name} v{version.version}: its source {version.source} has no {STAGE_INFO_FILE}")
    stage_info = json.loads((final / STAGE_INFO_FILE).read_text())
    adapter = final.parent / stage_info["stage"]  # named after its stage, as in models/
    shutil.rmtree(adapter, ignore_errors=True)
    final.rename(adapter)
    try:
        base_dir = _download(client, dst / "base", run_id=version.run_id, artifact_path=BASE_ARTIFACT)
    except Exception as error:  # noqa: BLE001
        raise BundleError(
            f"{version.name} v{version.version}: its run {version.run_id} has no `{BASE_ARTIFACT}/` artifact, so the "
            f"base model is unknown (register logs it with tasks.core.bundle.log_serving_bundle; versions registered "
            f"before that cannot be served from the registry alone) ({error})"
        ) from None
    base = BaseInfo.load(base_dir)
    if base.kind == "tiny":
        base = replace(base, name_or_path=str(base_dir))
    chain = []
    for stage in stage_info.get("merged_chain", []):
        run_id = version.tags.get(f"{RUN_TAG_PREFIX}{stage}")
        if not run_id:
            raise BundleError(f"{version.name} v{version.version}: no `{RUN_TAG_PREFIX}{stage}` tag names the run holding "
                              f"the `{stage}` adapter that is merged into this version's base")
        chain.append((stage, _download(client, dst / "adapters" / stage, run_id=run_id, artifact_path=ADAPTER_ARTIFACT)))
    return VersionFiles(version.name, str(version.version), base, chain, adapter)


def _download(client: MlflowClient, target: Path, **where) -> Path:
    """One artifact folder's files, exactly in `target` (MLflow nests a run's folder under its name)."""
    from mlflow.artifacts import download_artifacts

    part = target.with_name(target.name + ".part")
    shutil.rmtree(part, ignore_errors=True)
    shutil.rmtree(target, ignore_errors=True)
    part.mkdir(parents=True)
    got = Path(download_artifacts(**where, dst_path=str(part), tracking_uri=client.tracking_uri))
    got.rename(target)
    shutil.rmtree(part, ignore_errors=True)
    return target


def load_version(files: VersionFiles):
    """(model, tokenizer) of a downloaded version in full precision: base, merged chain, final
    adapter on top. The same steps as `tasks/core/chain.py::load_stage_model`, which reads the
    adapters from the working tree's models/."""
    from tasks.core.chain import load_adapter
    from tasks.core.modeling import load_base_model, load_tokenizer

    model = load_base_model(files.base, "none")
    for _, folder in files.merged_chain:
        model = load_adapter(model, Path(folder)).merge_and_unload()
    model = load_adapter(model, Path(files.adapter), is_trainable=False)
    model.eval()
    return model, load_tokenizer(files.base)


def load_registered_model(client: MlflowClient, model_uri: str, dst: Path):
    """(model, tokenizer, files) of `models:/<name>@<alias>`, downloaded under `dst`."""
    files = download_version(client, resolve_version(client, model_uri), dst)
    model, tokenizer = load_version(files)
    return model, tokenizer, files
