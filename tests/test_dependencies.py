"""DVC sees every dependency: the code a stage runs, and the params keys it reads.

- Code: each stage's deps in dvc.yaml cover every project file its module imports, transitively
  (`test_code_deps_cover_imports`), and stage modules stand on one level: no stage module imports
  another, shared modules import none, the import graph has no cycle and tasks/ never imports
  Prefect (`TestStageModulesStandOnOneLevel`). Read statically with `ast` (tests/dvc_graph.py).
- Params: changing one key of params.yaml makes `dvc status` report exactly the stages that read
  it (`test_params_deps_rerun_exactly`), in a throwaway git + DVC workspace where `dvc commit`
  recorded placeholder deps and outs, so nothing is run.

    pytest tests/test_dependencies.py
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
from ruamel.yaml import YAML

from tests.dvc_graph import (
    CODE_ROOTS,
    CodeGraph,
    Import,
    InterpolationError,
    Stage,
    covered,
    load_stages,
    lookup,
    python_modules,
    raw_stages,
)

PROJECT = Path(__file__).resolve().parents[1]

# ================================================================================================
# The "re-run exactly" table: params key (dotted, in params.yaml) -> (a new value, the stages that
# `dvc status` must report after that change, no more and no fewer). Foreach stages are named as
# DVC names them (`train@thinking`). `register` lists the whole params.yaml, so it is in every set.
# Edit entries here when a stage starts or stops reading a key.
# ================================================================================================
TRAIN_STAGES = {"train@embedding", "train@syntax", "train@thinking", "train@instructions"}

PARAM_CHANGES: dict[str, tuple[Any, set[str]]] = {
    "stages.syntax.checks.json_target": (False, {"validate", "evaluate", "register"}),
    "stages.syntax.validate.min_trainable_share": (0.01, {"validate", "register"}),
    "stages.thinking.train.learning_rate": (0.001, {"train@thinking", "register"}),
    "stages.thinking.train.warmup_ratio": (0.2, {"train@thinking", "register"}),
    "stages.syntax.data.replay_share": (0.1, {"prepare", "register"}),
    "stages.syntax.data.n_records": (50, {"ingest", "prepare", "register"}),
    "data.max_reject_share": (0.4, {"ingest", "register"}),
    "train.quantization": ("nf4", TRAIN_STAGES | {"evaluate", "register"}),
    "train.upcast_frozen": (True, TRAIN_STAGES | {"register"}),  # bf16 vs fp32 frozen weights under nf4 on a GPU
    "train.offload_expert_adapters": ("off", TRAIN_STAGES | {"register"}),  # optimizer differs on a GPU
    "train.adapter_dtype": ("bf16", TRAIN_STAGES | {"register"}),  # updates rounded to bf16
    "train.lora.r": (4, TRAIN_STAGES | {"register"}),
    "train.gradient_checkpointing": (True, {"register"}),  # same results by design: nothing re-trains
    "train.loss_chunk_tokens": (None, {"register"}),  # same results by design (tests/test_lm_loss.py)
    "train.expert_compute": ("fold", {"register"}),  # same results by design (tests/test_routed_lora.py)
    "prepare.clean.scrub_pii": (True, {"base", "prepare", "register"}),
    "prepare.eval_fraction": (0.2, {"base", "prepare", "register"}),
    "prepare.control_tokens": ("strip", {"prepare", "register"}),
    "prepare.max_length": (128, TRAIN_STAGES | {"prepare", "register"}),
    "validate.min_records": (4, {"validate", "register"}),
    "evaluate.max_new_tokens": (10, {"evaluate", "register"}),
    "export.max_kl": (0.5, {"export", "register"}),
    "register.champion_tolerance": (0.5, {"register"}),
    "model.tiny.hidden_size": (64, {"base", "register"}),
    "seed": (7, TRAIN_STAGES | {"ingest", "base", "prepare", "evaluate", "register"}),
}


@pytest.fixture(scope="module")
def code() -> CodeGraph:
    return CodeGraph.read(PROJECT)


def stage_module_files(code: CodeGraph) -> set[str]:
    """tasks/<name>.py that a dvc.yaml stage runs, and every other tasks/<name>.py with a `__main__`."""
    run_by_dvc = {code.file_of(m) for s in raw_stages(PROJECT / "dvc.yaml") for c in s.cmds for m in python_modules(c)}
    top_level = {rel for rel in code.modules if rel.startswith("tasks/") and rel.count("/") == 1 and rel != "tasks/__init__.py"}
    return (run_by_dvc & top_level) | (code.main_blocks & top_level)


def is_shared(rel: str) -> bool:
    """A module of a package under tasks/ (tasks/core, tasks/data, tasks/evaluation): stages stand on it."""
    return rel.startswith("tasks/") and rel.count("/") >= 2


def target(code: CodeGraph, imp: Import) -> str:
    return code.file_of(imp.module) or imp.module


def render(code: CodeGraph, chain: list[Import]) -> str:
    return " -> ".join(imp.where() for imp in chain) + f" -> {target(code, chain[-1])}"


# ------------------------------------------------------------------------------------ code deps


@pytest.mark.parametrize("stage", [s.name for s in raw_stages(PROJECT / "dvc.yaml")])
def test_code_deps_cover_imports(stage, code):
    """Every project file the stage's module can run (imports at any level) is under one of its deps.

    A foreach stage is checked once, on its `do` template; deps with `${...}` are data, not code,
    and are left out.
    """
    spec: Stage = next(s for s in raw_stages(PROJECT / "dvc.yaml") if s.name == stage)
    modules = [m for c in spec.cmds for m in python_modules(c)]
    assert modules, f"stage {stage!r}: cmd {spec.cmds} runs no `python -m <module>`; this test cannot see its code"
    deps = tuple(d for d in spec.deps if "${" not in d)

    problems = []
    for module in modules:
        start = code.file_of(module)
        if start is None:
            problems.append(f"  cmd runs {module}, but there is no {module.replace('.', '/')}.py (or package)")
            continue
        for rel, chain in code.runtime_closure(start).items():
            if not covered(rel, deps):
                problems.append(f"  {rel}" + (f"    via {' -> '.join(chain)}" if chain else "    (the module the cmd runs)"))
    stale = [d for d in deps if d.split("/")[0] in CODE_ROOTS and not (PROJECT / d).exists()]
    message = []
    if problems:
        where = f"stages.{stage}.do.deps" if spec.foreach is not None else f"stages.{stage}.deps"
        message.append(
            f"stage {stage!r} ({'; '.join(spec.cmds)}) runs {len(problems)} project file(s) that dvc.yaml does not "
            f"list in its deps (add each, or a folder above it, to {where}):\n" + "\n".join(sorted(problems))
        )
    if stale:
        message.append(f"stage {stage!r} lists code deps that do not exist (renamed or removed?): {', '.join(stale)}")
    if message:
        pytest.fail("\n".join(message), pytrace=False)


# ------------------------------------------------------------------------------------ layering


class TestStageModulesStandOnOneLevel:
    """Stage modules (tasks/<name>.py) sit on shared modules (tasks/core, tasks/data, tasks/evaluation), never on each other."""

    def test_no_stage_module_imports_another(self, code):
        """Directly, or through any chain of non-stage modules (all import levels, TYPE_CHECKING too)."""
        stage_files = stage_module_files(code)
        offences = []
        for start in sorted(stage_files):
            chains: dict[str, list[Import]] = {start: []}
            queue = deque([start])
            while queue:
                rel = queue.popleft()
                for dst, imp in code.edges(rel):
                    if dst in chains:
                        continue
                    chains[dst] = [*chains[rel], imp]
                    if dst in stage_files:
                        offences.append(f"  {start} imports stage module {dst}: {render(code, chains[dst])}")
                    else:
                        queue.append(dst)
        fail_if_any(
            offences,
            f"{len(offences)} stage module(s) import another stage module; move what they share into "
            f"tasks/core, tasks/data or tasks/evaluation:",
        )

    def test_shared_modules_import_no_stage_module(self, code):
        stage_files = stage_module_files(code)
        offences = [
            f"  {imp.where()} -> {dst}"
            for rel in sorted(code.modules) if is_shared(rel)
            for dst, imp in code.edges(rel) if dst in stage_files
        ]
        fail_if_any(
            offences,
            f"{len(offences)} import(s) of a stage module from a shared module (at any level, TYPE_CHECKING too); "
            f"a stage module ({', '.join(sorted(stage_files))}) is run, never imported by what it stands on:",
        )

    def test_project_import_graph_has_no_cycle(self, code):
        """tasks/ and flows/, imports at every level (TYPE_CHECKING too)."""
        cycles = [f"  {render(code, cycle)}" for cycle in import_cycles(code)]
        fail_if_any(cycles, f"{len(cycles)} import cycle(s) in tasks/ and flows/ (the shortest cycle of each tangle):")

    def test_tasks_import_no_prefect(self, code):
        """Stage modules run without Prefect: nothing under tasks/ imports it, directly or through flows/."""

        def prefect(imp: Import) -> bool:
            return imp.module == "prefect" or imp.module.startswith("prefect.")

        offences = [
            f"  {imp.where()}: import {imp.module}"
            for rel in sorted(code.modules) if rel.startswith("tasks/")
            for imp in code.imports[rel] if prefect(imp)
        ]
        for rel in sorted(code.modules):
            if not rel.startswith("tasks/"):
                continue
            for dst, first in code.edges(rel):
                if not dst.startswith("flows/"):
                    continue
                chains: dict[str, list[Import]] = {dst: [first]}
                queue = deque([dst])
                while queue:
                    here = queue.popleft()
                    hit = next((imp for imp in code.imports[here] if prefect(imp)), None)
                    if hit:
                        offences.append(f"  {' -> '.join(i.where() for i in [*chains[here], hit])}: import {hit.module}")
                        break
                    for nxt, imp in code.edges(here):
                        if nxt not in chains:
                            chains[nxt] = [*chains[here], imp]
                            queue.append(nxt)
        fail_if_any(
            offences,
            f"{len(offences)} Prefect import(s) under tasks/ (any level, or through flows/); "
            f"keep the @task/@flow wrappers in flows/:",
        )


def fail_if_any(offences: list[str], headline: str) -> None:
    if offences:
        pytest.fail(headline + "\n" + "\n".join(offences), pytrace=False)


def import_cycles(code: CodeGraph) -> list[list[Import]]:
    """One shortest cycle per strongly connected tangle of the import graph (Tarjan, iterative)."""
    graph = {rel: code.edges(rel) for rel in code.modules}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[set[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, 0)]
        while work:
            node, i = work.pop()
            if i == 0:
                index[node] = low[node] = counter
                counter += 1
                stack.append(node)
                on_stack.add(node)
            edges = graph[node]
            if i < len(edges):
                work.append((node, i + 1))
                nxt = edges[i][0]
                if nxt not in index:
                    work.append((nxt, 0))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            for dst, _ in edges:  # done with node: fold in its children's low links
                if dst in on_stack:
                    low[node] = min(low[node], low[dst])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(component)
    cycles = []
    for component in components:
        start = min(component)
        chains: dict[str, list[Import]] = {start: []}
        queue = deque([start])
        found = None
        while queue and found is None:
            rel = queue.popleft()
            for dst, imp in graph[rel]:
                if dst == start:
                    found = [*chains[rel], imp]
                    break
                if dst in component and dst not in chains:
                    chains[dst] = [*chains[rel], imp]
                    queue.append(dst)
        cycles.append(found)
    return sorted(cycles, key=lambda c: c[0].source)


# ------------------------------------------------------------------------------------ params deps


def dvc_env(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    # DVC's per-machine state stays in the workspace (see also `core.site_cache_dir` below).
    env.update(DVC_SITE_CACHE_DIR=str(root / ".dvc-site"), DVC_NO_ANALYTICS="1")
    return env


class CommandFailed(Exception):
    pass


def run(root: Path, *args: str) -> str:
    """The command's stdout; CommandFailed with its output when it exits non-zero."""
    done = subprocess.run(list(args), cwd=root, env=dvc_env(root), capture_output=True, text=True, timeout=120, check=False)
    if done.returncode != 0:
        shown = " ".join(args[2:] if args[0] == sys.executable else args)
        raise CommandFailed(f"`{shown}` in {root} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done.stdout


def dvc(root: Path, *args: str) -> str:
    return run(root, sys.executable, "-m", "dvc", *args)


def dvc_status(root: Path) -> dict[str, Any]:
    return json.loads(dvc(root, "status", "--json") or "{}")


def stale_or_error(root: Path) -> set[str] | str:
    try:
        return stale_stages(dvc_status(root))
    except CommandFailed as err:
        return str(err)


def stale_stages(status: dict[str, Any]) -> set[str]:
    return {name.rpartition(":")[2] for name in status}  # `dvc.yaml:train@x` when not in the root dvc.yaml


def placeholder_layout(stages: list[Stage]) -> tuple[set[str], set[str]]:
    """(files, folders) for every dep and out path dvc.yaml names.

    A path is a folder when another named path lies under it (data/raw holds data/raw/embedding.jsonl),
    else a file when it has a suffix (metrics/data.json), else a folder (models/base, data/sources).
    """
    named = {p for s in stages for p in (*s.deps, *s.outs)}
    folders = {p for p in named if any(q.startswith(p + "/") for q in named) or not PurePosixPath(p).suffix}
    return named - folders, folders


def make_dvc_workspace(root: Path, source: Path = PROJECT) -> None:
    """git + DVC repo with `source`'s dvc.yaml, params.yaml and tasks/, every other dep and out a
    placeholder, and dvc.lock recording them all by `dvc commit` (no stage runs)."""
    root.mkdir(parents=True, exist_ok=True)
    run(root, "git", "init", "-q")
    for name in ("dvc.yaml", "params.yaml", ".dvcignore"):
        if (source / name).exists():
            shutil.copy2(source / name, root / name)
    shutil.copytree(source / "tasks", root / "tasks", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    try:
        stages = load_stages(root / "dvc.yaml")
    except InterpolationError as err:
        pytest.fail(f"{err}\n(dvc.yaml and params.yaml disagree; DVC cannot build the pipeline either)", pytrace=False)
    files, folders = placeholder_layout(stages)
    for rel in sorted(files):
        path = root / rel
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"placeholder for {rel}\n")
    for rel in sorted(folders, key=lambda p: -p.count("/")):
        path = root / rel
        path.mkdir(parents=True, exist_ok=True)
        if not any(p.is_file() for p in path.rglob("*")):
            (path / "placeholder.txt").write_text(f"placeholder in {rel}\n")
    dvc(root, "init", "-q")
    dvc(root, "config", "--local", "core.site_cache_dir", str(root / ".dvc-site"))
    dvc(root, "commit", "-f", "-q")


@pytest.fixture(scope="module")
def dvc_workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dvc-deps")
    try:
        make_dvc_workspace(root)
    except CommandFailed as err:
        pytest.fail(f"cannot build the DVC workspace: {err}", pytrace=False)
    return root


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> Any:
    """Set tree[a][b][c] for "a.b.c"; returns the old value. Fails the test if the key is not there."""
    parent_key, _, leaf = key.rpartition(".")
    fix = f"update PARAM_CHANGES in tests/{Path(__file__).name}, or params.yaml"
    try:
        parent = lookup(tree, parent_key) if parent_key else tree
    except KeyError as missing:
        pytest.fail(f"params.yaml has no key {key} (no {missing.args[0]}); {fix}", pytrace=False)
    if not isinstance(parent, dict) or leaf not in parent:
        pytest.fail(f"params.yaml has no key {key}; {fix}", pytrace=False)
    old, parent[leaf] = parent[leaf], value
    return old


def changed_params(text: str, key: str, value: Any) -> tuple[Any, str]:
    """(old value, params.yaml text with `key` set to `value` and every other byte as it was)."""
    rt = YAML()  # DVC's own YAML library; its round trip rewrites only the one value
    rt.width = 4096
    rt.representer.add_representer(type(None), lambda rep, _: rep.represent_scalar("tag:yaml.org,2002:null", "null"))
    params = rt.load(text)
    old = set_dotted(params, key, value)
    out = io.StringIO()
    rt.dump(params, out)
    return old, out.getvalue()


@pytest.fixture(scope="module")
def rerun_stages(dvc_workspace, tmp_path_factory) -> dict[str, set[str] | str]:
    """Key -> the stages `dvc status` reports after changing it, for every key of PARAM_CHANGES that
    params.yaml has (or DVC's error): each in its own copy of the workspace, the copies checked
    side by side (each `dvc status` is about two seconds of CPU, mostly parsing YAML)."""
    text = (dvc_workspace / "params.yaml").read_text()
    cases = {"": dvc_workspace}  # unchanged: every stage up to date
    for n, (key, (value, _)) in enumerate(PARAM_CHANGES.items()):
        try:
            old, changed = changed_params(text, key, value)
        except pytest.fail.Exception:
            continue  # the key's own test says which key is missing
        if old == value:
            continue
        case = tmp_path_factory.mktemp(f"dvc-deps-case{n}")
        shutil.copytree(dvc_workspace, case, symlinks=True, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".dvc-site"))
        (case / "params.yaml").write_text(changed)
        cases[key] = case
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        reported = dict(zip(cases, pool.map(stale_or_error, cases.values()), strict=True))
    baseline = reported.pop("")
    if baseline:
        pytest.fail(f"right after `dvc commit -f` every stage should be up to date; `dvc status` reports {baseline}", pytrace=False)
    return reported


@pytest.mark.parametrize("key", list(PARAM_CHANGES))
def test_params_deps_rerun_exactly(key, request):
    value, expected = PARAM_CHANGES[key]
    old, _ = changed_params((PROJECT / "params.yaml").read_text(), key, value)  # a missing key fails before any DVC
    if old == value:
        pytest.fail(f"params.yaml already has {key}: {old!r}; give it a value in PARAM_CHANGES that changes it", pytrace=False)
    reported = request.getfixturevalue("rerun_stages").get(key, "params.yaml changed while the tests ran; run them again")
    if isinstance(reported, str):
        pytest.fail(f"changing {key} from {old!r} to {value!r}: {reported}", pytrace=False)
    if reported != expected:
        pytest.fail(
            f"changing {key} from {old!r} to {value!r}: `dvc status` reports {sorted(reported)}, expected {sorted(expected)}\n"
            f"  re-run but should not (drop the key from their params in dvc.yaml, or fix PARAM_CHANGES): "
            f"{sorted(reported - expected) or '-'}\n"
            f"  do not re-run but should (list the key under their params in dvc.yaml): {sorted(expected - reported) or '-'}",
            pytrace=False,
        )


def test_editing_a_benchmark_file_reruns_prepare(dvc_workspace, tmp_path):
    """Benchmark files live under data/benchmarks/, a dep of prepare: adding or editing one re-runs
    prepare (and what follows it), so no contaminated training record stays."""
    case = tmp_path / "ws"
    shutil.copytree(dvc_workspace, case, symlinks=True, ignore=shutil.ignore_patterns(".dvc-site"))
    (case / "data" / "benchmarks" / "test_set.jsonl").write_text('{"question": "q", "answer": "a"}\n')
    assert stale_or_error(case) == {"prepare"}
