"""The folders say what the program does: the package layering holds, and each package's docstring
names its modules (the README's Layout table points there).

Read from the source with `ast`, nothing imported: every `import` counts, at module level or inside a
function, since a function-level import is still a dependency (deferred to keep start-up light, not
to hide a cycle).

    top level (config, errors, files, ranks, metric_names, secrets)
    data/, models/, losses/            the pieces of a step; they import none of the stages below,
                                       and data/ none of models/ or losses/
    preflight/, cache/, generate/, demo/, outputs/, report/, rollout/
                                       (rollout/ reads rows, models and losses; not
                                       preflight/ nor outputs/: the step calls it, not start-up)
    train/, launch/                    the job and its start; nothing above imports them

`__main__.py` files are entry points: they may import anything.
"""

from __future__ import annotations

import ast
import re
from functools import lru_cache
from pathlib import Path

import pytest

TRAINER = Path(__file__).resolve().parents[1] / "trainer"

TOP = "<top>"  # the modules directly in trainer/
JOB_AREAS = {"train", "launch"}
STEP_AREAS = {"data", "models", "losses"}
STAGE_AREAS = {"preflight", "cache", "generate", "demo", "outputs", "report", "rollout"}

def module_name(path: Path) -> str:
    parts = path.relative_to(TRAINER.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@lru_cache(maxsize=None)
def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(TRAINER.rglob("*.py"))}


def _imported(node: ast.AST, importer: str, is_package: bool) -> list[str]:
    """The trainer modules one import statement names. `from trainer.x import y` names the module
    trainer.x.y when there is one, else trainer.x (y is a name defined there)."""
    known = modules()
    if isinstance(node, ast.Import):
        return [_nearest_module(alias.name) for alias in node.names if alias.name.startswith("trainer")]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:  # relative: from the importer's package
        package = importer.split(".") if is_package else importer.split(".")[:-1]
        base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
    if not base.startswith("trainer"):
        return []
    return [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else _nearest_module(base)
            for alias in node.names]


def _nearest_module(name: str) -> str:
    while name not in modules() and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


@lru_cache(maxsize=None)
def import_graph() -> dict[str, frozenset[str]]:
    """{module: the trainer modules it imports anywhere in its source}."""
    graph = {}
    for name, path in modules().items():
        is_package = path.name == "__init__.py"
        found = {target for node in ast.walk(ast.parse(path.read_text()))
                 for target in _imported(node, name, is_package)}
        graph[name] = frozenset(found - {name})
    return graph


def area(module: str) -> str:
    """The folder directly under trainer/ a module is in, or TOP for trainer/'s own files."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and (TRAINER / parts[1]).is_dir()) else TOP


def is_entry_point(module: str) -> bool:
    return module.endswith("__main__")


def edges():
    for importer, targets in import_graph().items():
        for target in sorted(targets):
            yield importer, target


def violations(sources: set[str], forbidden: set[str]) -> set[tuple[str, str]]:
    return {(importer, target) for importer, target in edges()
            if area(importer) in sources and area(target) in forbidden and not is_entry_point(importer)}


RULES = {
    "nothing below the job imports train/ or launch/": lambda: violations(
        STEP_AREAS | STAGE_AREAS | {TOP}, JOB_AREAS),
    "data/, models/, losses/ import none of the stages": lambda: violations(STEP_AREAS, STAGE_AREAS),
    # Rows and batches know no model and no loss; what they share with the losses is the label that
    # masks a position (IGNORE_INDEX, in losses/settings.py, the lowest module of all) and the span
    # tensors a paired batch hands the cross-tokenizer loss (SpanBatch, losses/spans.py: torch alone).
    "data/ imports no model, and of the losses only their settings and SpanBatch": lambda: {
        (importer, target) for importer, target in violations({"data"}, {"models", "losses"})
        if target not in {"trainer.losses.settings", "trainer.losses.spans"}},
    "rollout/ imports neither preflight/ nor outputs/": lambda: violations({"rollout"}, {"preflight", "outputs"}),
}


def test_the_graph_sees_imports_at_module_level_and_inside_functions():
    # Guards the parser: were it to miss imports, every rule below would hold on nothing.
    graph = import_graph()
    assert "trainer.config" in graph["trainer.__main__"]  # module level
    assert "trainer.launch.distributed" in graph["trainer.launch.cli"]  # inside a function
    assert area("trainer.config") == TOP and area("trainer.losses") == "losses"
    assert area("trainer.train.job") == "train"


@pytest.mark.parametrize("rule", sorted(RULES))
def test_layering(rule):
    found = RULES[rule]()
    assert not found, f"{rule}; these imports break it:\n" + "\n".join(f"  {a} -> {b}" for a, b in sorted(found))


def import_cycles(graph: dict[str, frozenset[str]]) -> list[list[str]]:
    """Each strongly connected group of more than one module (Tarjan's algorithm), sorted."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while not group or group[-1] != node:
                group.append(stack.pop())
                on_stack.discard(group[-1])
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(groups)


def test_no_import_cycle():
    cycles = import_cycles(import_graph())
    assert not cycles, "modules that import each other, directly or round a loop:\n" + "\n".join(
        "  " + ", ".join(cycle) for cycle in cycles)


def test_the_cycle_search_finds_a_loop_and_only_the_loop():
    graph = {"a": frozenset({"b"}), "b": frozenset({"c"}), "c": frozenset({"a"}), "d": frozenset({"a"})}
    assert import_cycles(graph) == [["a", "b", "c"]]


def packages() -> list[Path]:
    return sorted({path.parent for path in TRAINER.rglob("*.py")})


def unnamed_modules(package: Path) -> list[str]:
    """The package's modules its `__init__.py` docstring does not name (as `name.py` or :mod:`.name`;
    `__main__.py` also as `python -m trainer.<package>`)."""
    init = package / "__init__.py"
    doc = (ast.get_docstring(ast.parse(init.read_text())) or "") if init.is_file() else ""
    command = "python -m " + module_name(init)
    missing = []
    for path in sorted(package.glob("*.py")):
        stem = path.stem
        if stem == "__init__":
            continue
        named = f"{stem}.py" in doc or re.search(rf":mod:`\.{stem}`", doc)
        if stem == "__main__":
            named = named or re.search(rf"{re.escape(command)}\b(?!\.)", doc)
        if not named:
            missing.append(path.name)
    return missing


@pytest.mark.parametrize("package", packages(), ids=lambda p: str(p.relative_to(TRAINER.parent)))
def test_each_package_docstring_names_each_of_its_modules(package):
    assert (package / "__init__.py").is_file(), f"{package} has no __init__.py to describe it"
    missing = unnamed_modules(package)
    assert not missing, f"{package / '__init__.py'}'s docstring does not name {', '.join(missing)}"
