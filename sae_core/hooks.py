"""Hook points of a HookedTransformer: listing, shapes, layer-to-hook mapping, validation.

TransformerLens already names every hook point (``model.hook_dict``); this module adds what a
researcher asks of them: which exist (filtered by a pattern), what shape each has for a given
sequence length, which hooks belong to layer L (negative L counts from the end), and, for a
wrong name, an error that lists the closest valid ones (difflib) instead of a bare KeyError.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from typing import NamedTuple

import torch
from transformer_lens import HookedTransformer

# Per-layer hook names a researcher usually means by "layer L".
LAYER_HOOKS = {
    "resid_pre": "blocks.{layer}.hook_resid_pre",
    "resid_mid": "blocks.{layer}.hook_resid_mid",
    "resid_post": "blocks.{layer}.hook_resid_post",
    "attn_out": "blocks.{layer}.hook_attn_out",
    "mlp_out": "blocks.{layer}.hook_mlp_out",
}


class HookPointInfo(NamedTuple):
    """A hook point's name, its layer (None outside blocks) and its activation shape."""

    name: str
    layer: int | None
    shape: tuple[int, ...] | None


def hook_layer(name: str) -> int | None:
    """The block index in ``blocks.L.*`` names, else None (embeddings, final norm)."""
    match = re.match(r"blocks\.(\d+)\.", name)
    return int(match.group(1)) if match else None


def validate_hook(model: HookedTransformer, name: str) -> str:
    """Return ``name`` if the model has that hook point, else raise naming the closest valid ones."""
    if name in model.hook_dict:
        return name
    close = difflib.get_close_matches(name, list(model.hook_dict), n=5, cutoff=0.5)
    hint = f"closest valid names: {', '.join(close)}" if close else "list them with sae_core.hooks.list_hook_points(model)"
    raise KeyError(f"unknown hook point {name!r} for {model.cfg.model_name}; {hint}")


def resolve_layer(model: HookedTransformer, layer: int) -> int:
    """Map a layer index (negative counts from the end, -1 = last) to 0..n_layers-1."""
    n = model.cfg.n_layers
    if not -n <= layer < n:
        raise IndexError(f"layer {layer} is out of range for {model.cfg.model_name} "
                         f"with {n} layers; use 0..{n - 1} or -{n}..-1")
    return layer % n


def layer_hooks(model: HookedTransformer, layer: int) -> dict[str, str]:
    """Hook names of layer ``layer``: ``{"resid_post": "blocks.L.hook_resid_post", ...}``."""
    index = resolve_layer(model, layer)
    return {kind: template.format(layer=index) for kind, template in LAYER_HOOKS.items()
            if template.format(layer=index) in model.hook_dict}


def resolve_hook(model: HookedTransformer, hook_or_layer: str | int, kind: str = "resid_post") -> str:
    """A hook name from a name or a layer index (``kind`` picks which hook of the layer)."""
    if isinstance(hook_or_layer, int):
        hooks = layer_hooks(model, hook_or_layer)
        if kind not in hooks:
            raise KeyError(f"unknown hook kind {kind!r}; use one of {sorted(hooks)}")
        return hooks[kind]
    return validate_hook(model, hook_or_layer)


def stop_layer_for(hooks: list[str], n_layers: int) -> int | None:
    """The ``stop_at_layer`` that still runs every hook in ``hooks`` (None: run the whole model)."""
    last = -1
    for name in hooks:
        layer = hook_layer(name)
        if layer is None and not name.startswith(("hook_embed", "hook_pos_embed", "hook_tokens")):
            return None  # ln_final / unembed hooks need the whole model
        last = max(last, layer if layer is not None else -1)
    if not hooks or last + 1 >= n_layers:
        return None
    return last + 1


def list_hook_points(model: HookedTransformer, pattern: str | None = None,
                     seq_len: int | None = 4) -> list[HookPointInfo]:
    """Hook points in model order, filtered by a glob (``"*resid_post"``) or regex pattern.

    With ``seq_len`` set, each shape is measured by one forward pass on ``seq_len`` tokens
    (batch 1); ``seq_len=None`` skips the pass and reports no shapes.
    """
    names = list(model.hook_dict)
    if pattern is not None:
        regex = re.compile(fnmatch.translate(pattern)) if any(c in pattern for c in "*?[") else re.compile(pattern)
        names = [n for n in names if regex.search(n)]
    shapes: dict[str, tuple[int, ...]] = {}
    if seq_len is not None and names:
        tokens = torch.zeros((1, seq_len), dtype=torch.long, device=model.cfg.device)
        wanted = set(names)
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in wanted)
        shapes = {n: tuple(t.shape) for n, t in cache.items()}
    return [HookPointInfo(n, hook_layer(n), shapes.get(n)) for n in names]
