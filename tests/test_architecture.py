"""The package's layers, checked on its source: imports run one way, the decoder's insides stay in models/,
training functions stay short. Static (ast), so it costs nothing and sees imports inside functions too."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "captioning"
ENTRY_POINTS = {
    "captioning.train",
    "captioning.evaluate",
    "captioning.predict",
    "captioning.score",
    "captioning.sample",
}
# What each layer must not import (lower layers know nothing of the ones above them). scenes/ (the synthetic
# benchmark) sits above data/, models/, decoding/ and metrics/, which never import it, so COCO users can ignore it.
SCENES = "captioning.scenes"
FORBIDDEN = {
    "runtime": (
        "captioning.training",
        "captioning.evaluation",
        "captioning.models",
        "captioning.decoding",
        "captioning.metrics",
        "captioning.data",
        SCENES,
    ),
    "models": ("captioning.training", "captioning.evaluation", "captioning.decoding", "captioning.metrics", SCENES),
    "decoding": ("captioning.training", "captioning.evaluation", "captioning.metrics", SCENES),
    "metrics": ("captioning.training", "captioning.evaluation", SCENES),
    "data": (
        "captioning.training",
        "captioning.evaluation",
        "captioning.models",
        "captioning.decoding",
        "captioning.metrics",
        SCENES,
    ),
    "scenes": ("captioning.training", "captioning.evaluation"),
    "schedules": ("captioning.training", "captioning.evaluation", "captioning.models", SCENES),
    "evaluation": ("captioning.training",),
    "loggers": ("captioning.training", "captioning.evaluation", SCENES),
}
# The leaves every layer's config checks use: they import nothing of the package but each other.
LEAVES = {"captioning.errors": set(), "captioning.checks": {"captioning.errors"}}
# The config orchestrator is imported only from the top: the entry points and training/ (which validates a run).
CONFIG = "captioning.config"


def modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        yield name, path, ast.parse(path.read_text(), str(path))


def imported(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {n for n in names if n.split(".")[0] == "captioning"}


def test_nothing_imports_an_entry_point():
    offenders = [
        (name, sorted(imported(tree) & ENTRY_POINTS)) for name, _, tree in modules() if imported(tree) & ENTRY_POINTS
    ]
    assert offenders == []


def test_layers_import_one_way():
    offenders = []
    for name, _, tree in modules():
        layer = name.split(".")[1] if name.count(".") else None
        for target in imported(tree):
            if any(target == f or target.startswith(f + ".") for f in FORBIDDEN.get(layer, ())):
                offenders.append((name, target))
    assert offenders == []


def test_only_the_top_imports_the_config_orchestrator():
    """captioning.config runs every group's checks, so it imports every layer: below the entry points and training/
    nothing may import it (a check belongs beside its owner; the error is captioning.errors.ConfigError)."""
    command_line = {"captioning.cli", "captioning.strict_keys"}  # what the entry points alone import (the `+` keys)
    offenders = [
        (name, CONFIG)
        for name, _, tree in modules()
        if CONFIG in imported(tree)
        and name != CONFIG
        and name not in ENTRY_POINTS | command_line
        and not name.startswith("captioning.training")
    ]
    assert offenders == []


def test_the_check_helpers_are_leaves():
    offenders = []
    for name, _, tree in modules():
        if name in LEAVES:
            offenders += [
                (name, target)
                for target in imported(tree)
                if not any(target == a or target.startswith(a + ".") for a in LEAVES[name])
            ]
    assert set(LEAVES) <= {name for name, _, _ in modules()} and offenders == []


def module_graph() -> dict[str, set[str]]:
    """module -> the package's modules it imports, at module level or inside a function (an import inside a function
    still ties the two modules together; only `if TYPE_CHECKING:` blocks, which never run, are left out).
    `from package import name` counts as importing package.name where that is a module, else the package's
    __init__; importing a.b.c is not counted as importing a.b's __init__ (Python runs it first, but that edge would
    make every package with re-exports a circle of no consequence)."""
    known = {name for name, _, _ in modules()}
    graph = {}
    for name, path, tree in modules():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        skip = {
            id(n)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for n in ast.walk(node)
        }
        targets = set()
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from . import x, from .mod import y
                    parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    base = f"{parent}.{base}" if base else parent
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    targets.add(full if full in known else base)
        graph[name] = {t for t in targets if t in known and t != name}
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan): each holds an import circle."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def test_no_import_circle_between_the_packages_modules():
    assert import_cycles(module_graph()) == []


def test_the_circle_finder_finds_a_circle():
    """Not vacuous: a circle of three (the data layer and the scene features once made one of two) is found, and a
    chain is not a circle."""
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    graph = module_graph()
    assert "captioning.data.build" in graph["captioning.scenes.pretraining"]  # the graph sees real imports


def test_nothing_outside_models_reaches_into_the_decoder():
    """Only models/ may touch `.decoder` / `.image_proj`: everything else uses the captioner's step interface and
    primitives (state_from_features, step_hidden, project, draw_dropout_masks...)."""
    offenders = []
    for name, path, tree in modules():
        if name.startswith("captioning.models"):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in ("decoder", "image_proj"):
                offenders.append(f"{path.name}:{node.lineno}")
    assert offenders == []


def test_training_functions_are_short():
    long = []
    for name, path, tree in modules():
        if not name.startswith("captioning.training"):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length >= 80:
                    long.append(f"{path.name}:{node.name} ({length} lines)")
    assert long == []


def test_the_checks_see_a_violation(tmp_path):
    """The walker is not vacuous: it finds an entry-point import and a reach into the decoder in made-up code."""
    tree = ast.parse("def f(model):\n    from captioning.evaluate import evaluate\n    return model.decoder.rnn\n")
    assert imported(tree) & ENTRY_POINTS == {"captioning.evaluate"}
    assert any(isinstance(n, ast.Attribute) and n.attr == "decoder" for n in ast.walk(tree))
