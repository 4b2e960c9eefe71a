"""The training-side sections: the SAE, its optimiser, evaluation, and the training run that composes them."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

from sae_core.config.base import (
    ConfigError,
    ConfigTypeError,
    check_fields,
    closest,
    field_types,
    positive,
    raise_problems,
    with_overrides,
)
from sae_core.config.sections import (
    ForwardConfig,
    LoaderConfig,
    Precision,
    TokenPolicy,
    WindowConfig,
)

Architecture = Literal["topk", "batchtopk", "jumprelu", "standard", "matryoshka_batchtopk"]
ARCHITECTURES: tuple[str, ...] = ("topk", "batchtopk", "jumprelu", "standard", "matryoshka_batchtopk")


@dataclass(frozen=True)
class SAEConfig:
    """The SAE trained per hook point (``SAE``): SAELens training classes."""

    architecture: Architecture = "topk"
    """``topk``, ``batchtopk``, ``jumprelu``, ``standard`` (ReLU + L1) or ``matryoshka_batchtopk``
    (BatchTopK with nested reconstruction losses over the first ``matryoshka_widths`` latents)."""
    d_sae: int | None = None
    """Latents per SAE; or give ``expansion_factor`` (d_sae = factor * d_in); neither: 8x the hook's width."""
    expansion_factor: float | None = None
    """d_sae as a multiple of the hook's width (give this or ``d_sae``, not both)."""
    k: int = 32
    """TopK family: active latents per token (on average over the batch for (Matryoshka) BatchTopK)."""
    aux_loss_coefficient: float = 1.0
    """TopK family: weight of the AuxK loss (dead latents reconstruct the residual)."""
    rescale_acts_by_decoder_norm: bool = True
    """TopK family: rank latents by ``h * ||W_dec||`` (SAELens's default; decoder norms may drift)."""
    fast_topk: bool = True
    """TopK: the sparse step (``sae_core.training.sparse_topk``) instead of SAELens's dense one."""
    l1_coefficient: float = 5.0
    """Standard: weight of the L1 penalty on ``acts * ||W_dec||``."""
    l0_coefficient: float = 1.0
    """JumpReLU: weight of the (straight-through) L0 penalty."""
    jumprelu_init_threshold: float = 0.01
    """JumpReLU: initial threshold."""
    jumprelu_bandwidth: float = 0.05
    """JumpReLU: straight-through estimator bandwidth."""
    decoder_init_norm: float | None = 0.1
    """Initial decoder row norm (SAELens's heuristic init); None keeps Kaiming-uniform rows."""
    b_dec_init: Literal["mean", "zeros"] = "mean"
    """``mean``: decoder bias starts at the first batch's mean; ``zeros``: SAELens's start."""
    matryoshka_widths: tuple[int, ...] = ()
    """Matryoshka: the nested prefix widths, strictly increasing, each level adding a reconstruction
    loss over the first ``width`` latents; d_sae is the last level (appended when missing). Empty:
    d_sae/8, d_sae/4, d_sae/2, d_sae."""
    use_matryoshka_aux_loss: bool = False
    """Matryoshka: dead latents of each level reconstruct that level's residual (slower; SAELens's off)."""

    def __post_init__(self) -> None:
        check_fields(self)
        problems: list[str] = []
        positive(problems, d_sae=self.d_sae, expansion_factor=self.expansion_factor, k=self.k,
                 jumprelu_bandwidth=self.jumprelu_bandwidth)
        if self.d_sae is not None and self.expansion_factor is not None:
            problems.append("give exactly one of d_sae and expansion_factor (neither: 8x the hook's width)")
        if self.d_sae is not None and self.k > self.d_sae:
            problems.append(f"k ({self.k}) must not exceed d_sae ({self.d_sae})")
        widths = self.matryoshka_widths
        if any(w <= 0 for w in widths) or any(a >= b for a, b in zip(widths, widths[1:], strict=False)):
            problems.append(f"matryoshka_widths must be positive and strictly increasing, got {widths}")
        if widths and self.d_sae is not None and widths[-1] > self.d_sae:
            problems.append(f"the last matryoshka width ({widths[-1]}) exceeds d_sae ({self.d_sae})")
        raise_problems("SAEConfig", problems)

    def matryoshka_widths_for(self, d_in: int) -> list[int]:
        """The Matryoshka levels of the SAE on a hook of width ``d_in``, ending at its d_sae."""
        d_sae = self.d_sae_for(d_in)
        widths = list(self.matryoshka_widths) or sorted({max(1, d_sae // 8), max(1, d_sae // 4), max(1, d_sae // 2)})
        return [w for w in widths if w < d_sae] + [d_sae]

    def d_sae_for(self, d_in: int) -> int:
        """Latents of the SAE on a hook of width ``d_in``."""
        if self.d_sae is not None:
            return self.d_sae
        return round((self.expansion_factor if self.expansion_factor is not None else 8.0) * d_in)


@dataclass(frozen=True)
class OptimizerConfig:
    """Adam, its learning-rate schedule and the SAE step's precision (``OPTIMIZER``)."""

    lr: float = 4e-3
    """Adam learning rate. High for the short CPU budgets this package targets (<= a few M tokens; the
    sweep in ``bench/results/lr_sweep.json`` chose it); SAELens's 3e-4 suits runs of 100M+ tokens."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas."""
    lr_scheduler: Literal["constant", "cosineannealing"] = "constant"
    """``constant`` or ``cosineannealing`` (to lr / 10) between warm-up and decay."""
    lr_warm_up_fraction: float = 0.0
    """Fraction of the steps with a linear warm-up."""
    lr_decay_fraction: float = 0.2
    """Fraction of the steps, at the end, with a linear decay to 0."""
    sparsity_warm_up_fraction: float = 0.0
    """Fraction of the steps over which the L1 / L0 coefficient ramps up from 0."""
    max_grad_norm: float | None = 1.0
    """Clip the gradient norm (per SAE) to this; None: no clipping."""
    sae_dtype: Precision = "auto"
    """Precision of the SAE step's matmuls (autocast); weights and Adam stay float32. ``"auto"``
    (resolved by the training config against its device): bfloat16 where the device multiplies it
    natively, else float32."""

    def __post_init__(self) -> None:
        check_fields(self)
        problems: list[str] = []
        if not (math.isfinite(self.lr) and self.lr > 0):
            problems.append(f"lr must be finite and positive, got {self.lr}")
        positive(problems, max_grad_norm=self.max_grad_norm)
        for name in ("lr_warm_up_fraction", "lr_decay_fraction", "sparsity_warm_up_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                problems.append(f"{name} must be in [0, 1]")
        if self.lr_warm_up_fraction + self.lr_decay_fraction > 1:
            problems.append("lr_warm_up_fraction + lr_decay_fraction must not exceed 1")
        raise_problems("OptimizerConfig", problems)


@dataclass(frozen=True)
class EvaluationConfig:
    """Held-out evaluation of the SAEs (``EVALUATION``)."""

    held_out_documents: int = 512
    """Documents held out of training: the run's one split, saved with the SAE (``split.json``) and used
    by evaluation, the CSR latents, top examples, densities and co-occurrence."""
    split: Literal["length_stratified", "random"] = "length_stratified"
    """How they are drawn: one from each of ``held_out_documents`` strata of the documents sorted by
    length (the held-out set spans short and long documents as the corpus does), or uniformly."""
    eval_windows: int = 256
    """Held-out windows scored for reconstruction and sparsity (explained variance, MSE, L0, dead): a
    seeded sample of the windows an epoch draws from the held-out documents, drawn as training draws
    them (``TRAINING['windows_per_document']``), so long documents weigh as they do in training
    (documents, run together into rows, when training runs them together). One forward to the hook
    each (cheap)."""
    ce_windows: int = 64
    """The first of those (a random order) also scored for CE-loss recovered and KL: three or four full
    forward passes each (clean, spliced, zero- and mean-ablated)."""
    eval_every_tokens: int | None = None
    """Evaluate on held-out windows every so many tokens (None: at the end only)."""

    def __post_init__(self) -> None:
        check_fields(self)
        problems: list[str] = []
        positive(problems, held_out_documents=self.held_out_documents, eval_windows=self.eval_windows,
                 ce_windows=self.ce_windows, eval_every_tokens=self.eval_every_tokens)
        if self.ce_windows > self.eval_windows:
            problems.append(f"ce_windows ({self.ce_windows}) must not exceed eval_windows ({self.eval_windows}): "
                            "the CE windows are the first of the eval windows")
        raise_problems("EvaluationConfig", problems)


@dataclass(frozen=True)
class TrainingConfig:
    """A training run: budget, cadence and checkpoints (``TRAINING``), composed with the run's windows,
    loader, forward, SAE, optimiser and evaluation sections."""

    hook_points: tuple[str, ...] = ()
    """Hook points to train on, one SAE each, all from one forward pass (the run's ``HOOK_POINTS``)."""
    windows: WindowConfig = field(default_factory=WindowConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    forward: ForwardConfig = field(default_factory=ForwardConfig)
    sae: SAEConfig = field(default_factory=SAEConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    total_training_tokens: int = 300_000
    """Tokens (kept activation rows) to train on; steps = total // batch."""
    train_batch_size_tokens: int = 4096
    """Rows per SAE step, over all ranks."""
    shuffle_buffer_tokens: int = 65_536
    """Rows shuffled together (a multiple of the batch); 0: no shuffling."""
    buffer_passes: int = 1
    """Times each shuffle buffer's rows are served, each pass in its own random order: SAE steps per
    forwarded token. The model forwards ``total_training_tokens / buffer_passes`` tokens; the SAE trains
    on ``total_training_tokens`` rows. On CPU the forward costs ~5x an SAE step, and a second pass over
    300k tokens scores as well as 300k fresh ones (``bench/results/quality_sweep.json``)."""
    dead_window_tokens: int = 100_000
    """A latent that has not fired for this many tokens is dead (AuxK, dead fraction)."""
    checkpoint_every_tokens: int | None = 131_072
    """Checkpoint at the first shuffle-block boundary after every so many tokens (None: end only)."""
    log_every_steps: int = 5
    """Steps between training-curve points (and progress-bar updates)."""
    windows_per_document: Literal["one", "proportional", "run_together"] = "one"
    """Windows an epoch draws from a training document: ``one``, or ``proportional`` to its length
    (``sae_core.data.WindowedTextDataset``), so the token budget spreads by length, not by document;
    or ``run_together``: every token once, the documents joined into rows of ``max_text_length`` with
    BOS first and between documents, attending across them, as SAELens's ``ActivationsStore`` makes
    its contexts (to train or evaluate as SAELens does). Evaluation draws held-out rows the same
    way; the analysis keeps one document a row (a top example's context is then all the latent saw)."""
    whitening_path: str | None = None
    """Train on whitened activations (``sae_core.whitening.Whitener.load`` path); single hook only."""
    device: str = "cpu"
    """Device of the SAEs and their rows: the run's device (``MODEL_LOAD_CONFIG['device']``)."""
    sweep: tuple[dict[str, Any], ...] = ()
    """Several SAEs per hook point from the one forward pass: each entry overrides SAE / OPTIMIZER knobs
    (``{"k": 64}``, ``{"d_sae": 9216, "lr": 2e-3}``, ``{"architecture": "batchtopk"}``) and may give a
    ``name``; every hook trains one SAE per entry, saved and resumed as ``<hook>/<name>`` (:meth:`units`).
    Empty: one SAE per hook, named by the hook."""

    def __post_init__(self) -> None:
        check_fields(self)
        object.__setattr__(self, "hook_points", tuple(self.hook_points))
        object.__setattr__(self, "sweep", tuple(dict(entry) for entry in self.sweep))
        problems: list[str] = []
        if not self.hook_points:
            problems.append("hook_points is empty: name at least one hook point")
        positive(problems, train_batch_size_tokens=self.train_batch_size_tokens,
                 total_training_tokens=self.total_training_tokens, log_every_steps=self.log_every_steps,
                 dead_window_tokens=self.dead_window_tokens, checkpoint_every_tokens=self.checkpoint_every_tokens,
                 buffer_passes=self.buffer_passes)
        if self.buffer_passes > 1 and self.shuffle_buffer_tokens < self.buffer_passes * self.train_batch_size_tokens:
            problems.append(f"buffer_passes={self.buffer_passes} serves each buffer's rows {self.buffer_passes} times in "
                            f"random order: shuffle_buffer_tokens ({self.shuffle_buffer_tokens}) must hold at least "
                            f"buffer_passes x train_batch_size_tokens ({self.buffer_passes * self.train_batch_size_tokens})")
        if not problems and self.total_training_tokens < self.train_batch_size_tokens:
            problems.append(f"total_training_tokens ({self.total_training_tokens}) must be at least one batch "
                            f"(train_batch_size_tokens={self.train_batch_size_tokens})")
        if self.train_batch_size_tokens > 0 and self.shuffle_buffer_tokens % self.train_batch_size_tokens:
            problems.append(f"shuffle_buffer_tokens ({self.shuffle_buffer_tokens}) must be a multiple of "
                            f"train_batch_size_tokens ({self.train_batch_size_tokens}) (or 0)")
        if self.whitening_path is not None and len(self.hook_points) != 1:
            problems.append("whitening_path whitens one hook point; train one hook per run when whitening")
        raise_problems("TrainingConfig", problems)
        self._resolve_precisions()
        for index, entry in enumerate(self.sweep):  # a bad sweep entry fails here, at load
            self._sweep_config(index, entry)

    def _resolve_precisions(self) -> None:
        """``"auto"`` forward and SAE-step precisions become dtypes for this run's device (and are recorded so)."""
        from sae_core.precision import resolve_precision

        try:
            forward = resolve_precision(self.forward.dtype, self.device, "FORWARD['dtype']")
            sae_dtype = resolve_precision(self.optimizer.sae_dtype, self.device, "OPTIMIZER['sae_dtype']")
        except RuntimeError as error:
            raise ConfigError(f"TrainingConfig: device {self.device!r} is not a torch device ({error}); "
                              "use 'cpu', 'cuda', 'cuda:1', 'mps', ...") from error
        if forward != self.forward.dtype:
            object.__setattr__(self, "forward", dataclasses.replace(self.forward, dtype=forward))
        if sae_dtype != self.optimizer.sae_dtype:
            object.__setattr__(self, "optimizer", dataclasses.replace(self.optimizer, sae_dtype=sae_dtype))

    def units(self) -> list[SweepUnit]:
        """The SAEs this run trains: per hook point, one per sweep entry (or one, named by the hook)."""
        if not self.sweep:
            return [SweepUnit(hook, hook, dataclasses.replace(self, hook_points=(hook,))) for hook in self.hook_points]
        configs = [self._sweep_config(index, entry) for index, entry in enumerate(self.sweep)]
        return [SweepUnit(f"{hook}/{name}", hook, dataclasses.replace(config, hook_points=(hook,)))
                for hook in self.hook_points for name, config in configs]

    def _sweep_config(self, index: int, entry: Mapping[str, Any]) -> tuple[str, TrainingConfig]:
        """(name, config) of sweep entry ``index``: the SAE and OPTIMIZER knobs it overrides applied."""
        section = f"TRAINING.sweep[{index}]"
        sae_keys, optimizer_keys = field_types(SAEConfig), field_types(OptimizerConfig)
        for key in entry:
            if key != "name" and key not in sae_keys and key not in optimizer_keys:
                raise ConfigError(f"{section}: unknown key {key!r} (a sweep entry sets SAE / OPTIMIZER knobs or its "
                                  f"name); {closest(str(key), [*sae_keys, *optimizer_keys, 'name'])}")
        name = entry.get("name", sweep_name(entry))
        if not isinstance(name, str) or not SAFE_NAME.fullmatch(name) or not name.strip("."):
            raise ConfigError(f"{section}: name {name!r} should be a non-empty folder name of letters, digits, "
                              "'.', '_', '-', '=' (no '/', not only dots)")
        names = [e.get("name", sweep_name(e)) for e in self.sweep]
        if names.count(name) > 1:
            raise ConfigError(f"{section}: the name {name!r} is used by {names.count(name)} sweep entries; give each "
                              "entry a distinct name (or distinct knobs)")
        try:
            sae = with_overrides(self.sae, section, **{k: v for k, v in entry.items() if k in sae_keys})
            optimizer = with_overrides(self.optimizer, section, **{k: v for k, v in entry.items() if k in optimizer_keys})
        except ConfigTypeError:
            raise
        except ConfigError as error:  # a range check of the section: name the entry
            raise ConfigError(f"{section}: {error}") from error
        return name, dataclasses.replace(self, sae=sae, optimizer=optimizer, sweep=())

    @property
    def seed(self) -> int:
        return self.windows.seed

    @property
    def policy(self) -> TokenPolicy:
        return self.windows.policy

    @property
    def total_steps(self) -> int:
        """SAE steps of the run (as SAELens counts them: tokens // batch)."""
        return self.total_training_tokens // self.train_batch_size_tokens

    @property
    def batches_per_block(self) -> int:
        """Batches served from one shuffle block."""
        return max(1, self.shuffle_buffer_tokens // self.train_batch_size_tokens)


SAFE_NAME = re.compile(r"[A-Za-z0-9._=-]+")


def sweep_name(entry: Mapping[str, Any]) -> str:
    """The default name of a sweep entry from its knobs: ``{"k": 64, "lr": 0.001}`` -> ``k64_lr0.001``,
    ``{"architecture": "batchtopk"}`` -> ``batchtopk``, ``{}`` -> ``base``."""
    def text(value: Any) -> str:
        return "-".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)
    parts = [text(v) if k == "architecture" else f"{k}{text(v)}" for k, v in entry.items() if k != "name"]
    return re.sub(r"[^A-Za-z0-9._=-]", "-", "_".join(parts)) or "base"


class SweepUnit(NamedTuple):
    """One SAE a run trains: its unique name (``<hook>`` or ``<hook>/<sweep name>``), hook, config."""

    name: str
    hook: str
    config: TrainingConfig
    """The unit trained alone: its hook only, its SAE and optimiser knobs, no sweep."""


__all__ = ["ARCHITECTURES", "ConfigError", "EvaluationConfig", "OptimizerConfig", "SAEConfig", "SweepUnit",
           "TrainingConfig", "sweep_name"]
