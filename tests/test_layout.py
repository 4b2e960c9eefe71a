"""The package reads like the pipeline: every module imports only from stages before it.

Imports under ``if TYPE_CHECKING:`` and inside a module-level ``__getattr__`` (lazy re-exports)
are not dependencies at run time and are left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "sae_core"
STAGES = ["_io", "models", "default_model", "model_loading", "hooks", "data", "activations", "shards", "runs",
          "store", "whitening", "whitened_extraction", "evaluation", "sparse_topk", "training_data",
          "training_state", "training", "saes", "latents", "similarity", "browser_data",
          "browser_export", "browser", "steering", "plots", "pipeline"]


def _runtime_imports(tree: ast.AST) -> set[str]:
    """``sae_core`` modules a module imports when it runs."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        lazy = isinstance(node, ast.FunctionDef) and node.name == "__getattr__"
        type_only = isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        if lazy or type_only:
            skipped.update(id(child) for child in ast.walk(node))
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "sae_core":
            parts = node.module.split(".")
            found.update([parts[1]] if len(parts) > 1 else [alias.name for alias in node.names])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("sae_core."))
    return found


def test_every_module_has_a_place_in_the_pipeline():
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert modules == set(STAGES) - {"models"}, "place new modules in STAGES (and the package docstring)"


def test_modules_import_only_earlier_stages():
    offences = []
    for name in STAGES:
        path = PACKAGE / f"{name}.py"
        if not path.exists():
            continue
        for dep in _runtime_imports(ast.parse(path.read_text(encoding="utf-8"))):
            if STAGES.index(dep) >= STAGES.index(name):
                offences.append(f"{name} imports {dep}")
    assert not offences, offences
