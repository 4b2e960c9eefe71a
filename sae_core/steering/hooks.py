"""The steering hook: one TransformerLens forward hook per steered hook point, installed and removed by handle.

Each hook applies every active steer of its hook point at once (one ``encode`` for all clamps, the
deltas added); :class:`Layout` tells it where each row's real tokens sit during a generation. The
TransformerLens hook-handle internals (``HookPoint.fwd_hooks``, ``LensHandle``) are touched in
:meth:`SteeringHooks.sync` only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer

from sae_core.saes import SAEManager
from sae_core.steering.registry import SteerRegistry, check_positions_reached


@dataclass
class Layout:
    """Where each row's real tokens sit during one generation (absent: a plain forward, no padding)."""

    n_pad: Tensor  # (batch,) left pads per row
    prompt_len: Tensor  # (batch,) prompt tokens per row
    use_cache: bool
    seen: dict[str, int] = field(default_factory=dict)  # columns each hook has seen (KV cache)
    capture: dict[str, list[tuple[int, Tensor, Tensor]]] | None = None  # hook -> (offset, before, after)


class SteeringHooks:
    """Installs, runs and removes the steering hooks of one model for the steers of ``registry``."""

    def __init__(self, model: HookedTransformer, manager: SAEManager, registry: SteerRegistry) -> None:
        self.model, self.manager, self.registry = model, manager, registry
        self.installed: dict[str, Any] = {}  # hook name -> our hook function
        self.directions: dict[tuple[str, int, int, int], Tensor] = {}
        self.layout: Layout | None = None

    def direction(self, hook: str, feature: int) -> Tensor:
        entry = self.manager[hook]
        key = (hook, feature, id(entry.sae), id(entry.whitener))  # a replaced SAE gets new directions
        if key not in self.directions:
            self.directions[key] = self.manager.decoder_directions(hook, [feature])[0]
        return self.directions[key]

    def sync(self) -> None:
        """Install one hook per hook point that has steers; remove ours from the others."""
        wanted = {s.hook for s in self.registry.active}
        for name in list(self.installed):
            if name not in wanted:
                fn = self.installed.pop(name)
                point = self.model.hook_dict[name]
                for lens in [h for h in point.fwd_hooks if h.user_hook is fn]:
                    lens.hook.remove()
                    point.fwd_hooks.remove(lens)
        for name in wanted - set(self.installed):
            def fn(activation: Tensor, hook: Any) -> Tensor:
                return self.steer_activation(activation, hook.name)

            self.model.add_hook(name, fn)
            self.installed[name] = fn

    def positions(self, name: str, batch: int, n: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """Absolute positions (batch, n), real-token mask and prompt mask of the columns this call sees."""
        layout = self.layout
        if layout is None:  # a plain forward: columns are positions, every token is a prompt token
            pos = torch.arange(n, device=device).expand(batch, n)
            ones = torch.ones(batch, n, dtype=torch.bool, device=device)
            return pos, ones, ones
        offset = layout.seen.get(name, 0) if layout.use_cache else 0
        layout.seen[name] = offset + n
        cols = torch.arange(offset, offset + n, device=device)
        pos = cols[None, :] - layout.n_pad.to(device)[:, None]  # (batch, n)
        return pos, pos >= 0, pos < layout.prompt_len.to(device)[:, None]

    def steer_activation(self, x: Float[Tensor, "batch pos d"], name: str) -> Tensor:
        steers = [s for s in self.registry.active if s.hook == name]
        if not steers:
            return x
        if x.ndim != 3:
            raise NotImplementedError(f"steering at {name} needs (batch, pos, d) activations, got shape "
                                      f"{tuple(x.shape)}; per-head hooks are not supported")
        batch, n, _ = x.shape
        if self.layout is None:  # a plain forward sees every position at once
            check_positions_reached(steers, n)
        pos, real, prompt = self.positions(name, batch, n, x.device)
        z = self.manager.encode(name, x) if any(s.mode != "add" for s in steers) else None
        delta: Tensor | None = None
        for s in steers:
            if s.positions == "all":
                mask = real
            elif s.positions == "prompt":
                mask = real & prompt
            elif s.positions == "generated":
                mask = real & ~prompt
            else:
                mask = real & torch.isin(pos, torch.tensor(s.positions, device=x.device))
            direction = self.direction(name, s.feature)
            if s.mode == "add":
                amount = torch.full((batch, n), float(s.coefficient), dtype=direction.dtype, device=x.device)
            else:
                current = z[..., s.feature]  # type: ignore[index]
                target = {"clamp": torch.full_like(current, float(s.coefficient)),
                          "scale": current * s.coefficient,
                          "ablate": torch.zeros_like(current)}[s.mode]
                amount = target - current  # decode(z') - decode(z) = (z'_i - z_i) d_i
            # where, not multiply: pad rows may hold non-finite values and must stay untouched
            term = torch.where(mask[..., None], amount[..., None] * direction, 0.0)
            delta = term if delta is None else delta + term
        out = x + delta.to(x.dtype)  # type: ignore[union-attr]  # back to the model's dtype
        layout = self.layout
        if layout is not None and layout.capture is not None:
            offset = layout.seen[name] - n if layout.use_cache else 0
            layout.capture.setdefault(name, []).append((offset, x.detach().clone(), out.detach().clone()))
        return out


__all__ = ["Layout", "SteeringHooks"]
