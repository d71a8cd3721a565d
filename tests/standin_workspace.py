"""A throwaway workspace whose base is the Qwen3-shaped stand-in and whose stages read real data.

The stand-in (`python -m tasks.tools.standin`: Qwen3's real tokenizer and chat template, 152k
vocabulary, 128 fused experts, random weights) is written next to the workspace, not inside it:
`model.name_or_path` names a local folder the way it names a hub id, and `base` only resolves it.
Neither git nor DVC sees the folder: `base` depends on the `model` params (the path string), not on
the folder's files, so the path must stay put and its files unchanged for a run to be reproducible
(what the lineage records is the path; a new folder at a new path re-runs `base` and everything after).

Each stage's sources are small slices of the real sets in ../shared/data, copied into the
workspace's `data/sources/` (the folder DVC hashes for `ingest`) and committed, so the pipeline
reads only its own files.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from tests.pipeline_workspace import PROJECT, Workspace, make_workspace, small_params
from tests.shared_data import SHARED_DATA

# Source files, as the workspace holds them: (copied from ../shared/data, first N lines or None for all).
SOURCE_FILES: dict[str, tuple[str, int | None]] = {
    "data/sources/tinyshakespeare.txt": ("tinyshakespeare/input.txt", 600),  # ~20 kB
    "data/sources/snips/validate_GetWeather.json": ("snips_nlu/validate_GetWeather.json", None),  # 100 utterances
    "data/sources/gsm8k.jsonl": ("gsm8k/train.jsonl", 60),
    # 40 trees: 2- and 4-message chats; a few of the 4-message ones fit MAX_LENGTH whole
    "data/sources/oasst.jsonl": ("oasst_en100/en_100_tree.jsonl", 40),
}
STAGE_SOURCES: dict[str, list[dict[str, Any]]] = {
    # paragraphs grouped up to 500 characters: ~40 documents, so the eval split is not empty
    "embedding": [{"path": "data/sources/tinyshakespeare.txt", "options": {"max_chars": 500}}],
    "syntax": [{"path": "data/sources/snips/validate_*.json", "preset": "snips"}],
    "thinking": [{"path": "data/sources/gsm8k.jsonl", "preset": "gsm8k"}],
    "instructions": [{"path": "data/sources/oasst.jsonl", "preset": "oasst"}],
}
# Tokens per row. Every token costs a pass through the 152k-row LM head (most of a step on a CPU),
# so rows stay short; longer conversations go to the rejects as too_long.
MAX_LENGTH = 256


def build_standin(out_dir: Path) -> Path:
    """The stand-in model folder, written by the project's own tool."""
    subprocess.run([sys.executable, "-m", "tasks.tools.standin", str(out_dir)], cwd=PROJECT, check=True,
                   capture_output=True, text=True)
    return out_dir


def copy_sources(root: Path, shared: Path = SHARED_DATA) -> None:
    for rel, (source, lines) in SOURCE_FILES.items():
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if lines is None:
            shutil.copyfile(shared / source, target)
        else:
            with (shared / source).open("rb") as src:
                target.write_bytes(b"".join(line for _, line in zip(range(lines), src)))


def standin_params(raw: dict[str, Any], standin: Path) -> dict[str, Any]:
    """The project's params on the stand-in: real sources, a few steps per stage, the whole chain
    in NF4 (train.quantization is one key for every stage), a promotion gate that passes."""
    p = small_params(raw)
    p["model"]["name_or_path"] = str(standin)
    for name, stage in p["stages"].items():
        stage["data"]["sources"] = STAGE_SOURCES[name]
        stage["train"].update(max_steps=3, batch_size=2, learning_rate=1.0e-3)
    p["prepare"]["max_length"] = MAX_LENGTH
    p["prepare"]["packing"]["enabled"] = False  # train.packing is off: nothing reads the packed rows
    p["validate"]["max_tokens"] = MAX_LENGTH
    p["train"]["quantization"] = "nf4"
    p["evaluate"].update(batch_size=4, max_generate=2, max_new_tokens=8, samples=2)
    p["export"]["n_prompts"] = 2
    p["register"].update(thresholds={"syntax_json_valid": 0.0, "thinking_exact_match": 0.0}, champion_tolerance=1.0)
    return p


def make_standin_workspace(tmp: Path) -> Workspace:
    """A committed workspace at `tmp/ws` on a stand-in at `tmp/standin`, not yet run."""
    standin = build_standin(tmp / "standin")
    params = standin_params(yaml.safe_load((PROJECT / "params.yaml").read_text()), standin)
    ws = make_workspace(tmp / "ws", params)
    copy_sources(ws.root)
    ws.commit("real sources")
    return ws
