"""Steers and their registry: which interventions are active, validated and free of conflicts.

The semantics of each mode and of positions are in :mod:`sae_core.steering`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

MODES = ("add", "clamp", "scale", "ablate")
POSITION_KEYWORDS = ("all", "prompt", "generated")
SteerMode = Literal["add", "clamp", "scale", "ablate"]


@dataclass(frozen=True)
class Steer:
    """One intervention on one latent at one hook point."""

    hook: str
    """Hook point name (resolved from a layer index by :meth:`ModelSteering.steer`)."""
    feature: int
    """Latent index in the SAE at ``hook``."""
    coefficient: float = 0.0
    """add: multiple of the decoder direction; clamp: the latent's value; scale: factor; ablate: unused."""
    mode: SteerMode = "add"
    positions: str | tuple[int, ...] = "all"
    """``"all"``, ``"prompt"``, ``"generated"`` or absolute positions (0 = first prompt token)."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if isinstance(self.positions, str):
            if self.positions not in POSITION_KEYWORDS:
                raise ValueError(f"positions must be one of {POSITION_KEYWORDS} or a list of ints, "
                                 f"got {self.positions!r}")
        else:
            positions = tuple(int(p) for p in self.positions)
            if not positions or min(positions) < 0:
                raise ValueError(f"positions must be a non-empty list of absolute positions >= 0, got "
                                 f"{self.positions!r}")
            object.__setattr__(self, "positions", positions)
        if self.feature < 0:
            raise ValueError(f"feature must be a latent index >= 0, got {self.feature}")
        if not math.isfinite(self.coefficient):
            raise ValueError(f"coefficient of the steer on latent {self.feature} at {self.hook} must be finite, "
                             f"got {self.coefficient}; pass a finite number")


class SteeringHandle:
    """Active steers; a context manager that removes them on exit (also after an exception)."""

    def __init__(self, registry: SteerRegistry, steers: tuple[Steer, ...]) -> None:
        self.registry = registry
        self.steers = steers

    def remove(self) -> None:
        """Remove these steers (and the hook of any hook point left without steers)."""
        self.registry.remove(self)

    def __enter__(self) -> SteeringHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


class SteerRegistry:
    """The active steers, in registration order; ``on_change`` runs after every change (hook sync)."""

    def __init__(self, on_change: Callable[[], None]) -> None:
        self.handles: list[SteeringHandle] = []
        self.on_change = on_change

    @property
    def active(self) -> list[Steer]:
        return [s for handle in self.handles for s in handle.steers]

    def add(self, steers: Sequence[Steer]) -> SteeringHandle:
        steers = tuple(steers)
        check_conflicts([*self.active, *steers])
        handle = SteeringHandle(self, steers)
        self.handles.append(handle)
        self.on_change()
        return handle

    def remove(self, handle: SteeringHandle) -> None:
        self.handles = [h for h in self.handles if h is not handle]
        self.on_change()

    def clear(self) -> None:
        self.handles.clear()
        self.on_change()


def check_positions_reached(steers: Sequence[Steer], n_positions: int) -> None:
    """Steers at absolute positions must reach at least one of the ``n_positions`` steered positions."""
    for s in steers:
        if not isinstance(s.positions, str) and min(s.positions) >= n_positions:
            raise ValueError(f"the steer on latent {s.feature} at {s.hook} acts at positions {list(s.positions)}, but "
                             f"the model only sees positions 0..{n_positions - 1} (longest prompt plus the generated "
                             "tokens); use smaller positions, or more max_new_tokens")


def check_conflicts(steers: Sequence[Steer]) -> None:
    """Refuse two clamp / scale / ablate steers of one latent at one hook point."""
    seen: set[tuple[str, int]] = set()
    for s in steers:
        if s.mode == "add":
            continue
        if (s.hook, s.feature) in seen:
            raise ValueError(f"latent {s.feature} at {s.hook} is clamped / scaled / ablated twice; "
                             "remove the other steer first (two values for one latent conflict)")
        seen.add((s.hook, s.feature))


__all__ = ["MODES", "POSITION_KEYWORDS", "Steer", "SteerMode", "SteerRegistry", "SteeringHandle", "check_conflicts",
           "check_positions_reached"]
