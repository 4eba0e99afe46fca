"""What the code imports: each extra of pyproject.toml holds the distributions its code
imports, each lower bound admits only releases that have what the code uses, and the
package's modules import each other without cycles."""

from __future__ import annotations

import ast
import importlib.metadata as md
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest brings tomli there
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "pneumoscope"

# The code of each extra: every import of these modules counts (lazy ones too: they run
# when the feature does); pneumoscope modules they reach are followed through their
# module-level imports only (a lazy import elsewhere belongs to another feature, e.g.
# the ONNX runtime that serve --onnx needs from the export extra).
EXTRA_CODE = {
    "serve": ["pneumoscope/serve/*.py"],
    # trackers: the track extra
    "report": [
        "pneumoscope/report/*.py",
        "!pneumoscope/report/trackers.py",
    ],
    "export": ["pneumoscope/deploy/export.py", "pneumoscope/deploy/onnx_predictor.py"],
}
# What a feature needs at run time without importing it by name.
RUNTIME_ONLY = {
    # Starlette's multipart parser (serve/app.py's upload) runs on it
    "serve": {"python-multipart"},
    "export": {"onnx", "onnxscript"},  # torch.onnx.export(dynamo=True) builds the graph with them
}
# The first release with what the code uses, and where that is written down.
DOCUMENTED_MINIMA = {
    # Starlette 1.6.0 (2026-08-08) added max_body_size (RequestBodyLimitMiddleware):
    # Kludex/starlette pull request 3431, release notes of 1.6.0.
    "starlette": "1.6",
    # FastAPI's own max_body_size / form_limits (serve/app.py passes the first) came after
    # fastapi issue 16338 (2026-09-09: "FastAPI silently ignores Starlette's new
    # max_body_size"); 0.165.0 is the release checked to have them (its Requires-Dist
    # is starlette>=1.6.0). No earlier release could be checked offline.
    "fastapi": "0.165",
    "pydantic": "2.9",  # fastapi 0.165's own floor
    "python-multipart": "0.0.18",  # Starlette 1.x imports `python_multipart` (its floor: 0.0.18)
    # The torch.export-based ONNX exporter (torch.onnx.export(..., dynamo=True)) is the
    # one documented "for PyTorch 2.6 and newer" (docs.pytorch.org/docs/stable/onnx).
    "torch": "2.6",
    "torchvision": "0.21",  # paired with torch 2.6
}


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def requirements(names: list[str]) -> dict[str, Requirement]:
    return {canonical(r.name): r for r in map(Requirement, names)}


def canonical(name: str) -> str:
    return name.lower().replace("_", "-")


def imports_of(path: Path, module_level_only: bool) -> set[str]:
    """Absolute module names imported by a file (relative imports resolved)."""
    tree = ast.parse(path.read_text(), str(path))
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module != "__future__":
            if node.level:  # from . import x / from .mod import y
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
                found |= {module} | (
                    {f"{module}.{a.name}" for a in node.names} if not node.module else set()
                )
            else:
                found.add(node.module)
                found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def module_file(name: str) -> Path | None:
    parts = name.split(".")
    for candidate in (
        REPO.joinpath(*parts).with_suffix(".py"),
        REPO.joinpath(*parts, "__init__.py"),
    ):
        if candidate.is_file():
            return candidate
    return None


def third_party_of(patterns: list[str]) -> set[str]:
    """Top-level third-party modules the extra's code needs (see EXTRA_CODE; a pattern
    starting with ! leaves those files out)."""
    stdlib = set(sys.stdlib_module_names)
    excluded = {
        f for pattern in patterns if pattern.startswith("!") for f in REPO.glob(pattern[1:])
    }
    todo = [
        (f, False)
        for pattern in patterns
        if not pattern.startswith("!")
        for f in sorted(REPO.glob(pattern))
        if f not in excluded
    ]
    assert todo, f"no files for {patterns}"
    seen, outside = set(), set()
    while todo:
        path, module_level_only = todo.pop()
        if (path, module_level_only) in seen:
            continue
        seen.add((path, module_level_only))
        for name in imports_of(path, module_level_only):
            top = name.split(".")[0]
            if top == "pneumoscope":
                target = module_file(name)
                if target is not None:
                    todo.append((target, True))
            elif top not in stdlib:
                outside.add(top)
    return outside


def distributions_of(modules: set[str]) -> set[str]:
    by_module = md.packages_distributions()
    missing = sorted(m for m in modules if m not in by_module)
    assert not missing, f"modules no installed distribution provides: {missing}"
    return {canonical(d) for m in modules for d in by_module[m]}


def transitive_requirements(dist: str, seen: set[str] | None = None) -> set[str]:
    """A distribution and everything it requires (without extras), as installed."""
    seen = set() if seen is None else seen
    if dist in seen:
        return seen
    seen.add(dist)
    for text in md.requires(dist) or []:
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            try:
                transitive_requirements(canonical(req.name), seen)
            except md.PackageNotFoundError:
                pass
    return seen


@pytest.mark.parametrize("extra", sorted(EXTRA_CODE))
def test_each_extra_holds_what_its_code_imports(extra):
    project = pyproject()["project"]
    core = requirements(project["dependencies"])
    extra_reqs = requirements(project["optional-dependencies"][extra])
    needed = distributions_of(third_party_of(EXTRA_CODE[extra])) | RUNTIME_ONLY.get(extra, set())
    # A distribution counts as provided when named by the core or the extra directly;
    # needed-by-name (imported) ones must be listed, not left to another package's deps.
    missing = sorted(needed - set(core) - set(extra_reqs))
    assert not missing, (
        f"[{extra}] extra lacks {missing} (pip install '.[{extra}]' would not run its code)"
    )


def test_serve_extra_alone_serves_grad_cam():
    # the web page's ?heatmap=true runs report.gradcam: the serve extra must bring it itself
    serve = requirements(pyproject()["project"]["optional-dependencies"]["serve"])
    assert "grad-cam" in serve
    assert "pytorch_grad_cam" in third_party_of(EXTRA_CODE["serve"])


def test_every_floor_is_at_least_the_documented_minimum():
    project = pyproject()["project"]
    every = requirements(project["dependencies"])
    for names in project["optional-dependencies"].values():
        every.update({k: v for k, v in requirements(names).items() if k != "pneumoscope"})
    for dist, minimum in DOCUMENTED_MINIMA.items():
        assert dist in every, f"{dist} is not in pyproject.toml"
        floors = [
            Version(s.version) for s in every[dist].specifier if s.operator in (">=", "==", "~=")
        ]
        assert floors and max(floors) >= Version(minimum), (
            f"{dist}: floor {every[dist].specifier} admits releases before {minimum}, which lack what the code uses"
        )


def test_installed_versions_meet_every_floor():
    # the versions the tests run on are inside what pyproject.toml promises
    project = pyproject()["project"]
    for text in project["dependencies"] + [
        r for k, v in project["optional-dependencies"].items() if k != "all" for r in v
    ]:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue  # e.g. tomli, needed before Python 3.11 only
        installed = md.version(req.name)
        assert req.specifier.contains(installed, prereleases=True), f"{req}: installed {installed}"


def test_fastapi_floor_has_the_limits_serve_passes():
    from fastapi import FastAPI
    from fastapi.routing import APIRouter
    from starlette.formparsers import MultiPartParser

    assert "max_body_size" in set(inspect.signature(FastAPI).parameters)
    assert "max_body_size" in inspect.signature(APIRouter.post).parameters
    # the in-memory upload (serve/app.py) sets the parser's spool size and its limits
    assert isinstance(MultiPartParser.spool_max_size, int)
    assert {"max_files", "max_fields"} <= set(inspect.signature(MultiPartParser).parameters)


def test_import_walk_sees_lazy_and_relative_imports():
    # the walk behind the extras test: lazy imports of the extra's own files count
    serve = third_party_of(EXTRA_CODE["serve"])
    assert {"fastapi", "starlette", "pydantic", "uvicorn", "torch", "numpy"} <= serve
    assert "onnxruntime" not in serve  # serve --onnx needs the export extra, by design
    assert "torch" in imports_of(PACKAGE / "models" / "registry.py", module_level_only=True)


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """pneumoscope module -> the pneumoscope modules it imports (lazy imports included:
    a cycle through a function-level import is still a cycle of dependencies). A
    package's __init__ importing its own submodules lazily is the usual facade, not a cycle."""
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        targets = {
            module_name(f)
            for n in imports_of(path, module_level_only=False)
            if n.split(".")[0] == "pneumoscope" and (f := module_file(n)) is not None
        }
        if path.name == "__init__.py":
            targets = {t for t in targets if not t.startswith(name + ".")}
        graph[name] = targets - {name}
    return graph


def cycle_through(graph: dict[str, set[str]], start: str) -> list[str] | None:
    """A path start -> ... -> start, if there is one (depth-first)."""
    stack, seen = [(start, [start])], set()
    while stack:
        node, path = stack.pop()
        for nxt in sorted(graph.get(node, ())):
            if nxt == start:
                return path + [start]
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, path + [nxt]))
    return None


def test_no_import_cycles():
    graph = import_graph()
    assert "pneumoscope.deploy.onnx_contract" in graph["pneumoscope.deploy.onnx_predictor"]
    cycles = [c for m in sorted(graph) if (c := cycle_through(graph, m))]
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles[:5])


def test_export_and_onnx_predictor_meet_in_the_contract_module():
    graph = import_graph()
    assert "pneumoscope.deploy.export" not in graph["pneumoscope.deploy.onnx_predictor"]
    assert "pneumoscope.models.registry" not in graph["pneumoscope.models.weights"]
    # reading a contract imports no torch (its write goes through rundir, lazily)
    code = "import sys, pneumoscope.deploy.onnx_contract; print(sorted(m for m in sys.modules if m == 'torch'))"
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=120,
    )
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr
