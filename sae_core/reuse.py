"""Reuse a finished stage's folder only when the settings that made it are the run's.

Every stage of :mod:`sae_core.pipeline` writes ``run_config.json`` beside what it made and reuses a
finished folder on the next run, so the demo and the scripts can be run again cheaply. Reuse must
not be silent when the constant file changed in between: a researcher who edits ``TRAINING['k']``
and runs the demo again would otherwise read the old SAE's numbers under the new settings. So a
finished folder is reused only when the knobs its stage depends on (:data:`STAGE_INPUTS`) equal the
run's; otherwise :class:`StaleOutputError` names each changed knob, the folder and the two fixes
(delete the folder to redo the stage, or write to another output root). Knobs that change how fast
a stage runs but not what it makes (:data:`RUNTIME_ONLY`: workers, pinning, compile) do not count.
The activation store needs none of this: ``sae_core.store.save`` refuses a run id made from other
inputs itself.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from sae_core.config import RunConfig

logger = logging.getLogger(__name__)

RUN_CONFIG_FILENAME = "run_config.json"

_MODEL = ("model_name", "model_source", "model_load.dtype", "dataset", "windows", "loader", "forward")
STAGE_INPUTS: dict[str, tuple[str, ...]] = {
    "whitening": (*_MODEL, "store", "whitening"),
    "sae": (*_MODEL, "sae", "optimizer", "training", "evaluation"),
    "analysis": (*_MODEL, "sae", "optimizer", "training", "evaluation", "analysis.n_windows", "analysis.documents",
                 "analysis.n_neighbours"),
    "browser": (*_MODEL, "sae", "optimizer", "training", "evaluation", "analysis"),
}
"""The effective-config keys (sections or dotted paths) whose values make each stage's folder. The
analysis folder's files depend on the windows and the neighbour count (the metrics name their own
files; examples and shown latents are recomputed on every call); the browser shows every analysis knob
and is rebuilt, not refused, when one changed (it takes seconds)."""
RUNTIME_ONLY = ("loader.num_dataloader_workers", "loader.pin_memory", "loader.persistent_workers", "loader.extra",
                "forward.compile", "training.device", "training.checkpoint_every_tokens", "training.log_every_steps",
                "analysis.similarity_chunk_size", "analysis.cooccurrence_chunk_size")
"""Keys that change how (or where) a stage runs, or how often it checkpoints and logs, not what it makes."""


class StaleOutputError(RuntimeError):
    """A finished stage's folder was made with other settings than the run's."""


def _flat(record: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(record, Mapping) and record:
        for key, value in record.items():
            yield from _flat(value, f"{prefix}.{key}" if prefix else str(key))
    else:
        yield prefix, record


def _selected(record: Mapping[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    flat = dict(_flat(json.loads(json.dumps(record, default=str))))
    return {k: v for k, v in flat.items()
            if any(k == key or k.startswith(key + ".") for key in keys)
            and not any(k == skip or k.startswith(skip + ".") for skip in RUNTIME_ONLY)}


def changed_settings(folder: Path, run: RunConfig, stage: str) -> list[str] | None:
    """``key: before -> now`` for each knob of ``stage`` that differs between ``folder``'s
    ``run_config.json`` and ``run`` (None when the folder has no record)."""
    path = Path(folder) / RUN_CONFIG_FILENAME
    if not path.exists():
        return None
    keys = STAGE_INPUTS[stage]
    before, now = _selected(json.loads(path.read_text()), keys), _selected(run.to_json(), keys)
    missing = object()
    return [f"{key}: {before.get(key, '(absent)')!r} -> {now.get(key, '(absent)')!r}"
            for key in sorted(set(before) | set(now)) if before.get(key, missing) != now.get(key, missing)]


def check_reusable(folder: Path, run: RunConfig, stage: str) -> None:
    """Raise :class:`StaleOutputError` unless ``folder`` (a finished ``stage``) was made with the run's
    settings for that stage; a folder without a record is reused with a warning."""
    changed = changed_settings(folder, run, stage)
    if changed is None:
        logger.warning("%s has no %s, so the settings that made it are unknown; reusing it as it is", folder,
                       RUN_CONFIG_FILENAME)
        return
    if changed:
        shown = "; ".join(changed[:8]) + (f"; and {len(changed) - 8} more" if len(changed) > 8 else "")
        raise StaleOutputError(f"{folder} holds a finished {stage} stage made with other settings than this run's "
                               f"({shown}). Delete that folder to redo the stage with the new settings, or set "
                               "SAE_CORE_OUTPUTS to another folder to keep both")
