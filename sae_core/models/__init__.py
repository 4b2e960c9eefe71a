"""Per-model constant files: one plain, commented Python module per model.

Users edit these files (not a CLI). Each module defines the UPPER_CASE names in ``REQUIRED``;
stage configs read their section (``EXTRACTION``, ``TRAINING``, ...) as keyword overrides of the
stage's dataclass defaults. A model is selected by its exact module name, or by the path of a
``.py`` file of the user's own; an unknown name raises with the list of known ones.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
from pathlib import Path
from types import ModuleType

DEFAULT_MODEL = "smollm2_135m_instruct"

REQUIRED: dict[str, type | tuple[type, ...]] = {
    "MODEL_NAME": str,            # name for logs and metadata (TransformerLens name for that source)
    "MODEL_SOURCE": str,          # key of sae_core.model_loading.SOURCES
    "MODEL_LOAD_CONFIG": dict,    # device / dtype / n_devices / processing flags / HF kwargs
    "HOOK_POINTS": list,          # default hook points for extraction and training
    "DATASET": dict,              # text source: sae_core.data.TextSourceConfig fields
    "EXTRACTION": dict,           # sae_core.activations / store knobs
    "WHITENING": dict,            # sae_core.whitening knobs
    "TRAINING": dict,             # sae_core.training.TrainingConfig fields
    "ANALYSIS": dict,             # sae_core analysis knobs
    "STEERING": dict,             # sae_core.steering example knobs
}


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
    """Raise if a constant file lacks a required name or gives it the wrong type."""
    problems = []
    for key, kind in REQUIRED.items():
        if not hasattr(module, key):
            problems.append(f"{key} is missing")
        elif not isinstance(getattr(module, key), kind):
            problems.append(f"{key} should be {kind}, got {type(getattr(module, key)).__name__}")
    if problems:
        raise TypeError(f"constant file {module.__name__}: " + "; ".join(problems))
