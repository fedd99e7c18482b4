"""The import graph: no cycles, and every stage of the node imports only the stages below it.

Imports are read from the source (inside functions too), so a lazy import cannot hide a
dependency that runs the wrong way.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests import ROOT

PACKAGES = ("dicomnode", "pipelines", "trainers")
# The node's stages, lowest first: a module imports modules of its own stage or of a lower
# rank. Stages of equal rank (scp beside dispatch) do not import each other.
RANK = {
    "foundation": 0,   # dicomnode.{errors, log, tls, credentials, config, metrics}
    "net": 1,
    "store": 2,
    "scp": 3,
    "dispatch": 3,
    "process": 4,
    "web": 5,          # console, /metrics, DICOMweb: over process/dispatch/store; node.py starts it
    "cluster": 5,      # Celery tasks and the node's dispatcher: run process/'s job halves
    "app": 9,          # dicomnode.{node, cli}, dicomnode.commands
}
FOUNDATION = {"dicomnode", "dicomnode.errors", "dicomnode.log", "dicomnode.tls",
              "dicomnode.credentials", "dicomnode.config", "dicomnode.metrics"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """``{module: {project module it imports}}`` for every module of the packages."""
    modules = {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                # ``from package import submodule`` depends on the submodule alone
                subs = [f"{node.module}.{a.name}" for a in node.names]
                targets = [t if t in modules else node.module for t in subs]
            else:
                continue
            found |= {t for t in targets if t in modules}
        graph[name] = found - {name}
    return graph


def stage(module: str) -> str:
    if module in FOUNDATION:
        return "foundation"
    parts = module.split(".")
    if len(parts) >= 2 and parts[1] in RANK:
        return parts[1]
    return "app"


def test_no_import_cycles():
    graph = imports()
    state: dict[str, int] = {}  # 1 on the path, 2 done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(graph[module]):
            if state.get(dep) == 1:
                cycle = path[path.index(dep):] + [dep] if dep in path else [module, dep]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if dep not in state:
                visit(dep, [*path, dep])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_the_node_stages_import_only_downwards():
    wrong = []
    for module, deps in imports().items():
        if not module.startswith("dicomnode"):
            continue
        own = stage(module)
        for dep in deps:
            if not dep.startswith("dicomnode"):
                continue
            theirs = stage(dep)
            if theirs != own and RANK[theirs] >= RANK[own]:
                wrong.append(f"{module} ({own}) imports {dep} ({theirs})")
    assert not wrong, "\n".join(sorted(wrong))


def test_pipelines_import_neither_trainers_nor_the_node_and_trainers_not_the_node():
    wrong = [f"{m} imports {d}" for m, deps in imports().items() for d in deps
             if (m.startswith("pipelines") and d.split(".")[0] in ("trainers", "dicomnode"))
             or (m.startswith("trainers") and d.startswith("dicomnode"))]
    assert not wrong, "\n".join(sorted(wrong))


def test_every_node_module_belongs_to_a_known_stage():
    folders = {p.name for p in (ROOT / "dicomnode").iterdir()
               if p.is_dir() and (p / "__init__.py").exists()}
    assert folders - {"commands"} <= set(RANK), "a new stage folder needs its rank here"
