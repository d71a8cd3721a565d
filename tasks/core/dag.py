"""The order DVC runs the stages of `dvc.yaml` in, shared by the Prefect flow (flows/dvc_stages.py)
and the plan (tasks/plan.py), so both walk the DAG the same way."""

from __future__ import annotations

from typing import Any


def ordered_stages(repo: Any) -> list[Any]:
    """The stages (with a command) of an open `dvc.repo.Repo`, each after its dependencies; ties
    broken by name, so the order is the same on every machine."""
    import networkx as nx

    graph = repo.index.graph  # an edge points from a stage to a stage it depends on
    ordered = reversed(list(nx.lexicographical_topological_sort(graph, key=lambda s: s.addressing)))
    return [stage for stage in ordered if getattr(stage, "cmd", None)]
