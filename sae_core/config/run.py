"""The run configuration of one constant file: every section built, validated and composed once.

:meth:`RunConfig.from_constants` reads a constant file's UPPER_CASE sections, applies overrides
(``optimizer.lr=4e-3``, from the scripts' command lines) and builds every section; a misspelled
section or key, or a value of the wrong type, fails here, at load, naming the section, the key and
the closest valid ones. The stage configs (``store``, ``training``) hold the run's shared sections
(``windows``, ``loader``, ``forward``, ...) as fields, so a knob set once reaches every stage.

Device and dtype are chosen once, in ``MODEL_LOAD_CONFIG`` (``device``, ``dtype``), and
:attr:`RunConfig.device` is what every stage follows: the model, the SAEs and their rows in training
and evaluation, the CSR encoder, similarity on tensors, steering. A stage that must use another
device says so in its own section (``TRAINING = {"device": "cpu"}``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Literal

from sae_core.config.base import (
    ConfigError,
    build,
    check_fields,
    closest,
    parse_override,
    route,
    to_json,
)
from sae_core.config.sections import (
    ForwardConfig,
    LoaderConfig,
    StoreConfig,
    TextSourceConfig,
    WhiteningConfig,
    WindowConfig,
)
from sae_core.config.training import EvaluationConfig, OptimizerConfig, SAEConfig, TrainingConfig


@dataclass(frozen=True)
class AnalysisConfig:
    """Latent analysis on held-out documents (``ANALYSIS``). Encoding into the CSR store runs on the
    run's device; similarity and co-occurrence run in numpy on the CPU by design (out of core, into
    ``.npy`` memmaps)."""

    n_windows: int = 512
    """Windows encoded into the CSR latent store: the first of those an epoch of training would draw from
    the held-out documents (``TRAINING['windows_per_document']``), in a seeded order, so a mix of short
    and long documents is analysed in its training proportions (:mod:`sae_core.held_out`)."""
    documents: Literal["held_out", "other"] = "held_out"
    """``held_out``: the SAE's own held-out split (``split.json``; refused if missing or drawn from other
    texts); ``other``: windows of a seeded sample of the texts, recorded as such (may overlap training)."""
    top_k_examples: int = 10
    """Top-activating examples kept per latent."""
    context_window: int = 8
    """Tokens each side of an example."""
    similarity_metric: Literal["cosine", "dot", "neg_euclidean"] = "cosine"
    """Decoder similarity: cosine, dot product or negative euclidean distance."""
    cooccurrence_metric: Literal["count", "correlation", "jaccard", "pmi"] = "jaccard"
    """Co-occurrence of latents over tokens."""
    similarity_chunk_size: int = 1024
    """Decoder rows per block of the similarity memmap (memory ~ chunk x n_features)."""
    cooccurrence_chunk_size: int = 512
    """Latents per block of the co-occurrence memmap."""
    n_neighbours: int = 8
    """Nearest decoder neighbours kept per latent."""
    n_shown: int = 5
    """Latents the summary and figures show (the most active in the 0.1%-10% density band)."""
    neuronpedia_export: bool = True
    """Also write the browser's per-latent data in the JSON layout of SAEDashboard's Neuronpedia runner
    (``browser/<hook>/neuronpedia/batch-<i>.json``), ready to upload."""

    def __post_init__(self) -> None:
        check_fields(self)
        for name in ("n_windows", "top_k_examples", "similarity_chunk_size", "cooccurrence_chunk_size",
                     "n_neighbours", "n_shown"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.context_window < 0:
            raise ConfigError(f"context_window must be >= 0, got {self.context_window}")


@dataclass(frozen=True)
class SteeringConfig:
    """The steering example and the dose-response sweep (``STEERING``; :mod:`sae_core.steering.dose`)."""

    prompt: str = "The weather today is"
    """Prompt of the single steering example (``scripts.steer``), with and without steering."""
    coefficient: float = 1.0
    """The single example's added decoder direction, in units of the hook's mean activation norm."""
    max_new_tokens: int = 16
    """Tokens generated (the example and every prompt of the sweep)."""
    do_sample: bool = False
    """Sample the generations (the example and the sweep) at ``temperature``; False: greedy."""
    temperature: float = 1.0
    """Sampling temperature (with ``do_sample``)."""
    seed: int = 0
    """Seed of the sampling, the same for every coefficient (so coefficient 0 is one fixed unsteered run)."""
    feature: int | None = None
    """Latent to steer with; None: the most active interpretable latent of the analysis (0 is a latent)."""
    prompts: tuple[str, ...] = ("The weather today is", "My favourite thing to do is", "In the morning I",
                                "The best way to learn is")
    """Prompts of the dose-response sweep, generated in one batch per coefficient."""
    coefficients: tuple[float, ...] = (0.0, 2.0, 4.0, 8.0, 16.0)
    """Sweep coefficients, in units of the latent's mean activation when it fires; 0.0 (the
    unsteered baseline) is required."""
    max_perplexity_ratio: float = 2.0
    """The chosen coefficient keeps the generations' perplexity within this factor of the unsteered one."""
    min_distinct_ratio: float = 0.5
    """... and their distinct-token fraction at least this factor of the unsteered one's: perplexity
    alone lets repetition through (a model predicts the next copy of a repeated token confidently)."""
    density_band: tuple[float, float] = (1e-3, 0.05)
    """Firing density (on held-out tokens) of a latent the sweep may pick."""
    min_distinct_tokens: int = 3
    """Distinct tokens among its top-activating examples a picked latent needs (a concept, not one token)."""
    candidates: int = 4
    """Interpretable latents the demo sweeps, best first, until one has a coefficient that raises
    its concept score within ``max_perplexity_ratio`` (a latent can name a concept yet not steer)."""
    screen: int = 16
    """Interpretable latents (strongest-firing first) whose output score is measured before the sweep
    (:func:`~sae_core.steering.screen_latents`: one forward each); the ``candidates`` with the highest
    are swept, highest first. 0: no screen, the strongest-firing are swept."""
    screen_multiple: float = 4.0
    """The screen's coefficient, in units of each latent's mean activation."""

    def __post_init__(self) -> None:
        check_fields(self)
        if self.candidates < 1 or self.screen < 0:
            raise ConfigError(f"candidates must be at least 1 (latents tried by the demo's sweep) and screen at least 0 "
                              f"(0: no output-score screen), got {self.candidates}, {self.screen}")
        if not 0 < self.screen_multiple < float("inf"):
            raise ConfigError(f"screen_multiple must be positive and finite, got {self.screen_multiple}")
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be positive (do_sample=False for greedy), got {self.temperature}")
        if self.max_new_tokens <= 0 or (self.feature is not None and self.feature < 0):
            raise ConfigError(f"max_new_tokens must be positive and feature >= 0 or None, "
                              f"got {self.max_new_tokens}, {self.feature}")
        if any(c != c or abs(c) == float("inf") for c in (self.coefficient, *self.coefficients)):
            raise ConfigError(f"coefficients must be finite, got {self.coefficient}, {self.coefficients}")
        if 0.0 not in self.coefficients or not self.prompts:
            raise ConfigError(f"coefficients {self.coefficients} must include 0.0 (the unsteered baseline) and "
                              f"prompts must not be empty ({len(self.prompts)} given)")
        low, high = self.density_band
        if not 0 <= low < high <= 1 or self.max_perplexity_ratio < 1 or self.min_distinct_tokens < 1:
            raise ConfigError(f"need 0 <= density_band[0] < density_band[1] <= 1, max_perplexity_ratio >= 1 and "
                              f"min_distinct_tokens >= 1; got {self.density_band}, {self.max_perplexity_ratio}, "
                              f"{self.min_distinct_tokens}")
        if not 0 <= self.min_distinct_ratio <= 1:
            raise ConfigError(f"min_distinct_ratio must lie in [0, 1] (0 turns the repetition limit off), "
                              f"got {self.min_distinct_ratio}")

    def generation_kwargs(self) -> dict[str, Any]:
        """What every steered generation shares (the example and the sweep): length, greedy or sampled, seed."""
        sampling = {"temperature": self.temperature} if self.do_sample else {}
        return {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample, "seed": self.seed, **sampling}


SECTIONS: dict[str, tuple[str, type]] = {
    "DATASET": ("dataset", TextSourceConfig), "WINDOWS": ("windows", WindowConfig),
    "LOADER": ("loader", LoaderConfig), "FORWARD": ("forward", ForwardConfig),
    "STORE": ("store", StoreConfig), "WHITENING": ("whitening", WhiteningConfig),
    "SAE": ("sae", SAEConfig), "OPTIMIZER": ("optimizer", OptimizerConfig),
    "TRAINING": ("training", TrainingConfig), "EVALUATION": ("evaluation", EvaluationConfig),
    "ANALYSIS": ("analysis", AnalysisConfig), "STEERING": ("steering", SteeringConfig),
}
"""Constant-file section -> (RunConfig field, config class)."""
SHARED = ("windows", "loader", "forward", "sae", "optimizer", "evaluation")
"""Sections that the stage configs (``store``, ``training``) hold as fields."""
MODEL_NAMES = {"MODEL_NAME": str, "MODEL_SOURCE": str, "MODEL_LOAD_CONFIG": dict, "HOOK_POINTS": list}
"""Names every constant file defines."""
SOURCE_NAMES = ("MODEL_PATH", "TOKENIZER", "RANDOM_CONFIG", "SAE_RELEASE", "SAE_ID_TEMPLATE", "HF_HUB_OFFLINE")
"""Optional names some model sources read."""


@dataclass(frozen=True)
class RunConfig:
    """Every section of one constant file, validated; the stage configs compose the shared ones."""

    name: str
    """The constant file's name (``outputs/<name>/``)."""
    model_name: str
    model_source: str
    model_load: dict[str, Any]
    hook_points: tuple[str, ...]
    device: str
    """The run's device: ``MODEL_LOAD_CONFIG['device']`` (``cpu`` when it names none)."""
    dataset: TextSourceConfig
    windows: WindowConfig
    loader: LoaderConfig
    forward: ForwardConfig
    store: StoreConfig
    whitening: WhiteningConfig
    sae: SAEConfig
    optimizer: OptimizerConfig
    training: TrainingConfig
    evaluation: EvaluationConfig
    analysis: AnalysisConfig
    steering: SteeringConfig
    sae_release: str | None = None
    """``SAE_RELEASE``: a SAELens pretrained release, or a local folder holding one SAE folder per id."""
    sae_id_template: str | None = None
    """``SAE_ID_TEMPLATE``: the SAE id of a layer, ``{layer}`` filled in (``layer_{layer}/width_16k/canonical``)."""
    overrides: tuple[str, ...] = ()
    """The overrides applied on top of the file, as given."""
    constants: ModuleType | None = field(default=None, repr=False, compare=False)
    """The constant file itself (model loading reads its ``MODEL_*`` names)."""

    @classmethod
    def from_constants(cls, module: ModuleType, overrides: Sequence[str] = ()) -> RunConfig:
        """Build and validate every section of ``module``, then apply ``overrides`` (``section.key=value``)."""
        _check_names(module)
        raw = {field_name: dict(getattr(module, const, {}) or {}) for const, (field_name, _) in SECTIONS.items()}
        for const, (field_name, _) in SECTIONS.items():
            if not isinstance(getattr(module, const, {}), Mapping):
                raise ConfigError(f"{module.__name__}.{const} should be a dict of {field_name} knobs")
        for text in overrides:
            _apply_override(raw, text)
        load = dict(module.MODEL_LOAD_CONFIG)
        device = _device_name(load.get("device") or "cpu", module.__name__)
        _resolve_precisions(raw, device)
        kinds = {field_name: kind for field_name, kind in SECTIONS.values()}
        built = {name: build(kinds[name], values, const_of(name))
                 for name, values in raw.items() if name not in ("store", "training")}
        shared = {name: built[name] for name in ("windows", "loader", "forward")}
        built["store"] = build(StoreConfig, {**raw["store"], **shared}, "STORE")
        built["training"] = build(TrainingConfig, {
            "hook_points": tuple(module.HOOK_POINTS), "device": device, **raw["training"], **shared,
            "sae": built["sae"], "optimizer": built["optimizer"], "evaluation": built["evaluation"]}, "TRAINING")
        return cls(name=module.__name__.rsplit(".", 1)[-1], model_name=module.MODEL_NAME,
                   model_source=module.MODEL_SOURCE, model_load=load, hook_points=tuple(module.HOOK_POINTS),
                   device=device, sae_release=getattr(module, "SAE_RELEASE", None),
                   sae_id_template=getattr(module, "SAE_ID_TEMPLATE", None), overrides=tuple(overrides),
                   constants=module, **built)

    def training_for(self, hooks: Sequence[str] | None = None) -> TrainingConfig:
        """The training config on ``hooks`` (default: the run's ``HOOK_POINTS``)."""
        return self.training if hooks is None else dataclasses.replace(self.training, hook_points=tuple(hooks))

    def to_json(self) -> dict[str, Any]:
        """The effective configuration, as written next to every artifact a stage produces."""
        record = {"name": self.name, "model_name": self.model_name, "model_source": self.model_source,
                  "sae_release": self.sae_release, "sae_id_template": self.sae_id_template,
                  "model_load": to_json(self.model_load), "hook_points": list(self.hook_points),
                  "device": self.device, "overrides": list(self.overrides)}
        for _, (field_name, _) in SECTIONS.items():
            value = getattr(self, field_name)
            record[field_name] = {k: v for k, v in to_json(value).items() if k not in SHARED and k != "hook_points"}
        return record


def _device_name(device: Any, source: str) -> str:
    """``MODEL_LOAD_CONFIG['device']`` as torch spells it; a misspelt device fails here, at load (whether
    it exists on this machine is checked when the model is loaded)."""
    import torch

    try:
        return str(torch.device(device))
    except (RuntimeError, TypeError) as error:
        raise ConfigError(f"{source}: MODEL_LOAD_CONFIG['device'] = {device!r} is not a torch device ({error}); "
                          "use 'cpu', 'cuda', 'cuda:1', 'mps', ...") from error


def _resolve_precisions(raw: dict[str, dict[str, Any]], device: str) -> None:
    """``"auto"`` precisions (``FORWARD['dtype']``, ``OPTIMIZER['sae_dtype']``) become the device's dtype
    before any section is built, so every stage, record and resume check holds a dtype."""
    from sae_core.precision import resolve_precision

    for section, knob, const in (("forward", "dtype", "FORWARD"), ("optimizer", "sae_dtype", "OPTIMIZER")):
        default = next(f.default for f in dataclasses.fields(dict(SECTIONS.values())[section]) if f.name == knob)
        value = raw[section].get(knob, default)
        if isinstance(value, str):
            raw[section][knob] = resolve_precision(value, device, f"{const}[{knob!r}]")


def const_of(field_name: str) -> str:
    return next(const for const, (name, _) in SECTIONS.items() if name == field_name)


def _check_names(module: ModuleType) -> None:
    """Required names present with the right types; no unknown UPPER_CASE name (a misspelt section)."""
    problems = [f"{key} is missing" for key in MODEL_NAMES if not hasattr(module, key)]
    problems += [f"{key} should be {kind.__name__}, got {type(getattr(module, key)).__name__}"
                 for key, kind in MODEL_NAMES.items() if hasattr(module, key) and not isinstance(getattr(module, key), kind)]
    known = set(MODEL_NAMES) | set(SECTIONS) | set(SOURCE_NAMES)
    for name in vars(module):
        if name.isupper() and not name.startswith("_") and name not in known:
            hint = (" (EXTRACTION was split into WINDOWS, LOADER, FORWARD and STORE)" if name == "EXTRACTION"
                    else "")
            problems.append(f"unknown section {name}{hint}; {closest(name, known)}")
    if problems:
        raise ConfigError(f"constant file {module.__name__}: " + "; ".join(problems))


def _apply_override(raw: dict[str, dict[str, Any]], text: str) -> None:
    """Put one ``section.key=value`` override into the raw section dicts, routed to the key's owner.

    ``training.lr`` reaches ``OPTIMIZER['lr']``: the training config composes the optimiser section,
    and every knob has one owner, so the last part of the path names it.
    """
    path, value = parse_override(text)
    kinds = {field_name: kind for field_name, kind in SECTIONS.values()}
    if path[0] not in kinds:
        raise ConfigError(f"override {text!r}: unknown section {path[0]!r}; {closest(path[0], kinds)}")
    nested = route(kinds[path[0]], {path[-1]: value}, path[0])
    target, parts = raw[path[0]], []
    while True:  # walk the routed path: {"optimizer": {"lr": v}} -> raw["optimizer"]["lr"] = v
        key, inner = next(iter(nested.items()))
        parts.append(key)
        if not isinstance(inner, dict) or dataclasses.is_dataclass(inner):
            break
        if target is raw[path[0]] and key in SHARED and path[0] in ("store", "training"):
            target = raw[key]
        else:
            target = target.setdefault(key, {})
        nested = inner
    if path[1:-1] and parts[-len(path) + 1:-1] != path[1:-1]:
        raise ConfigError(f"override {text!r}: {path[-1]!r} lives at {path[0]}.{'.'.join(parts)}")
    target[key] = inner


__all__ = ["AnalysisConfig", "RunConfig", "SECTIONS", "SteeringConfig"]
