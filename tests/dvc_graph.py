"""What dvc.yaml declares and what the code imports, read statically, for tests/test_dependencies.py.

Two readers, no DVC and no project imports (collection stays fast, and a module that fails to
import is still read):

- `load_stages`: the stages of a dvc.yaml as DVC names them (`train@thinking` for a foreach),
  with `${...}` resolved against `vars` and params.yaml the way DVC does; `raw_stages` keeps the
  templates unresolved, for checks that must not depend on params.yaml's layout.
- `CodeGraph`: every import statement of every module under tasks/ and flows/ (module level,
  inside functions, under `if TYPE_CHECKING:`), resolved to the project file it loads.
"""

from __future__ import annotations

import ast
import re
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CODE_ROOTS = ("tasks", "flows")

_INTERPOLATION = re.compile(r"\$\{\s*([^}]+?)\s*\}")
# `python -m tasks.ingest`, `python3 -u -m tasks.train ${key}`, `python tasks/serve.py`
_PYTHON_M = re.compile(r"\bpython[\w.]*\s+(?:-\S+\s+)*?-m\s+([\w.]+)")
_PYTHON_FILE = re.compile(r"\bpython[\w.]*\s+(?:-\S+\s+)*?([\w./]+\.py)\b")


# ----------------------------------------------------------------------------------- dvc.yaml


@dataclass(frozen=True)
class Stage:
    """One stage of dvc.yaml, after interpolation (or raw, from `raw_stages`)."""

    name: str                   # as DVC names it: `prepare`, `train@thinking`
    cmds: tuple[str, ...]
    deps: tuple[str, ...]       # paths, as written (normalised: no ./, no trailing /)
    outs: tuple[str, ...]       # outs, metrics and plots paths
    definition: str             # the top-level name in dvc.yaml (`train` for `train@thinking`)
    foreach: Any = None         # a foreach stage's expression, as written (`${stages}`)


def _paths(entries: list[Any] | None) -> tuple[str, ...]:
    """Paths of a deps/outs/metrics/plots list, whose entries are strings or `{path: {options}}`."""
    out = []
    for entry in entries or []:
        for path in (entry,) if isinstance(entry, str) else entry:
            out.append(normalise(str(path)))
    return tuple(out)


def normalise(path: str) -> str:
    path = path.strip()
    while path.startswith("./"):
        path = path[2:]
    return path.rstrip("/")


def _stage(name: str, definition: str, body: dict[str, Any], foreach: Any = None) -> Stage:
    cmd = body.get("cmd", [])
    return Stage(
        name=name,
        cmds=tuple([cmd] if isinstance(cmd, str) else cmd),
        deps=_paths(body.get("deps")),
        outs=_paths(body.get("outs")) + _paths(body.get("metrics")) + _paths(body.get("plots")),
        definition=definition,
        foreach=foreach,
    )


def raw_stages(dvc_yaml: Path) -> list[Stage]:
    """One Stage per top-level entry of dvc.yaml, `${...}` left as written (a foreach: its `do`)."""
    spec = yaml.safe_load(dvc_yaml.read_text()) or {}
    stages = spec.get("stages", {})
    return [_stage(name, name, body.get("do", body), body.get("foreach")) for name, body in stages.items()]


class InterpolationError(ValueError):
    pass


def lookup(tree: Any, dotted: str) -> Any:
    """tree["a"]["b"] for "a.b"; KeyError naming the first missing part."""
    node = tree
    for i, part in enumerate(dotted.split(".")):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise KeyError(".".join(dotted.split(".")[: i + 1]))
    return node


def interpolate(value: Any, context: dict[str, Any], where: str) -> Any:
    """DVC's `${a.b}`: a string that is only `${...}` becomes the value itself, else it is spliced in."""
    if isinstance(value, dict):
        return {interpolate(k, context, where): interpolate(v, context, where) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, context, where) for v in value]
    if not isinstance(value, str) or "${" not in value:
        return value

    def resolve(expr: str) -> Any:
        try:
            return lookup(context, expr)
        except KeyError as missing:
            raise InterpolationError(
                f"dvc.yaml {where}: ${{{expr}}} cannot be resolved: no key {missing.args[0]!r} in params.yaml, "
                f"the stage's vars or its foreach item"
            ) from None

    whole = _INTERPOLATION.fullmatch(value.strip())
    if whole:
        return resolve(whole.group(1))
    return _INTERPOLATION.sub(lambda m: str(resolve(m.group(1))), value)


def _vars(spec: dict[str, Any], root: Path) -> dict[str, Any]:
    """DVC's default context: params.yaml, then each `vars` entry (a mapping, or a YAML file)."""
    context: dict[str, Any] = {}
    default = root / "params.yaml"
    if default.exists():
        context.update(yaml.safe_load(default.read_text()) or {})
    for entry in spec.get("vars", []) or []:
        if isinstance(entry, dict):
            context.update(entry)
        else:
            path, _, keys = str(entry).partition(":")
            loaded = yaml.safe_load((root / path).read_text()) or {}
            context.update({k: loaded[k] for k in keys.split(",")} if keys else loaded)
    return context


def load_stages(dvc_yaml: Path) -> list[Stage]:
    """The stages DVC would build from dvc.yaml and the params.yaml next to it, foreach expanded."""
    spec = yaml.safe_load(dvc_yaml.read_text()) or {}
    context = _vars(spec, dvc_yaml.parent)
    stages = []
    for name, body in spec.get("stages", {}).items():
        if "foreach" not in body:
            stages.append(_stage(name, name, interpolate(body, context, f"stage {name!r}")))
            continue
        items = interpolate(body["foreach"], context, f"stage {name!r} foreach")
        if isinstance(items, dict):
            pairs = list(items.items())
        elif isinstance(items, list):
            pairs = [(str(item), item) for item in items]
        else:
            raise InterpolationError(f"dvc.yaml stage {name!r}: foreach {body['foreach']!r} is {items!r}, not a mapping or list")
        for key, item in pairs:
            local = {**context, "key": key, "item": item}
            stages.append(_stage(f"{name}@{key}", name, interpolate(body["do"], local, f"stage {name}@{key}"), body["foreach"]))
    return stages


def python_modules(cmd: str) -> list[str]:
    """Modules a stage command runs: `python -m tasks.x` -> tasks.x, `python tasks/x.py` -> tasks.x."""
    found = _PYTHON_M.findall(cmd)
    found += [p.removesuffix(".py").replace("/", ".") for p in _PYTHON_FILE.findall(cmd)]
    return found


def covered(path: str, deps: tuple[str, ...]) -> bool:
    """A dep names the file itself or a folder above it."""
    return any(path == dep or path.startswith(dep + "/") for dep in deps)


# ----------------------------------------------------------------------------------- imports


@dataclass(frozen=True)
class Import:
    """One imported module of one import statement."""

    source: str   # project file that imports, e.g. tasks/ingest.py
    module: str   # absolute module name: a project module, or e.g. `prefect.cache_policies`
    line: int
    kind: str     # "module": runs at import; "function": when the function runs; "type": TYPE_CHECKING only

    def where(self) -> str:
        """tasks/a.py:12, tasks/a.py:40 (function-level), tasks/a.py:8 (TYPE_CHECKING)"""
        label = {"module": "", "function": " (function-level)", "type": " (TYPE_CHECKING)"}[self.kind]
        return f"{self.source}:{self.line}{label}"


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _is_trivial(tree: ast.Module) -> bool:
    """A module that does nothing when imported: a docstring and `from __future__` at most."""
    for node in tree.body:
        docstring = isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
        future = isinstance(node, ast.ImportFrom) and node.module == "__future__"
        if not (docstring or future):
            return False
    return True


def _has_main_block(tree: ast.Module) -> bool:
    for node in tree.body:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Compare):
            names = [node.test.left, *node.test.comparators]
            if any(isinstance(n, ast.Name) and n.id == "__name__" for n in names) and any(
                isinstance(n, ast.Constant) and n.value == "__main__" for n in names
            ):
                return True
    return False


@dataclass
class CodeGraph:
    """The import statements of the project's code (tasks/ and flows/ under `root`)."""

    root: Path
    files: dict[str, str] = field(default_factory=dict)          # module name -> file
    modules: dict[str, str] = field(default_factory=dict)        # file -> module name
    imports: dict[str, list[Import]] = field(default_factory=dict)  # file -> its imports
    trivial: set[str] = field(default_factory=set)               # files that do nothing when imported
    main_blocks: set[str] = field(default_factory=set)           # files with `if __name__ == "__main__"`

    @classmethod
    def read(cls, root: Path, code_roots: tuple[str, ...] = CODE_ROOTS) -> CodeGraph:
        graph = cls(root)
        for top in code_roots:
            for path in sorted((root / top).rglob("*.py")):
                if "__pycache__" in path.parts:
                    continue
                rel = path.relative_to(root).as_posix()
                name = rel.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
                graph.files[name] = rel
                graph.modules[rel] = name
        trees = {}
        for rel in graph.modules:
            tree = ast.parse((root / rel).read_text(), filename=rel)
            trees[rel] = tree
            if _is_trivial(tree):
                graph.trivial.add(rel)
            if _has_main_block(tree):
                graph.main_blocks.add(rel)
        for rel, tree in trees.items():
            graph.imports[rel] = graph._imports_of(rel, tree)
        return graph

    def _project_module(self, name: str) -> str | None:
        """The longest prefix of `name` that is a project module (`tasks.x.Name` -> tasks.x)."""
        parts = name.split(".")
        for n in range(len(parts), 0, -1):
            candidate = ".".join(parts[:n])
            if candidate in self.files:
                return candidate
        return None

    def _imports_of(self, rel: str, tree: ast.Module) -> list[Import]:
        graph = self
        module = self.modules[rel]
        package = module if rel.endswith("/__init__.py") else module.rpartition(".")[0]
        found: list[Import] = []

        def add(name: str, node: ast.stmt, kind: str) -> None:
            found.append(Import(rel, graph._project_module(name) or name, node.lineno, kind))

        class Visitor(ast.NodeVisitor):
            def __init__(self) -> None:
                self.kind = "module"

            def _nested(self, node: ast.AST, kind: str) -> None:
                outer, self.kind = self.kind, kind if self.kind != "type" else "type"
                self.generic_visit(node)
                self.kind = outer

            def visit_FunctionDef(self, node: ast.AST) -> None:
                self._nested(node, "function")

            visit_AsyncFunctionDef = visit_FunctionDef
            visit_Lambda = visit_FunctionDef

            def visit_If(self, node: ast.If) -> None:
                if not _is_type_checking(node.test):
                    return self.generic_visit(node)
                self.visit(node.test)
                outer, self.kind = self.kind, "type"
                for child in node.body:
                    self.visit(child)
                self.kind = outer
                for child in node.orelse:
                    self.visit(child)

            def visit_Import(self, node: ast.Import) -> None:
                for alias in node.names:
                    add(alias.name, node, self.kind)

            def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - (node.level - 1)])
                    base = f"{base}.{node.module}" if node.module else base
                else:
                    base = node.module or ""
                if base == "__future__":
                    return
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    # `from pkg import sub` loads the submodule; `from mod import name` loads mod
                    add(sub if sub in graph.files else base, node, self.kind)

        Visitor().visit(tree)
        return found

    # ------------------------------------------------------------------ queries

    def file_of(self, module: str) -> str | None:
        return self.files.get(module)

    def edges(self, rel: str, *, runtime_only: bool = False) -> list[tuple[str, Import]]:
        """(imported project file, the import) for each project import of `rel`."""
        out = []
        for imp in self.imports.get(rel, []):
            target = self.files.get(imp.module)
            if target and target != rel and not (runtime_only and imp.kind == "type"):
                out.append((target, imp))
        return out

    def ancestors(self, rel: str) -> list[str]:
        """The `__init__.py` of each package above `rel` (Python runs them before `rel`)."""
        parts = self.modules[rel].split(".")
        out = []
        for n in range(1, len(parts)):
            init = self.files.get(".".join(parts[:n]))
            if init and init != rel:
                out.append(init)
        return out

    def runtime_closure(self, start: str) -> dict[str, list[str]]:
        """Every project file that can run when `start` runs (imports at any level, not TYPE_CHECKING).

        Maps each file to how it is reached: the import chain from `start`, as "file:line" steps.
        A package's `__init__.py` is included when it is imported by name, or when it is above an
        imported module and does something (a docstring-only `__init__` cannot change a result).
        """
        reached: dict[str, list[str]] = {start: []}
        queue = deque([start])

        def reach(target: str, chain: list[str]) -> None:
            if target not in reached:
                reached[target] = chain
                queue.append(target)

        for init in self.ancestors(start):
            if init not in self.trivial:
                reach(init, [f"package of {start}"])
        while queue:
            rel = queue.popleft()
            for target, imp in self.edges(rel, runtime_only=True):
                chain = [*reached[rel], imp.where()]
                reach(target, chain)
                for init in self.ancestors(target):
                    if init not in self.trivial:
                        reach(init, [*chain, f"package of {target}"])
        return reached
