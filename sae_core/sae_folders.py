"""SAE folders and the whitening-aware maps every later stage shares.

A trained SAE is a folder in SAELens format (``cfg.json`` + ``sae_weights.safetensors``, read by
``sae_lens.SAE.load_from_disk``), plus ``whitening.safetensors`` / ``whitening.json`` when it was
trained on whitened activations. This module writes and reads such folders and defines, once, how
an SAE meets model-space activations:

    encode(x)      = sae.encode(whiten(x))          whiten(x)  = (x - mean) @ transform
    decode(z)      = unwhiten(sae.decode(z))        unwhiten(y) = y @ reverse_transform + mean
    reconstruct(x) = decode(encode(x))

What :func:`load_sae_folder` checks before returning an SAE, each failure a ``ValueError`` (or
``FileNotFoundError``) naming the file and the fix, never a ``KeyError: 'dtype'`` or a
``SafetensorError`` from inside SAELens: both files exist; ``cfg.json`` is a JSON object with
positive integer ``d_in`` / ``d_sae`` and a ``dtype``; the weights file's header is well-formed
and its size matches it (a truncated file); with ``checksums.json``, both files have the recorded
size and hash (a flipped byte); SAELens builds the SAE from them; ``W_enc`` / ``W_dec`` have the
shapes ``cfg.json`` gives; every parameter is finite. Hashing reads the weights once more (the
file is in the page cache after SAELens has read it): a few ms for a 20 MB SAE. Folders from
elsewhere (no ``checksums.json``) get every check but the hash.

It sits before evaluation, training and the SAE manager so that all three use these maps rather
than each writing its own: training writes folders with :func:`write_sae_folder`, evaluation scores
:func:`reconstruct`, ``sae_core.saes.SAEManager`` loads with :func:`load_sae_folder` and encodes
with :func:`encode`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

import torch
from jaxtyping import Float
from sae_lens import SAE
from sae_lens.constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME
from torch import Tensor

from sae_core.checks import safetensors_header
from sae_core.files import atomic_write_json, file_sha256, read_json
from sae_core.model_loading import resolve_dtype
from sae_core.texts import DocumentSplit
from sae_core.whitening import WHITENING_FILENAME, Whitener

CHECKSUMS_FILENAME = "checksums.json"
SAE_FILES = (SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME)
SPLIT_FILENAME = "split.json"
"""The train / held-out document split saved beside an SAE trained on a corpus."""


class Reconstruction(NamedTuple):
    """Latents and model-space reconstruction of a batch of rows."""

    latents: Float[Tensor, "rows d_sae"]
    x_hat: Float[Tensor, "rows d"]


def write_sae_folder(sae: SAE, folder: str | os.PathLike[str], whitener: Whitener | None = None) -> Path:
    """``cfg.json`` + ``sae_weights.safetensors`` (SAELens format) and their checksums, each file replaced
    atomically, and the whitening beside them when given."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".sae-") as tmp:
        sae.save_model(tmp)
        write_checksums(Path(tmp), folder)
        for name in SAE_FILES:
            os.replace(Path(tmp) / name, folder / name)
    if whitener is not None:
        whitener.save(folder)
    return folder


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


def load_whitener(folder: str | os.PathLike[str], d_in: int | None = None,
                  device: str | torch.device = "cpu") -> Whitener | None:
    """The whitening saved beside an SAE (``WHITENING_FILENAME``), or None if the folder has none."""
    folder = Path(folder)
    if not (folder / WHITENING_FILENAME).exists():
        return None
    return Whitener.load(folder, expected_d=d_in, device=device)


def load_sae_folder(folder: str | os.PathLike[str], device: str | torch.device,
                    dtype: str | torch.dtype | None = None) -> tuple[SAE, Whitener | None]:
    """The SAE of a SAELens-format folder and its whitening (None: not whitened), on ``device``, after the
    checks in the module docstring; ``dtype=None`` keeps the dtype the SAE was saved with."""
    folder = Path(folder)
    missing = [n for n in SAE_FILES if not (folder / n).exists()]
    if missing:
        raise FileNotFoundError(f"{folder} is not an SAE folder: {', '.join(missing)} missing "
                                "(expected SAELens format, as written by SAE.save_model)")
    fix = f"restore {folder} from where it came from, or train / save the SAE again"
    cfg = _check_cfg(folder / SAE_CFG_FILENAME, fix)
    safetensors_header(folder / SAE_WEIGHTS_FILENAME, fix)
    _check_checksums(folder, fix)
    name = None if dtype is None else str(resolve_dtype(dtype)).removeprefix("torch.")
    try:
        sae = SAE.load_from_disk(str(folder), device=str(device), dtype=name)
    except Exception as err:  # SAELens / safetensors / torch raise many types; all mean "this folder is bad"
        raise ValueError(f"SAELens cannot build an SAE from {folder} ({type(err).__name__}: {err}); {fix}") from err
    _check_weights(sae, cfg, folder, fix)
    return sae, load_whitener(folder, sae.cfg.d_in, device)


def _check_weights(sae: SAE, cfg: dict[str, Any], folder: Path, fix: str) -> None:
    """``W_enc`` / ``W_dec`` of the shapes ``cfg.json`` gives, every parameter finite."""
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


def write_split(folder: str | os.PathLike[str], split: DocumentSplit) -> Path:
    """``split.json`` beside the SAE: the documents it was trained on and the ones held out."""
    return atomic_write_json(Path(folder) / SPLIT_FILENAME, split._asdict())


def read_split(folder: str | os.PathLike[str]) -> DocumentSplit | None:
    """The split saved beside an SAE, or None when the folder has none (an SAE trained elsewhere)."""
    path = Path(folder) / SPLIT_FILENAME
    if not path.exists():
        return None
    record = read_json(path)
    try:
        return DocumentSplit(**record)
    except TypeError as error:
        raise ValueError(f"{path} is not a document split ({error}); delete it and retrain, or analyse "
                         "other documents explicitly (ANALYSIS['documents']='other')") from error


def encode(sae: SAE, whitener: Any, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
    """Latents of model-space rows ``x``: ``sae.encode(whiten(x))``, in the SAE's dtype, dense."""
    sae_in = x.to(device=sae.device, dtype=sae.dtype)  # the one explicit move into the SAE's device and precision
    if whitener is not None:
        sae_in = whitener.forward(sae_in)
    latents = sae.encode(sae_in)
    return latents.to_dense() if latents.is_sparse else latents


def decode(sae: SAE, whitener: Any, latents: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_in"]:
    """Model-space rows of ``latents``: ``unwhiten(sae.decode(z))``, in the SAE's dtype."""
    out = sae.decode(latents.to(sae.dtype))
    return whitener.reverse(out) if whitener is not None else out


def reconstruct(sae: SAE, x: Float[Tensor, "rows d"], whitener: Any = None) -> Reconstruction:
    """Latents and ``decode(encode(x))``, the reconstruction back on ``x``'s device and dtype."""
    latents = encode(sae, whitener, x)
    return Reconstruction(latents, decode(sae, whitener, latents).to(device=x.device, dtype=x.dtype))


__all__ = ["CHECKSUMS_FILENAME", "SPLIT_FILENAME", "Reconstruction", "decode", "encode", "load_sae_folder", "load_whitener", "read_split",
           "reconstruct", "write_checksums", "write_sae_folder", "write_split"]
