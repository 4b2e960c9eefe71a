"""Checks at the edges of the stages: what a resumable artifact is made from, and inputs against the model.

Identity. A resumable artifact (an activation run, a training checkpoint) records what its
content is made from, and a resume whose inputs differ is refused, naming the differing keys
(:func:`differences`) and how to start fresh:

* the model, by :func:`model_fingerprint`: a SHA-256 over every parameter's name, shape, dtype
  and up to 4,096 evenly spaced elements, plus the weight dtype and the config fields that weight
  processing changes (``normalization_type`` after ``fold_ln``, ...). Two models of the same name,
  width and depth with other weights, or the same weights in bfloat16, differ; a full hash was
  rejected because it reads every weight (~0.1 s per 100 MB) for no more certainty in practice:
  a model that differs only in parameters nowhere near a sampled element is a contrived case.
  Cost: 0.7-1.7 s on SmolLM2 (454 tensors, per-tensor overhead dominates) on the shared 2-core
  machine, once per ``save`` / training start.
* sized texts by :func:`texts_digest` (every document of a list, evenly spaced ones of an HF
  dataset beyond 10,000, since reading a whole arrow column into Python costs more than the run);
* streamed sources by :class:`StreamDigest`, a running hash over what is read (token windows or
  activation chunks) stored with the position it covers, compared when a resume reads past it
  again: a different stream is refused as soon as the resume has re-read the recorded part. For
  texts that is a hash of the token windows taken, so a change no window sees (the end of a long
  document beyond its window) is no difference: the run is then the same as a fresh one.

Model-dependent checks (:func:`check_against_model`, :func:`check_texts`) run where a stage
first meets the model (the training entry, the store's ``save``), not in the config dataclasses,
which do not know the model. Finite values: :func:`check_finite` raises naming the tensor, where
it came from and the fix.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

SAMPLED_ELEMENTS = 4096
TEXTS_DIGESTED_WHOLE = 10_000
# HookedTransformerConfig fields that weight processing (fold_ln, centring, ...) sets.
PROCESSING_FIELDS = ("normalization_type", "positional_embedding_type", "final_rms", "default_prepend_bos")


def _sample_bytes(tensor: Tensor, most: int = SAMPLED_ELEMENTS) -> bytes:
    flat = tensor.detach().reshape(-1)
    if flat.numel() > most:
        flat = flat[torch.arange(most, device=flat.device) * (flat.numel() - 1) // (most - 1)]
    return flat.cpu().contiguous().view(torch.uint8).numpy().tobytes()


def model_fingerprint(model: torch.nn.Module) -> dict[str, Any]:
    """Weight hash (sampled elements of every parameter), dtype and weight processing of ``model``."""
    digest = hashlib.sha256()
    dtypes = set()
    for name, param in model.named_parameters():
        dtypes.add(str(param.dtype).removeprefix("torch."))
        digest.update(f"{name}|{tuple(param.shape)}|{param.dtype}|".encode())
        digest.update(_sample_bytes(param))
    cfg = getattr(model, "cfg", None)
    processing = {f: str(getattr(cfg, f)) for f in PROCESSING_FIELDS if cfg is not None and hasattr(cfg, f)}
    return {"weights_sha256": digest.hexdigest(), "dtype": ",".join(sorted(dtypes)), "processing": processing}


def texts_digest(texts: Any, text_field: str = "text", most: int = TEXTS_DIGESTED_WHOLE) -> str:
    """SHA-256 of a sized text source: every document of a list, at most ``most`` evenly spaced ones otherwise."""
    n = len(texts)
    digest = hashlib.sha256()
    if isinstance(texts, (list, tuple)):
        chosen = (t if isinstance(t, str) else t[text_field] for t in texts)
    else:  # an HF Dataset: its fingerprint is random for in-memory datasets, so hash the content
        import numpy as np

        index = list(range(n)) if n <= most else np.linspace(0, n - 1, most).astype(int).tolist()
        chosen = iter(texts.select(index)[text_field])
    for i, text in enumerate(chosen):
        digest.update((b"\x00" if i else b"") + text.encode("utf-8"))
    return digest.hexdigest()


class StreamDigest:
    """A running SHA-256 over the items of a stream, with how many items it covers."""

    def __init__(self) -> None:
        self._hash, self.count = hashlib.sha256(), 0

    def update(self, *tensors: Tensor) -> None:
        """Add one item (one or more tensors: shape, dtype and sampled elements of each)."""
        for t in tensors:
            self._hash.update(f"{tuple(t.shape)}|{t.dtype}|".encode())
            self._hash.update(_sample_bytes(t, 1 << 16))
        self.count += 1

    def state(self) -> dict[str, Any]:
        return {"items": self.count, "sha256": self._hash.hexdigest()}

    def check(self, expected: Mapping[str, Any] | None, what: str, fix: str) -> None:
        """Raise if the stream read so far differs from ``expected`` (a :meth:`state` of the same count)."""
        if expected is None or expected["items"] != self.count:
            return
        if expected["sha256"] != self._hash.hexdigest():
            raise ValueError(f"{what}: the first {self.count} items read now differ from the ones read before "
                             f"the interruption (another text source or activation stream); {fix}")


def differences(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    """``key: old -> new`` for every key whose value differs (nested mappings by dotted key)."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {_short(a)} -> {_short(b)}")
    return out


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_finite(tensor: Tensor, what: str, fix: str) -> None:
    """Raise ``FloatingPointError`` naming ``what`` if ``tensor`` holds NaN or infinity."""
    bad = ~torch.isfinite(tensor)
    if bool(bad.any()):
        count, first = int(bad.sum()), int(bad.reshape(-1).nonzero()[0])
        raise FloatingPointError(f"{what} holds {count} non-finite value(s) (first at flat index {first}); {fix}")


def check_number(value: float, name: str, fix: str) -> None:
    """Raise ``ValueError`` if ``value`` is NaN or infinite."""
    if not math.isfinite(float(value)):
        raise ValueError(f"{name} is {value}, not a finite number; {fix}")


def check_texts(texts: Any, text_field: str = "text") -> None:
    """Every document of a list is a str (or a record with ``text_field`` holding one)."""
    if not isinstance(texts, (list, tuple)):
        return  # HF datasets have typed columns; streamed items are checked by the window dataset
    for i, item in enumerate(texts):
        text = item.get(text_field) if isinstance(item, Mapping) else item
        if not isinstance(text, str):
            kind = f"a record without a str {text_field!r}" if isinstance(item, Mapping) else type(item).__name__
            raise TypeError(f"text {i} is {kind} ({_short(item)}), not a str; give a list of strings or of "
                            f"records with a {text_field!r} field")


def check_against_model(model: Any, max_text_length: int, what: str) -> None:
    """Settings that only the model can check: windows fit its context."""
    n_ctx = getattr(model.cfg, "n_ctx", None)
    if n_ctx is not None and max_text_length > n_ctx:
        raise ValueError(f"{what}: max_text_length={max_text_length} exceeds {model.cfg.model_name}'s context of "
                         f"{n_ctx} tokens; set max_text_length <= {n_ctx}")


def check_positions(positions: Any, max_text_length: int, what: str) -> None:
    """Window positions (negative from the end) must fall inside a window of ``max_text_length`` tokens."""
    if isinstance(positions, str):
        return
    outside = [p for p in positions if not -max_text_length <= p < max_text_length]
    if outside:
        raise ValueError(f"{what}: positions {outside} fall outside every window of max_text_length="
                         f"{max_text_length} tokens; use positions in -{max_text_length}..{max_text_length - 1}")


def safetensors_layout(path: Path, fix: str, what: str = "") -> tuple[int, dict[str, Any]]:
    """(data offset, header) of a safetensors file after checking the header against the file's size;
    errors name ``what`` + ``path`` and ``fix``."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > size:
                raise ValueError("header length beyond the end of the file")
            header = json.loads(fh.read(n))
        header.pop("__metadata__", None)
        end = max((info["data_offsets"][1] for info in header.values()), default=0)
    except (struct.error, ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as err:
        raise ValueError(f"{what}{path} is not a readable safetensors file ({err}); {fix}") from None
    if 8 + n + end != size:
        raise ValueError(f"{what}{path} is truncated or corrupted: {size} bytes, its header expects {8 + n + end}; "
                         f"{fix}")
    return 8 + n, header


def safetensors_header(path: Path, fix: str) -> dict[str, Any]:
    """The header of a safetensors file after checking it against the file's size; raises naming ``path``."""
    return safetensors_layout(path, fix)[1]
