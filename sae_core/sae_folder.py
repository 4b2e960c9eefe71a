"""One SAE folder on disk (SAELens format): written with checksums, read back only after checks.

Layout: ``cfg.json`` + ``sae_weights.safetensors`` (what ``SAE.save_model`` writes, so SAELens and
other tools read it), plus ``checksums.json`` (size and SHA-256 of both) when sae_core wrote it.

What :func:`load_sae_folder` checks before returning an SAE, each failure a ``ValueError`` (or
``FileNotFoundError``) naming the file and the fix, never a ``KeyError: 'dtype'`` or a
``SafetensorError`` from inside SAELens: both files exist; ``cfg.json`` is a JSON object with
positive integer ``d_in`` / ``d_sae`` and a ``dtype``; the weights file's header is well-formed
and its size matches it (a truncated file); with ``checksums.json``, both files have the recorded
size and hash (a flipped byte); SAELens builds the SAE from them; ``W_enc`` / ``W_dec`` have the
shapes ``cfg.json`` gives; every parameter is finite. Hashing reads the weights once more (the
file is in the page cache after SAELens has read it): a few ms for a 20 MB SAE. Folders from
elsewhere (no ``checksums.json``) get every check but the hash.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from sae_lens import SAE
from sae_lens.constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME

from sae_core._io import atomic_write_json, file_sha256, read_json
from sae_core.checks import safetensors_header

CHECKSUMS_FILENAME = "checksums.json"
SAE_FILES = (SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME)


def write_sae_folder(sae: SAE, folder: str | os.PathLike[str]) -> None:
    """``cfg.json`` + ``sae_weights.safetensors`` (SAELens format) and their checksums, each replaced atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".sae-") as tmp:
        sae.save_model(tmp)
        write_checksums(Path(tmp), folder)
        for name in SAE_FILES:
            os.replace(Path(tmp) / name, folder / name)


def write_checksums(source: Path, folder: Path | None = None) -> None:
    """Record the size and SHA-256 of the SAE files in ``source`` into ``folder/checksums.json``."""
    atomic_write_json((folder or source) / CHECKSUMS_FILENAME, {
        name: {"nbytes": (source / name).stat().st_size, "sha256": file_sha256(source / name)} for name in SAE_FILES})


def _check_cfg(path: Path, fix: str) -> dict[str, Any]:
    cfg = read_json(path)
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} holds {type(cfg).__name__}, not an SAE config object; {fix}")
    missing = [k for k in ("d_in", "d_sae", "dtype") if k not in cfg]
    if missing:
        raise ValueError(f"{path} lacks {missing}: it is not a SAELens SAE config; {fix}")
    bad = [k for k in ("d_in", "d_sae") if not isinstance(cfg[k], int) or isinstance(cfg[k], bool) or cfg[k] < 1]
    if bad:
        raise ValueError(f"{path} gives {', '.join(f'{k}={cfg[k]!r}' for k in bad)}; these must be positive integers; "
                         f"{fix}")
    return cfg


def _check_checksums(folder: Path, fix: str) -> None:
    record_path = folder / CHECKSUMS_FILENAME
    if not record_path.exists():
        return
    records = read_json(record_path)
    for name in SAE_FILES:
        record, path = records.get(name) if isinstance(records, dict) else None, folder / name
        if not isinstance(record, dict) or path.stat().st_size != record.get("nbytes") \
                or file_sha256(path) != record.get("sha256"):
            raise ValueError(f"{path} differs from the size / SHA-256 recorded in {record_path} (damaged or "
                             f"replaced); {fix}")


def load_sae_folder(folder: str | os.PathLike[str], device: str | torch.device = "cpu",
                    dtype: str | None = None) -> SAE:
    """The SAE of a SAELens-format folder, after the checks in the module docstring."""
    folder = Path(folder)
    missing = [n for n in SAE_FILES if not (folder / n).exists()]
    if missing:
        raise FileNotFoundError(f"{folder} is not an SAE folder: {', '.join(missing)} missing "
                                "(expected SAELens format, as written by SAE.save_model)")
    fix = f"restore {folder} from where it came from, or train / save the SAE again"
    cfg = _check_cfg(folder / SAE_CFG_FILENAME, fix)
    safetensors_header(folder / SAE_WEIGHTS_FILENAME, fix)
    _check_checksums(folder, fix)
    try:
        sae = SAE.load_from_disk(str(folder), device=str(device), dtype=dtype)
    except Exception as err:  # SAELens / safetensors / torch raise many types; all mean "this folder is bad"
        raise ValueError(f"SAELens cannot build an SAE from {folder} ({type(err).__name__}: {err}); {fix}") from err
    shapes = {"W_enc": (cfg["d_in"], cfg["d_sae"]), "W_dec": (cfg["d_sae"], cfg["d_in"])}
    params = dict(sae.named_parameters())
    for name, shape in shapes.items():
        if name in params and tuple(params[name].shape) != shape:
            raise ValueError(f"{folder / SAE_WEIGHTS_FILENAME}: {name} has shape {tuple(params[name].shape)} but "
                             f"{folder / SAE_CFG_FILENAME} implies {shape}; {fix}")
    for name, param in params.items():
        if not bool(torch.isfinite(param).all()):
            raise ValueError(f"{folder / SAE_WEIGHTS_FILENAME}: parameter {name} holds non-finite values (NaN or inf); "
                             f"the SAE diverged or the file is damaged; {fix}")
    return sae
