"""The import rule of docs/architecture.md: each module imports only from its own layer
or the layers below it, so the folders of the package are its layers.

    0 core        errors, fsio, tasks, rundir, evaluation/   (and the package's __version__)
    1 data        data/
    2 models      models/
    3 inference   inference
    4 training    training/
    5 deploy      deploy/
    6 products    report/, site/
    7 front ends  serve/, commands
    8 api         api
    9 cli         cli, __main__

Every import counts, the lazy ones in functions too: they run when the feature does.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location(
    "import_walk", Path(__file__).with_name("test_imports.py")
)
walk = importlib.util.module_from_spec(spec)
spec.loader.exec_module(walk)

LAYERS = [
    (
        "core",
        [
            "pneumoscope",
            "pneumoscope.errors",
            "pneumoscope.fsio",
            "pneumoscope.tasks",
            "pneumoscope.rundir",
            "pneumoscope.evaluation",
        ],
    ),
    ("data", ["pneumoscope.data"]),
    ("models", ["pneumoscope.models"]),
    ("inference", ["pneumoscope.inference"]),
    ("training", ["pneumoscope.training"]),
    ("deploy", ["pneumoscope.deploy"]),
    ("products", ["pneumoscope.report", "pneumoscope.site"]),
    ("front ends", ["pneumoscope.serve", "pneumoscope.commands"]),
    ("api", ["pneumoscope.api"]),
    ("cli", ["pneumoscope.cli", "pneumoscope.__main__"]),
]
# The package's front door: `import pneumoscope` names the API and loads it on first use.
FRONT_DOOR = "pneumoscope"


def layer_of(module: str) -> int:
    """The layer of a module: its longest matching prefix in LAYERS (the package itself,
    "pneumoscope", matches only itself: a new top-level module must be placed by hand)."""
    best, rank = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            matches = module == prefix or (prefix != FRONT_DOOR and module.startswith(prefix + "."))
            if matches and len(prefix) > best:
                best, rank = len(prefix), i
    assert rank is not None, f"{module} is in no layer of tests/test_layers.py: add it to LAYERS"
    return rank


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    found = []
    for module, targets in sorted(graph.items()):
        if module == FRONT_DOOR:
            continue
        for target in sorted(targets):
            if layer_of(target) > layer_of(module):
                found.append(
                    f"{module} ({LAYERS[layer_of(module)][0]}) imports {target} "
                    f"({LAYERS[layer_of(target)][0]})"
                )
    return found


def test_every_module_has_a_layer():
    for module in walk.import_graph():
        layer_of(module)


def test_no_module_imports_from_a_layer_above_its_own():
    found = upward_imports(walk.import_graph())
    assert not found, "imports against the layer rule:\n" + "\n".join(found)


@pytest.mark.parametrize("low", ["pneumoscope.data", "pneumoscope.models", "pneumoscope.training"])
def test_data_models_and_training_import_no_product_or_front_end(low):
    graph = walk.import_graph()
    banned = (
        "pneumoscope.report",
        "pneumoscope.serve",
        "pneumoscope.commands",
        "pneumoscope.api",
        "pneumoscope.site",
        "pneumoscope.deploy",
        "pneumoscope.cli",
    )
    found = [
        f"{m} imports {t}"
        for m, targets in graph.items()
        if m.startswith(low)
        for t in targets
        if t.startswith(banned)
    ]
    assert not found, "\n".join(found)


def test_a_module_in_no_layer_is_named():
    with pytest.raises(AssertionError, match="pneumoscope.newmod is in no layer"):
        layer_of("pneumoscope.newmod")


def test_the_rule_catches_an_upward_import():
    # the check itself: a training module that imports the report is named
    found = upward_imports({"pneumoscope.training.loop": {"pneumoscope.report.figures"}})
    assert found == [
        "pneumoscope.training.loop (training) imports pneumoscope.report.figures (products)"
    ]
