"""``"auto"`` precision: half precision where the device multiplies it natively, else float32.

Autocast to bfloat16 pays only on hardware with bfloat16 matmul units. On an x86 CPU with
AVX512-BF16 or AMX, oneDNN's bfloat16 matmuls ran ~2x float32 (386-416 against 187-191 GFLOP/s,
4096 x 576 @ 576 x 1536); on an AVX2-only CPU of the same size they ran at 17 against 152 GFLOP/s,
and SmolLM2's forward at 0.13x its float32 rate, ~8x *slower* (``bench/results/precision.json``). ``"auto"``
(``FORWARD['dtype']``, ``OPTIMIZER['sae_dtype']``) picks per device, once, at the edge
(:class:`sae_core.config.RunConfig`, :class:`sae_core.config.TrainingConfig`, the store's ``save``),
and records the dtype it chose, never ``"auto"``; an explicit half precision on a CPU without it is
kept, with a warning naming the fix. Torch has no public "is bfloat16 fast here" query, so the
checks read torch's CPU-feature probes (``torch.cpu._is_avx512_bf16_supported``, ...) and CUDA's
``is_bf16_supported``.
"""

from __future__ import annotations

import dataclasses
import logging
import platform
from typing import Any

import torch

logger = logging.getLogger(__name__)

AUTO = "auto"
HALF = ("bfloat16", "float16")
_WARNED: set[tuple[str, str, str]] = set()


def _probe(name: str) -> bool:
    """One of torch's CPU-feature probes; False where this torch build lacks it."""
    check = getattr(torch.cpu, name, None)
    try:
        return bool(check()) if check is not None else False
    except RuntimeError:
        return False


def native_half_dtypes(device: torch.device | str) -> tuple[str, ...]:
    """The half precisions ``device`` multiplies natively, fastest first (may be empty)."""
    kind = torch.device(device).type
    if kind == "cuda":
        if not torch.cuda.is_available():
            return ("bfloat16", "float16")  # whether the device exists is checked when the model loads
        bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        return ("bfloat16", "float16") if bf16 else ("float16",)
    if kind != "cpu":
        return ()
    if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"):
        names = []
        if _probe("_is_avx512_bf16_supported") or _probe("_is_amx_tile_supported"):
            names.append("bfloat16")
        if _probe("_is_amx_fp16_supported"):
            names.append("float16")
        return tuple(names)
    mkldnn_bf16 = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return ("bfloat16",) if mkldnn_bf16 is not None and mkldnn_bf16() else ()


def auto_dtype(device: torch.device | str) -> str:
    """What ``"auto"`` means on ``device``: its fastest native half precision, else ``float32``."""
    native = native_half_dtypes(device)
    return native[0] if native else "float32"


def _cpu_name() -> str:
    """The CPU's SIMD level as torch reports it (AVX2, AVX512, ...), for messages."""
    try:
        return torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        return platform.machine()


def resolve_precision(value: str, device: torch.device | str, knob: str) -> str:
    """``value`` of the precision knob ``knob`` on ``device``: ``"auto"`` resolved (logged once),
    anything else unchanged, with a warning when it is a half precision this device lacks."""
    device_name = str(torch.device(device))
    key = (knob, str(value), device_name)
    if value == AUTO:
        chosen = auto_dtype(device)
        if key not in _WARNED:
            _WARNED.add(key)
            logger.info("%s = 'auto': %s on %s (native half precisions here: %s)", knob, chosen, device_name,
                        ", ".join(native_half_dtypes(device)) or f"none, {_cpu_name()}")
        return chosen
    if (key not in _WARNED and value in HALF and torch.device(device).type == "cpu"
            and value not in native_half_dtypes(device)):
        _WARNED.add(key)
        logger.warning("%s = %r on a CPU without native %s matmuls (%s): it runs several times slower than "
                       "float32 here (~8x for bfloat16 on AVX2). Set %s to 'auto' (or 'float32').",
                       knob, value, value, _cpu_name(), knob)
    return value


def resolve_forward(config: Any, device: torch.device | str) -> Any:
    """``config`` (a config with a ``forward`` section: store, extraction) with an ``"auto"`` forward
    dtype resolved for ``device``: for configs built directly rather than through a ``RunConfig``."""
    if config.forward.dtype != AUTO:
        return config
    forward = dataclasses.replace(config.forward, dtype=resolve_precision(AUTO, device, "FORWARD['dtype']"))
    return dataclasses.replace(config, forward=forward)


__all__ = ["AUTO", "auto_dtype", "native_half_dtypes", "resolve_forward", "resolve_precision"]
