"""The package reads like the pipeline: every module imports only from stages before it, with no
import cycle and no exemption (imports inside functions and under ``TYPE_CHECKING`` count too);
no private name crosses a module boundary; modules and functions stay small enough to read."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "sae_core"
STAGES = ["files", "checks", "precision", "config", "models", "default_model", "model_loading", "hooks", "corpora", "texts", "data", "loader", "compile_passes", "activations", "store",
          "whitening", "sae_folders", "evaluation", "training", "held_out", "saes", "latents", "similarity", "browser", "steering", "documents",
          "plots", "pages", "reuse", "pipeline"]
"""Top-level modules and packages in pipeline order."""
PACKAGES = {"config": ["base", "sections", "training", "run"],
            "store": ["shards", "runs", "collect"],
            "whitening": ["statistics", "extraction"],
            "training": ["sparse_topk", "sources", "state", "loop"],
            "steering": ["registry", "hooks", "generation", "dose"],
            "browser": ["data", "relations", "export", "site"]}
"""Modules of each stage package in order; ``__init__`` (the package's public face) comes last."""
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 450, 60


def _modules() -> dict[str, Path]:
    """Dotted name below ``sae_core`` (``store.shards``, ``hooks``, ``store``) -> file."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[0] == "models" and len(parts) == 2 and parts[1] != "__init__":
            continue  # constant files: plain data, checked by test_model_loading
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts:
            found[".".join(parts)] = path
    return found


def _rank(name: str) -> tuple[int, int]:
    """(stage index, index inside the stage package; the package face last)."""
    top, _, sub = name.partition(".")
    inner = PACKAGES.get(top, [])
    return STAGES.index(top), inner.index(sub) if sub else len(inner)


def _imports(path: Path, modules: dict[str, Path]) -> list[tuple[str, str]]:
    """(imported sae_core module, imported name or '') for every import in the file, wherever it is."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "sae_core":
            target = node.module.removeprefix("sae_core").lstrip(".")
            for alias in node.names:
                sub = f"{target}.{alias.name}" if target else alias.name
                found.append((sub, "") if sub in modules else (target, alias.name))
        elif isinstance(node, ast.Import):
            found += [(a.name.removeprefix("sae_core."), "") for a in node.names if a.name.startswith("sae_core.")]
    return found


def test_every_module_has_a_place_in_the_pipeline():
    for name in _modules():
        top, _, sub = name.partition(".")
        assert top in STAGES, f"place {name} in STAGES (and the package docstring)"
        assert not sub or top == "models" or sub in PACKAGES.get(top, []), f"place {name} in PACKAGES[{top!r}]"


def test_modules_import_only_earlier_stages_and_no_private_names():
    modules, offences = _modules(), []
    for name, path in modules.items():
        for target, imported in _imports(path, modules):
            if target and target != name and _rank(target) >= _rank(name) and not target.startswith(name + "."):
                offences.append(f"{name} imports {target} (a later stage, or itself through a cycle)")
            if imported.startswith("_"):
                offences.append(f"{name} imports the private name {target}.{imported}")
    assert not offences, offences


def test_modules_and_functions_stay_small():
    long_modules, long_functions = [], []
    for name, path in _modules().items():
        text = path.read_text(encoding="utf-8")
        if len(text.splitlines()) > MAX_MODULE_LINES:
            long_modules.append(f"{name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long_functions.append(f"{name}.{node.name}: {length} lines")
    assert not long_modules and not long_functions, long_modules + long_functions
