"""Steering along SAE latents: the registry of steers, the hooks that apply them, generation with them.

* :mod:`.registry` — :class:`Steer` (one intervention), handles and conflict checks.
* :mod:`.hooks` — the one forward hook per steered hook point.
* :mod:`.generation` — :class:`ModelSteering`, the public face: steer, generate, compare.
* :mod:`.dose` — the dose-response sweep: concept score, perplexity and distinct-token fraction per coefficient.

Semantics (modes, positions, KV cache, padded batches) are in :mod:`sae_core.steering.generation`.
"""

from sae_core.steering.dose import (
           DoseRecord,
           DoseResponse,
           LatentChoice,
           choose_coefficient,
           coherent,
           describe_latent,
           distinct_fraction,
           dose_response,
           interpretable_latent,
           interpretable_latents,
           output_scores,
           screen_latents,
)
from sae_core.steering.generation import (
           ModelSteering,
           SteeredGeneration,
           SteeringCapture,
           SteeringComparison,
)
from sae_core.steering.registry import MODES, Steer, SteeringHandle, SteerMode

__all__ = ["DoseRecord", "DoseResponse", "LatentChoice", "choose_coefficient", "coherent", "describe_latent",
           "distinct_fraction", "dose_response",
           "interpretable_latent", "interpretable_latents", "output_scores", "screen_latents", "MODES", "ModelSteering", "Steer", "SteerMode", "SteeredGeneration", "SteeringCapture",
           "SteeringComparison", "SteeringHandle"]
