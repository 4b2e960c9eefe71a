"""SAE training: one config, one explicit loop, exact resume, data parallelism, SAELens-format output.

The loop (:func:`train_saes`) is ours, not SAELens's ``SAETrainer``. ``SAETrainer`` takes one SAE
and one activation iterator, keeps no data position (its checkpoints cannot resume the data
stream), runs the dense TopK step, and has no notion of ranks. What we keep from SAELens: the
training SAE classes as parameter containers, losses and file format (``TopKTrainingSAE``,
``BatchTopKTrainingSAE``, ``JumpReLUTrainingSAE``, ``StandardTrainingSAE``; their
``training_forward_pass``), its learning-rate schedules (``get_lr_scheduler``) and coefficient
warm-up (``CoefficientScheduler``), its dead-latent rule (no firing for a window) feeding AuxK /
the JumpReLU pre-activation loss, and its gradient clipping at 1.0.

One step, per hook point, on a batch of ``train_batch_size_tokens`` rows: the TopK family
(``fast_topk``) goes through :func:`sae_core.sparse_topk.topk_training_step` (same loss, sparse
backward); the other architectures through SAELens's ``training_forward_pass`` under autocast at
``sae_dtype``. Master weights, gradients and Adam state are float32 (``fused`` Adam: ~10x less
optimiser time on CPU than the default for-each Adam). Several hook points share one forward pass
(one :class:`~sae_core.training_data.ModelActivationSource` chunk holds every hook's rows), one SAE
and optimiser each. Decoder norms are left to each architecture: TopK ranks by
``h * ||W_dec||`` (``rescale_acts_by_decoder_norm``), Standard / JumpReLU weight their penalties by
the norms, so no renormalisation step is needed. The decoder bias starts at the mean of the first
batch (``b_dec_init="mean"``; SAELens starts at zero): the first reconstructions are the mean, so
training does not spend its first steps learning it.

Data parallelism (``torchrun``; gloo on CPU): each rank streams its own share of documents / chunks
and trains on ``train_batch_size_tokens / world_size`` rows; after backward one ``all_reduce``
averages the gradients (flattened into one buffer), so every rank applies the same update to the
same weights; firing masks (for dead latents), the BatchTopK threshold and the logged metrics are
reduced too. Explicit rather than ``DistributedDataParallel``: DDP only reduces through its own
``forward``, and the sparse step calls the parameters directly. Rank 0 writes all outputs.

Checkpoints (``checkpoint_dir``, safetensors + JSON, no pickles): SAE parameters and buffers, Adam
state, LR and coefficient schedules, dead-latent counters, the training curve and, per rank, the
shuffle buffer (:class:`~sae_core.training_data.BlockShuffler`) with its source position and
generator. Periodic checkpoints wait for a shuffle-block boundary (the buffer is then small); one
is also written at the end. ``latest.json`` names the newest complete one and is replaced only
after every rank has written its part; older ones are deleted. A resumed run replays exactly what
an uninterrupted one does, so on CPU both end with bit-identical weights (tested). A resume is
refused when the identity differs (model weight fingerprint, texts digest or activation-stream
digest, widths, any setting outside ``RESUMABLE_CHANGES``); checkpoint files are hashed in
``latest.json`` and checked before they are read; one training at a time holds ``.training.lock``
in the output folder (the store's :class:`~sae_core._io.FolderLock`).

Finite numbers: the loss is checked every step (one scalar; the rows are examined only when it is
not finite, to say whether they or the SAE are to blame), the parameters on log steps and before
every checkpoint (a pass over them is ~6% of a step at d_sae 4608 x 576, 4,096 rows; checking the
rows every step would be another ~5%). Either stops the run with a ``FloatingPointError`` naming
the hook, step and source position, before anything is written.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from sae_lens import SAE
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from sae_core._io import FolderLock, atomic_write_json
from sae_core.activations import TokenPolicy
from sae_core.checks import (
    check_against_model,
    check_texts,
    model_fingerprint,
    texts_digest,
)
from sae_core.data import LoaderConfig, WindowedTextDataset, make_dataloader
from sae_core.evaluation import EvalResult, append_curve, evaluate_sae, write_curve, write_eval
from sae_core.model_loading import resolve_dtype
from sae_core.sae_folder import load_sae_folder, write_sae_folder
from sae_core.training_data import (
    ActivationSource,
    BlockShuffler,
    Chunk,
    ModelActivationSource,
    TensorChunkSource,
    hook_widths,
    init_distributed,
    rank_and_world,
    split_documents,
)
from sae_core.training_state import (
    SAE_CLASSES,
    SAEState,
    StepStats,
    build_training_sae,
    check_sizes,
    load_checkpoint,
    save_checkpoint,
    to_inference_sae,
)

__all__ = ["HeldOutEvaluator", "TrainedSAE", "TrainingConfig", "TrainingRun", "build_training_sae",
           "checkpoint_dir_for", "hook_widths", "init_distributed", "model_source", "split_documents",
           "to_inference_sae", "train_from_activations", "train_from_model", "train_saes", "write_sae_folder"]

logger = logging.getLogger(__name__)

CONFIG_FILENAME = "training_config.json"
CHECKPOINTS_DIRNAME = "checkpoints"
TRAINING_LOCK = ".training.lock"


@dataclass(frozen=True)
class TrainingConfig:
    """Every knob of a training run. A constant file's ``TRAINING`` dict gives these fields."""

    hook_points: tuple[str, ...] = ()
    """Hook points to train on, one SAE each, all from one forward pass."""
    architecture: str = "topk"
    """``topk``, ``batchtopk``, ``jumprelu`` or ``standard`` (ReLU + L1): SAELens training classes."""
    d_sae: int | None = None
    """Latents per SAE; or give ``expansion_factor`` (d_sae = factor * d_in)."""
    expansion_factor: float | None = None
    """d_sae as a multiple of the hook's width (when ``d_sae`` is None)."""
    k: int = 32
    """Active latents per token (TopK) or on average over the batch (BatchTopK)."""
    aux_loss_coefficient: float = 1.0
    """Weight of the AuxK loss (dead latents reconstruct the residual), TopK family."""
    rescale_acts_by_decoder_norm: bool = True
    """TopK family: rank latents by ``h * ||W_dec||`` (SAELens's default; decoder norms may drift)."""
    l1_coefficient: float = 5.0
    """Standard SAE: weight of the L1 penalty on ``acts * ||W_dec||``."""
    l0_coefficient: float = 1.0
    """JumpReLU: weight of the (straight-through) L0 penalty."""
    jumprelu_init_threshold: float = 0.01
    """JumpReLU: initial threshold."""
    jumprelu_bandwidth: float = 0.05
    """JumpReLU: straight-through estimator bandwidth."""
    sparsity_warm_up_fraction: float = 0.0
    """Fraction of the steps over which the L1 / L0 coefficient ramps up from 0."""
    decoder_init_norm: float | None = 0.1
    """Initial decoder row norm (SAELens's heuristic init); None keeps Kaiming-uniform rows."""
    b_dec_init: str = "mean"
    """``mean``: decoder bias starts at the first batch's mean; ``zeros``: SAELens's start."""
    lr: float = 4e-3
    """Adam learning rate. High for the short CPU budgets this targets (<= a few M tokens: on SmolLM2
    at 300k tokens, 4e-3 reaches explained variance 0.79 where 4e-4 reaches 0.54); SAELens's 3e-4
    suits runs of 100M+ tokens."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas."""
    lr_scheduler: str = "constant"
    """``constant`` or ``cosineannealing`` (to lr / 10) between warm-up and decay."""
    lr_warm_up_fraction: float = 0.0
    """Fraction of the steps with a linear warm-up."""
    lr_decay_fraction: float = 0.2
    """Fraction of the steps, at the end, with a linear decay to 0."""
    max_grad_norm: float | None = 1.0
    """Clip the gradient norm (per SAE) to this; None: no clipping."""
    total_training_tokens: int = 300_000
    """Tokens (kept activation rows) to train on; steps = total // batch."""
    train_batch_size_tokens: int = 4096
    """Rows per SAE step, over all ranks."""
    max_text_length: int = 128
    """Tokens per window of a long document."""
    prepend_bos: bool = True
    """Put BOS first in every window (its row is dropped by the token policy)."""
    exclude_special_tokens: bool = True
    """Drop BOS / EOS / other special-token rows (pad rows are always dropped)."""
    forward_batch_tokens: int = 4096
    """Tokens per training forward pass (windows of one length, padding included)."""
    length_group_documents: int = 8192
    """Documents sorted by token length together when batching: more wastes less on padding (2% at
    8192 on the default corpus, 6% at 2048); 1: no sorting."""
    forward_batch_size: int = 32
    """Windows per forward pass of the evaluation."""
    num_dataloader_workers: int = 0
    """Tokenising worker processes (0: tokenise in the training process)."""
    pin_memory: bool = False
    """Pin loader batches in page-locked memory (GPU runs)."""
    persistent_workers: bool = False
    """Keep loader workers alive between epochs."""
    shuffle_buffer_tokens: int = 65_536
    """Rows shuffled together (a multiple of the batch); 0: no shuffling."""
    forward_dtype: str = "bfloat16"
    """Precision of the model forward pass (autocast for bfloat16 / float16)."""
    sae_dtype: str = "bfloat16"
    """Precision of the SAE step's matmuls (autocast); weights and Adam stay float32."""
    fast_topk: bool = True
    """TopK: use the sparse step (:mod:`sae_core.sparse_topk`) instead of SAELens's dense one."""
    dead_window_tokens: int = 100_000
    """A latent that has not fired for this many tokens is dead (AuxK, dead fraction)."""
    seed: int = 0
    """Seed of the SAE init, window draws, document order and shuffling."""
    checkpoint_every_tokens: int | None = 131_072
    """Checkpoint at the first shuffle-block boundary after every so many tokens (None: end only)."""
    eval_every_tokens: int | None = None
    """Evaluate on held-out windows every so many tokens (None: at the end only)."""
    eval_documents: int = 64
    """Documents held out from training for evaluation (each costs ~4 full forward passes)."""
    log_every_steps: int = 5
    """Steps between training-curve points (and progress-bar updates)."""
    whitening_path: str | None = None
    """Train on whitened activations (``sae_core.whitening.Whitener.load`` path); single hook only."""
    device: str = "cpu"
    """Device of the SAEs (the model keeps its own)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "hook_points", tuple(self.hook_points))
        object.__setattr__(self, "adam_betas", tuple(self.adam_betas))
        problems = []
        if not self.hook_points:
            problems.append("hook_points is empty: name at least one hook point")
        if self.architecture not in SAE_CLASSES:
            problems.append(f"unknown architecture {self.architecture!r}; use one of {sorted(SAE_CLASSES)}")
        if (self.d_sae is None) == (self.expansion_factor is None):
            problems.append("give exactly one of d_sae and expansion_factor")
        if self.train_batch_size_tokens <= 0 or self.total_training_tokens < self.train_batch_size_tokens:
            problems.append(f"total_training_tokens ({self.total_training_tokens}) must be at least one batch "
                            f"(train_batch_size_tokens={self.train_batch_size_tokens} > 0)")
        if self.train_batch_size_tokens > 0 and self.shuffle_buffer_tokens % self.train_batch_size_tokens:
            problems.append(f"shuffle_buffer_tokens ({self.shuffle_buffer_tokens}) must be a multiple of "
                            f"train_batch_size_tokens ({self.train_batch_size_tokens}) (or 0)")
        if min(self.k, self.lr, self.forward_batch_size, self.forward_batch_tokens, self.length_group_documents,
               self.log_every_steps) <= 0:
            problems.append("k, lr, forward_batch_size / _tokens, length_group_documents, log_every_steps must be positive")
        for name in ("lr_warm_up_fraction", "lr_decay_fraction", "sparsity_warm_up_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                problems.append(f"{name} must be in [0, 1]")
        if self.lr_warm_up_fraction + self.lr_decay_fraction > 1:
            problems.append("lr_warm_up_fraction + lr_decay_fraction must not exceed 1")
        if self.lr_scheduler not in ("constant", "cosineannealing"):
            problems.append(f"lr_scheduler must be 'constant' or 'cosineannealing', got {self.lr_scheduler!r}")
        if self.b_dec_init not in ("mean", "zeros"):
            problems.append(f"b_dec_init must be 'mean' or 'zeros', got {self.b_dec_init!r}")
        if self.whitening_path is not None and len(self.hook_points) != 1:
            problems.append("whitening_path whitens one hook point; train one hook per run when whitening")
        for name in ("forward_dtype", "sae_dtype"):
            resolve_dtype(getattr(self, name))
        if problems:
            raise ValueError("invalid TrainingConfig: " + "; ".join(problems))

    @property
    def total_steps(self) -> int:
        """SAE steps of the run (as SAELens counts them: tokens // batch)."""
        return self.total_training_tokens // self.train_batch_size_tokens

    @property
    def batches_per_block(self) -> int:
        """Batches served from one shuffle block."""
        return max(1, self.shuffle_buffer_tokens // self.train_batch_size_tokens)

    def d_sae_for(self, d_in: int) -> int:
        """Latents of the SAE on a hook of width ``d_in``."""
        return self.d_sae if self.d_sae is not None else round(self.expansion_factor * d_in)

    def token_policy(self) -> TokenPolicy:
        """Rows kept for training (pad rows are always dropped)."""
        drop = self.exclude_special_tokens
        return TokenPolicy(exclude_bos=drop, exclude_eos=drop, exclude_special=drop)

    def loader_config(self) -> LoaderConfig:
        """DataLoader knobs (workers, pinning; the training batches come from ``forward_batch_tokens``)."""
        return LoaderConfig(batch_size=self.forward_batch_size, num_dataloader_workers=self.num_dataloader_workers,
                            pin_memory=self.pin_memory, persistent_workers=self.persistent_workers)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class TrainedSAE(NamedTuple):
    """One SAE of a finished run, as written to its folder."""

    hook: str
    folder: Path | None  # None on ranks other than 0
    sae: SAE  # the inference SAE (reloaded from disk on rank 0)
    eval: EvalResult | None
    curve: list[dict[str, Any]]


class TrainingRun(NamedTuple):
    """A finished run: its SAEs and throughput."""

    saes: dict[str, TrainedSAE]
    steps: int
    tokens: int
    seconds: float  # wall time of the steps run in this process (a resumed run counts its own)
    tokens_per_second: float


class HeldOutEvaluator:
    """``sae_core.evaluation.evaluate_sae`` on the windows of held-out documents."""

    def __init__(self, model: HookedTransformer, texts: Any, documents: Sequence[int], cfg: TrainingConfig) -> None:
        dataset = WindowedTextDataset(texts, model.tokenizer, cfg.max_text_length, cfg.seed, cfg.prepend_bos)
        self.loader = make_dataloader(dataset, LoaderConfig(batch_size=cfg.forward_batch_size), documents)
        self.model, self.cfg = model, cfg

    def __call__(self, hook: str, sae: SAE, whitener: Any = None, ablation_mean: Tensor | None = None,
                 max_batches: int | None = None) -> EvalResult:
        return evaluate_sae(self.model, sae, hook, self.loader, self.cfg.token_policy(), self.cfg.forward_dtype,
                            whitener, max_batches=max_batches, ablation_mean=ablation_mean)


Evaluator = Callable[..., EvalResult]


def checkpoint_dir_for(output_root: Path, hooks: Sequence[str]) -> Path:
    """Where a run on ``hooks`` keeps its checkpoints."""
    return Path(output_root) / CHECKPOINTS_DIRNAME / "+".join(hooks)


def _init_b_dec(states: list[SAEState], batch: Chunk, whitener: Any) -> None:
    """Decoder bias = mean of the first batch (over all ranks)."""
    for state in states:
        x = batch[state.hook].to(device=state.sae.b_dec.device, dtype=torch.float32)
        x = whitener.forward(x) if whitener is not None else x
        total = torch.cat([x.double().sum(0), torch.tensor([float(x.shape[0])], dtype=torch.float64)])
        if rank_and_world()[1] > 1:
            torch.distributed.all_reduce(total)
        with torch.no_grad():
            state.sae.b_dec.copy_((total[:-1] / total[-1]).to(state.sae.b_dec.dtype))


def _curve_point(state: SAEState, stats: StepStats, tokens: int, lr: float) -> dict[str, float]:
    return dict(tokens=tokens, loss=stats.loss, l0=stats.l0, explained_variance=stats.explained_variance,
                dead_fraction=float(state.dead_mask().float().mean()), lr=lr)


def _due(tokens: int, every: int | None, batch: int) -> bool:
    """True on the step that crosses a multiple of ``every`` tokens."""
    return every is not None and tokens // every > (tokens - batch) // every


def train_saes(cfg: TrainingConfig, source: ActivationSource, widths: Mapping[str, int], output_root: str | Path,
               *, evaluator: Evaluator | None = None, whitener: Any = None, inputs_whitened: bool = False,
               metadata: Mapping[str, Any] | None = None, resume: bool = True,
               identity: Mapping[str, Any] | None = None) -> TrainingRun:
    """Train one SAE per hook point of ``cfg`` on ``source``; write each to ``output_root/<hook>``.

    ``whitener`` (optional): the SAEs see ``whitener.forward(x)`` (or ``x`` itself when the source
    is already whitened, ``inputs_whitened``) and the whitening is saved beside each SAE.
    ``evaluator(hook, sae, whitener, ablation_mean, max_batches=None)`` scores the final SAEs
    (and intermediate ones every ``eval_every_tokens``). With ``resume``, an interrupted run
    continues from its last checkpoint in ``output_root/checkpoints/<hooks>``, refused when
    ``identity`` (what the rows are made from: model fingerprint, texts) or a setting differs.
    Holds a lock on ``output_root`` throughout: a second training into it is refused.
    """
    check_sizes(cfg, widths)
    lock = _training_lock(Path(output_root))
    try:
        return _train(cfg, source, widths, output_root, evaluator, whitener, inputs_whitened, metadata, resume,
                      {**cfg.to_json(), "identity": json.loads(json.dumps(dict(identity or {}), default=str))})
    finally:
        if lock is not None:
            lock.release()


def _training_lock(output_root: Path) -> FolderLock | None:
    """Rank 0 (the one that writes the outputs) locks ``output_root``; every rank raises if it cannot."""
    rank, world = rank_and_world()
    lock, error = None, None
    if rank == 0:
        try:
            lock = FolderLock(output_root / TRAINING_LOCK, f"{output_root} is being trained into by another training "
                              "(this process or another); wait for it to finish, or choose another output "
                              "folder").acquire()
        except RuntimeError as err:
            error = str(err)
    if world > 1:
        holder = [error]
        torch.distributed.broadcast_object_list(holder, src=0)
        error = holder[0]
    if error is not None:
        raise RuntimeError(error)
    return lock


def _train(cfg: TrainingConfig, source: ActivationSource, widths: Mapping[str, int], output_root: str | Path,
           evaluator: Evaluator | None, whitener: Any, inputs_whitened: bool, metadata: Mapping[str, Any] | None,
           resume: bool, config: dict[str, Any]) -> TrainingRun:
    rank, world = rank_and_world()
    hooks, batch = list(cfg.hook_points), cfg.train_batch_size_tokens
    if batch % world:
        raise ValueError(f"train_batch_size_tokens ({batch}) must divide evenly over {world} ranks")
    if sorted(source.hooks) != sorted(hooks):
        raise ValueError(f"the source streams {source.hooks} but the config trains {hooks}")
    states = [SAEState(h, build_training_sae(cfg, widths[h], h, cfg.seed + i, metadata), cfg) for i, h in enumerate(hooks)]
    shuffler = BlockShuffler(batch // world, cfg.batches_per_block, cfg.shuffle_buffer_tokens > 0, cfg.seed * 1_000_003 + rank)
    directory = checkpoint_dir_for(Path(output_root), hooks)
    start = load_checkpoint(directory, states, shuffler, config) if resume else None
    if start is not None and start.source_digest is not None and hasattr(source, "expected_digest"):
        source.expected_digest = start.source_digest
    step = start.step if start else 0
    curves = start.curves if start else {h: [] for h in hooks}
    feed = whitener if whitener is not None and not inputs_whitened else None
    batches = shuffler.batches(source, cfg.total_steps - step)
    progress = tqdm(total=cfg.total_steps * batch, initial=step * batch, unit="tok", unit_scale=True,
                    desc="train SAE", disable=rank != 0)
    began, first = time.perf_counter(), step
    while step < cfg.total_steps:
        rows = next(batches)
        if step == 0 and cfg.b_dec_init == "mean":
            _init_b_dec(states, rows, feed)
        log = (step + 1) % cfg.log_every_steps == 0 or step + 1 == cfg.total_steps
        tokens = (step + 1) * batch
        for state in states:
            x = rows[state.hook].to(device=cfg.device, dtype=torch.float32)  # the SAE may sit elsewhere than the model
            lr = state.lr
            try:
                stats = state.step(feed.forward(x) if feed is not None else x, step, log)
            except FloatingPointError as err:
                raise FloatingPointError(f"{err} (source position {shuffler.position})") from None
            if stats is not None:
                append_curve(curves[state.hook], **_curve_point(state, stats, tokens, lr))
        step += 1
        progress.update(batch)
        if log:
            last = curves[hooks[0]][-1]
            progress.set_postfix(loss=f"{last['loss']:.4g}", L0=f"{last['l0']:.1f}", EV=f"{last['explained_variance']:.3f}")
        if evaluator is not None and _due(tokens, cfg.eval_every_tokens, batch) and step < cfg.total_steps:
            _evaluate_now(states, evaluator, whitener, curves, tokens)
        if directory and step < cfg.total_steps and shuffler.at_block_boundary() and \
                _due(tokens, cfg.checkpoint_every_tokens, batch * cfg.batches_per_block):
            save_checkpoint(directory, step, tokens, states, shuffler, curves, config, complete=False,
                            source_digest=getattr(source, "digest_state", None))
    progress.close()
    seconds = time.perf_counter() - began
    if not (start and start.complete):
        save_checkpoint(directory, step, step * batch, states, shuffler, curves, config, complete=True,
                        source_digest=getattr(source, "digest_state", None))
    saes = {s.hook: _finish(s, Path(output_root) / s.hook, cfg, curves[s.hook], evaluator, whitener, seconds,
                            world, metadata) for s in states}
    trained = (step - first) * batch
    return TrainingRun(saes, step, step * batch, seconds, trained / seconds if seconds > 0 else float("nan"))


def _evaluate_now(states: list[SAEState], evaluator: Evaluator, whitener: Any,
                  curves: dict[str, list[dict[str, Any]]], tokens: int) -> None:
    """An intermediate evaluation (rank 0) recorded in the curve as ``eval_*`` keys."""
    means = [s.input_mean() for s in states]
    if rank_and_world()[0] != 0:
        return
    for state, mean in zip(states, means, strict=True):
        result = evaluator(state.hook, to_inference_sae(state.sae), whitener, _model_space(mean, whitener))
        append_curve(curves[state.hook], tokens=tokens, eval_explained_variance=result.explained_variance,
                     eval_l0=result.l0, eval_ce_recovered=result.ce_recovered, eval_dead_fraction=result.dead_fraction)


def _model_space(mean: Tensor, whitener: Any) -> Tensor:
    """The mean SAE input mapped back to the model's activation space (float32)."""
    return (whitener.reverse(mean) if whitener is not None else mean).float()


def _finish(state: SAEState, folder: Path, cfg: TrainingConfig, curve: list[dict[str, Any]],
            evaluator: Evaluator | None, whitener: Any, seconds: float, world: int,
            metadata: Mapping[str, Any] | None) -> TrainedSAE:
    """Rank 0: write the SAE folder and evaluate the SAE read back from it."""
    mean = state.input_mean()
    if rank_and_world()[0] != 0:
        return TrainedSAE(state.hook, None, to_inference_sae(state.sae), None, curve)
    write_sae_folder(to_inference_sae(state.sae), folder)
    if whitener is not None:
        whitener.save(folder)
    write_curve(folder, curve)
    atomic_write_json(folder / CONFIG_FILENAME, {
        "config": cfg.to_json(), "hook": state.hook, "d_in": state.sae.cfg.d_in, "d_sae": state.sae.cfg.d_sae,
        "steps": cfg.total_steps, "tokens": cfg.total_steps * cfg.train_batch_size_tokens, "world_size": world,
        "seconds": seconds, "token_policy": cfg.token_policy().to_json(), "metadata": dict(metadata or {})})
    sae = load_sae_folder(folder, device=cfg.device)
    result = None
    if evaluator is not None:
        result = evaluator(state.hook, sae, whitener, _model_space(mean, whitener))
        write_eval(folder, result)
    logger.info("wrote the SAE for %s to %s", state.hook, folder)
    return TrainedSAE(state.hook, folder, sae, result, curve)


def model_source(model: HookedTransformer, dataset: WindowedTextDataset, cfg: TrainingConfig,
                 documents: Sequence[int]) -> ModelActivationSource:
    """The activation stream of ``cfg``'s hook points over windows of ``documents``."""
    return ModelActivationSource(model, dataset, cfg.hook_points, cfg.token_policy(), cfg.forward_dtype, documents,
                                 cfg.forward_batch_tokens, cfg.length_group_documents, cfg.loader_config())


def train_from_model(model: HookedTransformer, texts: Any, cfg: TrainingConfig, output_root: str | Path,
                     metadata: Mapping[str, Any] | None = None, resume: bool = True) -> TrainingRun:
    """Train on activations of ``model`` over windows of ``texts`` (documents held out for evaluation)."""
    check_texts(texts)
    check_against_model(model, cfg.max_text_length, "TrainingConfig")
    train_docs, eval_docs = split_documents(len(texts), cfg.eval_documents, cfg.seed)
    dataset = WindowedTextDataset(texts, model.tokenizer, cfg.max_text_length, cfg.seed, cfg.prepend_bos)
    source = model_source(model, dataset, cfg, train_docs)
    widths = hook_widths(model, cfg.hook_points)
    whitener = None
    if cfg.whitening_path is not None:
        from sae_core.whitening import Whitener

        whitener = Whitener.load(cfg.whitening_path, expected_d=widths[cfg.hook_points[0]])
    info = {"model_name": model.cfg.model_name, "context_size": cfg.max_text_length,
            "prepend_bos": cfg.prepend_bos, **dict(metadata or {})}
    evaluator = HeldOutEvaluator(model, texts, eval_docs, cfg)  # every rank has one; rank 0 runs it
    identity = {"model": model.cfg.model_name, "model_fingerprint": model_fingerprint(model), "widths": widths,
                "texts": {"n_documents": len(texts), "sha256": texts_digest(texts)}}
    return train_saes(cfg, source, widths, output_root, evaluator=evaluator, whitener=whitener,
                      metadata=info, resume=resume, identity=identity)


def train_from_activations(open_chunks: Callable[[], Any], cfg: TrainingConfig, output_root: str | Path, *,
                           whitener: Any = None, inputs_whitened: bool = False, evaluator: Evaluator | None = None,
                           metadata: Mapping[str, Any] | None = None, resume: bool = True) -> TrainingRun:
    """Train on stored rows: ``open_chunks()`` returns an iterable of ``(rows, d)`` tensors (one hook)
    or ``{hook: tensor}`` dicts, e.g. ``lambda: (s.acts for s in run.iter_shards())``; no model needed."""
    source = TensorChunkSource(open_chunks, cfg.hook_points)
    first, _ = next(source.chunks(0))
    widths = {hook: int(t.shape[-1]) for hook, t in first.items()}
    return train_saes(cfg, source, widths, output_root, evaluator=evaluator, whitener=whitener,
                      inputs_whitened=inputs_whitened, metadata=metadata, resume=resume, identity={"widths": widths})
