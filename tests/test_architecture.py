"""The package's layers, checked on its source: imports run one way, the decoder's insides stay in models/,
training functions stay short. Static (ast), so it costs nothing and sees imports inside functions too."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "captioning"
ENTRY_POINTS = {"captioning.train", "captioning.evaluate", "captioning.predict", "captioning.score", "captioning.sample"}
# What each layer must not import (lower layers know nothing of the ones above them).
FORBIDDEN = {
    "runtime": ("captioning.training", "captioning.evaluation", "captioning.models", "captioning.decoding",
                "captioning.metrics", "captioning.data"),
    "models": ("captioning.training", "captioning.evaluation", "captioning.decoding", "captioning.metrics"),
    "decoding": ("captioning.training", "captioning.evaluation", "captioning.metrics"),
    "metrics": ("captioning.training", "captioning.evaluation"),
    "data": ("captioning.training", "captioning.evaluation", "captioning.models", "captioning.decoding",
             "captioning.metrics"),
    "schedules": ("captioning.training", "captioning.evaluation", "captioning.models"),
    "evaluation": ("captioning.training",),
    "loggers": ("captioning.training", "captioning.evaluation"),
}


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
    offenders = [(name, sorted(imported(tree) & ENTRY_POINTS)) for name, _, tree in modules()
                 if imported(tree) & ENTRY_POINTS]
    assert offenders == []


def test_layers_import_one_way():
    offenders = []
    for name, _, tree in modules():
        layer = name.split(".")[1] if name.count(".") else None
        for target in imported(tree):
            if any(target == f or target.startswith(f + ".") for f in FORBIDDEN.get(layer, ())):
                offenders.append((name, target))
    assert offenders == []


def test_nothing_outside_models_reaches_into_the_decoder():
    """Only models/ may touch `.decoder` / `.image_proj`: everything else uses the captioner's step interface and
    primitives (state_from_features, step_hidden, project, draw_dropout_masks...)."""
    offenders = []
    for name, path, tree in modules():
        if name.startswith("captioning.models") or name == "captioning.config":  # config reads cfg.model.decoder
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
