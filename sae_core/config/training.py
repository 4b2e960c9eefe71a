"""The training-side sections: the SAE, its optimiser, evaluation, and the training run that composes them."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from sae_core.config.base import ConfigError, check_fields, positive, raise_problems
from sae_core.config.sections import Dtype, ForwardConfig, LoaderConfig, TokenPolicy, WindowConfig

Architecture = Literal["topk", "batchtopk", "jumprelu", "standard"]
ARCHITECTURES: tuple[str, ...] = ("topk", "batchtopk", "jumprelu", "standard")


@dataclass(frozen=True)
class SAEConfig:
    """The SAE trained per hook point (``SAE``): SAELens training classes."""

    architecture: Architecture = "topk"
    """``topk``, ``batchtopk``, ``jumprelu`` or ``standard`` (ReLU + L1)."""
    d_sae: int | None = None
    """Latents per SAE; or give ``expansion_factor`` (d_sae = factor * d_in); neither: 8x the hook's width."""
    expansion_factor: float | None = None
    """d_sae as a multiple of the hook's width (give this or ``d_sae``, not both)."""
    k: int = 32
    """TopK / BatchTopK: active latents per token (on average over the batch for BatchTopK)."""
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

    def __post_init__(self) -> None:
        check_fields(self)
        problems: list[str] = []
        positive(problems, d_sae=self.d_sae, expansion_factor=self.expansion_factor, k=self.k,
                 jumprelu_bandwidth=self.jumprelu_bandwidth)
        if self.d_sae is not None and self.expansion_factor is not None:
            problems.append("give exactly one of d_sae and expansion_factor (neither: 8x the hook's width)")
        if self.d_sae is not None and self.k > self.d_sae:
            problems.append(f"k ({self.k}) must not exceed d_sae ({self.d_sae})")
        raise_problems("SAEConfig", problems)

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
    sae_dtype: Dtype = "bfloat16"
    """Precision of the SAE step's matmuls (autocast); weights and Adam stay float32."""

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
    eval_documents: int = 64
    """Held-out documents the evaluation scores (the first of the split; each costs ~4 forward passes)."""
    eval_every_tokens: int | None = None
    """Evaluate on held-out windows every so many tokens (None: at the end only)."""

    def __post_init__(self) -> None:
        check_fields(self)
        problems: list[str] = []
        positive(problems, held_out_documents=self.held_out_documents, eval_documents=self.eval_documents,
                 eval_every_tokens=self.eval_every_tokens)
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
    dead_window_tokens: int = 100_000
    """A latent that has not fired for this many tokens is dead (AuxK, dead fraction)."""
    checkpoint_every_tokens: int | None = 131_072
    """Checkpoint at the first shuffle-block boundary after every so many tokens (None: end only)."""
    log_every_steps: int = 5
    """Steps between training-curve points (and progress-bar updates)."""
    windows_per_document: Literal["one", "proportional"] = "one"
    """Windows an epoch draws from a training document: ``one``, or ``proportional`` to its length
    (``sae_core.data.WindowedTextDataset``), so the token budget spreads by length, not by document."""
    whitening_path: str | None = None
    """Train on whitened activations (``sae_core.whitening.Whitener.load`` path); single hook only."""
    device: str = "cpu"
    """Device of the SAEs and their rows: the run's device (``MODEL_LOAD_CONFIG['device']``)."""

    def __post_init__(self) -> None:
        check_fields(self)
        object.__setattr__(self, "hook_points", tuple(self.hook_points))
        problems: list[str] = []
        if not self.hook_points:
            problems.append("hook_points is empty: name at least one hook point")
        positive(problems, train_batch_size_tokens=self.train_batch_size_tokens,
                 total_training_tokens=self.total_training_tokens, log_every_steps=self.log_every_steps,
                 dead_window_tokens=self.dead_window_tokens, checkpoint_every_tokens=self.checkpoint_every_tokens)
        if not problems and self.total_training_tokens < self.train_batch_size_tokens:
            problems.append(f"total_training_tokens ({self.total_training_tokens}) must be at least one batch "
                            f"(train_batch_size_tokens={self.train_batch_size_tokens})")
        if self.train_batch_size_tokens > 0 and self.shuffle_buffer_tokens % self.train_batch_size_tokens:
            problems.append(f"shuffle_buffer_tokens ({self.shuffle_buffer_tokens}) must be a multiple of "
                            f"train_batch_size_tokens ({self.train_batch_size_tokens}) (or 0)")
        if self.whitening_path is not None and len(self.hook_points) != 1:
            problems.append("whitening_path whitens one hook point; train one hook per run when whitening")
        raise_problems("TrainingConfig", problems)

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


__all__ = ["ARCHITECTURES", "ConfigError", "EvaluationConfig", "OptimizerConfig", "SAEConfig", "TrainingConfig"]
