"""Per-model constant files: one plain, commented Python module per model.

Users edit these files (not a CLI). Each module defines ``MODEL_NAME``, ``MODEL_SOURCE``,
``MODEL_LOAD_CONFIG`` and ``HOOK_POINTS``, and the sections (``WINDOWS``, ``SAE``, ``TRAINING``, ...;
:data:`sae_core.config.run.SECTIONS`) whose knobs differ from the defaults. Loading a file builds and
validates its :class:`~sae_core.config.RunConfig`, so a misspelt key fails here. A model is selected by
its exact module name, or by the path of a ``.py`` file of the user's own; an unknown name raises
with the list of known ones.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

from sae_core.config import RunConfig

DEFAULT_MODEL = "smollm2_135m_instruct"


def known_models() -> list[str]:
    """Names of the constant files shipped in ``sae_core.models``."""
    return sorted(m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)]) if not m.name.startswith("_"))


def load_model_constants(name: str = DEFAULT_MODEL) -> ModuleType:
    """Import a constant file by exact name (``"gpt2_small"``) or by path (``"my_models/foo.py"``)."""
    if name.endswith(".py"):
        path = Path(name)
        if not path.exists():
            raise FileNotFoundError(f"constant file {path} does not exist")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        if name not in known_models():
            raise ValueError(f"unknown model {name!r}; known models: {', '.join(known_models())} "
                             "(or pass the path of your own constant file)")
        module = importlib.import_module(f"sae_core.models.{name}")
    check_constants(module)
    return module


def check_constants(module: ModuleType) -> None:
    """Raise if a constant file lacks a required name, misspells a section or key, or mistypes a value."""
    RunConfig.from_constants(module)


def load_run_config(name: str = DEFAULT_MODEL, overrides: Sequence[str] = ()) -> RunConfig:
    """The validated :class:`~sae_core.config.RunConfig` of a constant file, with ``section.key=value`` overrides."""
    return RunConfig.from_constants(load_model_constants(name), overrides)
