"""Model family trees for the dashboard, read from the registry: a model, its parents (several
for a merge), their parents, back to the inputs; as text lines and as Graphviz DOT.
"""

from __future__ import annotations

from pathlib import Path

from agent_forge.dashboard.data import evomerge_parents

def _open_registry(registry):
    """A Registry, or None when the file does not exist (never creates one)."""
    from agent_forge.registry import Registry, default_registry_path

    if isinstance(registry, Registry):
        return registry
    path = Path(registry) if registry else default_registry_path()
    return Registry(path) if path.exists() else None


def _node(model) -> dict:
    return {"id": model.id, "name": model.name, "phase": model.phase, "path": model.path,
            "metrics": dict(model.metrics or {}), "handoff_status": model.handoff_status, "parents": []}


def lineage(registry, model_id: int, max_depth: int = 32) -> dict | None:
    """The family tree of a model from the registry: {id, name, phase, path, metrics,
    handoff_status, parents: [trees of its parents, in order]}; a parent id with no row
    reads as {"id", "name": "(missing)", "parents": []}. None when the registry file or the
    model does not exist. A cycle (a corrupt registry) or max_depth stops the walk."""
    reg = _open_registry(registry)
    if reg is None:
        return None

    def walk(mid: int, seen: frozenset, depth: int) -> dict:
        try:
            node = _node(reg.get_model(mid))
        except KeyError:
            return {"id": mid, "name": "(missing)", "phase": None, "path": None, "metrics": {},
                    "handoff_status": None, "parents": []}
        if mid in seen or depth >= max_depth:
            node["truncated"] = True
            return node
        node["parents"] = [walk(p, seen | {mid}, depth + 1) for p in reg.parents(mid)]
        return node

    try:
        reg.get_model(model_id)
    except KeyError:
        return None
    return walk(model_id, frozenset(), 0)


def planned_lineage(stages: dict) -> dict | None:
    """Before the register stage: the champion-to-be and its parents, by path."""
    parents = evomerge_parents(stages)
    if not parents:
        return None
    return {"id": None, "name": "champion (not registered yet)", "phase": 2, "path": None, "metrics": {},
            "handoff_status": None,
            "parents": [{"id": None, "name": p["families"] or Path(str(p["path"])).parent.name or str(p["path"]),
                         "phase": None, "path": p["path"], "handoff_status": None, "parents": [],
                         "metrics": {} if p["value"] is None else {"val_fitness": p["value"]}} for p in parents]}


def evomerge_family_tree(stages: dict, registry) -> dict | None:
    """The champion's family tree from the registry the run registered it in (else the
    dashboard's); before registration, the planned tree from the parents stage."""
    reg = stages.get("register") or {}
    if isinstance(reg.get("model_id"), int):
        for path in (reg.get("registry"), registry):
            if path and Path(path).exists():
                tree = lineage(path, reg["model_id"])
                if tree is not None:
                    return tree
    return planned_lineage(stages)


FITNESS_KEYS = ("fitness", "val_fitness")


def _fmt_metric(metrics: dict) -> str:
    for key in FITNESS_KEYS:
        v = metrics.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return f"{key.replace('_', ' ')} {100 * v:.1f}%"
    return ""


def _label(node: dict) -> str:
    bits = [f"#{node['id']}" if node.get("id") is not None else None,
            f"phase {node['phase']}" if node.get("phase") is not None else None, _fmt_metric(node.get("metrics") or {})]
    return " · ".join(b for b in bits if b)


def lineage_lines(tree: dict | None) -> list[str]:
    """The tree as an indented markdown list: the model first, each parent indented under it."""
    lines: list[str] = []

    def walk(node: dict, depth: int) -> None:
        extra = _label(node)
        lines.append("  " * depth + f"- **{node['name']}**" + (f" ({extra})" if extra else "")
                     + (" …" if node.get("truncated") else ""))
        for p in node.get("parents") or []:
            walk(p, depth + 1)

    if tree:
        walk(tree, 0)
    return lines


def _dot_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def lineage_dot(tree: dict | None) -> str:
    """The tree as Graphviz DOT (for st.graphviz_chart): parents -> child, each model once
    (a common ancestor of several parents is drawn once, with an edge to each)."""
    nodes: dict[str, str] = {}
    edges: list[tuple[str, str]] = []

    def key(node: dict, where: str) -> str:
        return f"m{node['id']}" if node.get("id") is not None else f"n{where}"

    def walk(node: dict, where: str) -> str:
        k = key(node, where)
        extra = _label(node)
        nodes.setdefault(k, _dot_escape(str(node["name"])) + (f"\\n{_dot_escape(extra)}" if extra else ""))
        for i, p in enumerate(node.get("parents") or []):
            pk = walk(p, f"{where}_{i}")
            if (pk, k) not in edges:
                edges.append((pk, k))
        return k

    if tree:
        walk(tree, "0")
    lines = ["digraph lineage {", "  rankdir=LR;", '  node [shape=box, style="rounded,filled", fillcolor="#eef3fb", '
             'fontname="Helvetica", fontsize=11];']
    lines += [f'  {k} [label="{v}"];' for k, v in nodes.items()]
    lines += [f"  {a} -> {b};" for a, b in edges]
    return "\n".join(lines + ["}"])
