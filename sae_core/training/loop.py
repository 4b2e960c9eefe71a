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
(``fast_topk``) goes through :func:`sae_core.training.sparse_topk.topk_training_step` (same loss, sparse
backward); the other architectures through SAELens's ``training_forward_pass`` under autocast at
``sae_dtype``. Master weights, gradients and Adam state are float32 (``fused`` Adam: ~10x less
optimiser time on CPU than the default for-each Adam). Several hook points share one forward pass
(one :class:`~sae_core.training.sources.ModelActivationSource` chunk holds every hook's rows), one SAE
and optimiser each. Decoder norms are left to each architecture: TopK ranks by
``h * ||W_dec||`` (``rescale_acts_by_decoder_norm``), Standard / JumpReLU weight their penalties by
the norms, so no renormalisation step is needed. The decoder bias starts at the mean of the first
batch (``b_dec_init="mean"``; SAELens starts at zero): the first reconstructions are the mean, so
training does not spend its first steps learning it.

Sweeps (``TrainingConfig.sweep``): several SAEs per hook point, differing in any SAE or optimiser
knob (k, width, lr, architecture), from the same forward pass. Every trained SAE is a *unit*
(:meth:`~sae_core.config.TrainingConfig.units`) keyed by a unique name, the hook itself or
``<hook>/<sweep name>``: its own state, seed (the config's seed plus the hook's index: the seed a
run without the sweep gives that hook's SAE), curve, folder (``output_root/<unit>``), evaluation and slot in the
checkpoints. The units of a hook see the same rows in the same order, so each ends with the weights
it would have trained alone on that stream (tested). Rejected: one optimiser over concatenated
SAEs (one step for all): the units differ in shape, architecture and schedule, and the step time
is small beside the forward pass that the sweep shares.

Data parallelism (``torchrun``; gloo on CPU): each rank streams its own share of documents / chunks
and trains on ``train_batch_size_tokens / world_size`` rows; after backward one ``all_reduce``
averages the gradients (flattened into one buffer), so every rank applies the same update to the
same weights; firing masks (for dead latents), the BatchTopK threshold and the logged metrics are
reduced too. Explicit rather than ``DistributedDataParallel``: DDP only reduces through its own
``forward``, and the sparse step calls the parameters directly. Rank 0 writes all outputs.

Checkpoints (``checkpoint_dir``, safetensors + JSON, no pickles): SAE parameters and buffers, Adam
state, LR and coefficient schedules, dead-latent counters, the training curve and, per rank, the
shuffle buffer (:class:`~sae_core.training.sources.BlockShuffler`) with its source position and
generator. Periodic checkpoints wait for a shuffle-block boundary (the buffer is then small); one
is also written at the end. ``latest.json`` names the newest complete one and is replaced only
after every rank has written its part; older ones are deleted. A resumed run replays exactly what
an uninterrupted one does, so on CPU both end with bit-identical weights (tested). A resume is
refused when the identity differs (model weight fingerprint, texts digest or activation-stream
digest, widths, any setting outside ``RESUMABLE_CHANGES``); checkpoint files are hashed in
``latest.json`` and checked before they are read; one training at a time holds ``.training.lock``
in the output folder (the store's :class:`~sae_core.files.FolderLock`).

Finite numbers: the loss is checked every step (one scalar; the rows are examined only when it is
not finite, to say whether they or the SAE are to blame), the parameters on log steps and before
every checkpoint (a pass over them is ~6% of a step at d_sae 4608 x 576, 4,096 rows; checking the
rows every step would be another ~5%). Either stops the run with a ``FloatingPointError`` naming
the hook, step and source position, before anything is written.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from sae_lens import SAE
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from sae_core.checks import check_against_model, check_texts, model_fingerprint, texts_digest
from sae_core.config import LoaderConfig, TrainingConfig, to_json
from sae_core.data import PadCollate, WindowedTextDataset, pad_id_of, windowed_dataset
from sae_core.evaluation import EvalResult, append_curve, evaluate_sae, write_curve, write_eval
from sae_core.files import FolderLock, atomic_write_json
from sae_core.sae_folders import load_sae_folder, write_sae_folder, write_split
from sae_core.texts import DocumentSplit
from sae_core.training.sources import (
    ActivationSource,
    BlockShuffler,
    Chunk,
    ModelActivationSource,
    StepProfile,
    TensorChunkSource,
    TokenBudgetBatchSampler,
    hook_widths,
    rank_and_world,
)
from sae_core.training.state import (
    SAEState,
    StepStats,
    build_training_sae,
    check_sizes,
    load_checkpoint,
    save_checkpoint,
    to_inference_sae,
)
from sae_core.whitening import Whitener

__all__ = ["HeldOutEvaluator", "TrainedSAE", "TrainingRun", "checkpoint_dir_for", "model_source",
           "train_from_activations", "train_from_model", "train_saes"]

logger = logging.getLogger(__name__)

CONFIG_FILENAME = "training_config.json"
CHECKPOINTS_DIRNAME = "checkpoints"
TRAINING_LOCK = ".training.lock"
PROFILE_FILENAME = "profile.json"  # where the run's wall time went (StepProfile.summary)
EVAL_STREAM = 7_919  # seeds the eval windows' order apart from every other stream of the run


class TrainedSAE(NamedTuple):
    """One SAE of a finished run, as written to its folder."""

    hook: str
    folder: Path | None  # None on ranks other than 0
    sae: SAE  # the inference SAE (reloaded from disk on rank 0)
    eval: EvalResult | None
    curve: list[dict[str, Any]]
    name: str  # the unit: the hook, or ``<hook>/<sweep name>``


class TrainingRun(NamedTuple):
    """A finished run: its SAEs (by unit name) and throughput."""

    saes: dict[str, TrainedSAE]
    steps: int
    tokens: int
    seconds: float  # wall time of the steps run in this process (a resumed run counts its own)
    tokens_per_second: float
    profile: dict[str, Any] | None = None  # forward / data / step / other (StepProfile.summary), as in profile.json


def drawn_windows(dataset: WindowedTextDataset, documents: Sequence[int], loader: LoaderConfig, n: int,
                  key: tuple[int, ...]) -> tuple[TokenBudgetBatchSampler, list[Any]]:
    """The training sampler over ``documents`` and the first ``n`` of the windows an epoch of it draws
    (one a document, or in proportion to length: the dataset's ``windows_per_document``), in the order
    of the generator ``key``: held-out windows drawn as training draws them (evaluation, analysis)."""
    sampler = TokenBudgetBatchSampler(dataset, documents, loader.training_batch_tokens, loader.length_group_documents,
                                      loader.pack_windows)
    order = np.random.default_rng(key).permutation(len(sampler.items))
    return sampler, [sampler.items[i] for i in order[:n]]


class HeldOutEvaluator:
    """``sae_core.evaluation.evaluate_sae`` on held-out windows drawn as training draws them.

    The windows an epoch would draw from the held-out ``documents`` (one a document, or in
    proportion to length: ``TRAINING['windows_per_document']``) are shuffled with the run's seed;
    the first ``EVALUATION['eval_windows']`` are scored for reconstruction (the first ``ce_windows``
    of them, one window a row, also for CE and KL: those forwards score next-token losses per row,
    which packing would mix; the rest in the loader's batches, packed if it packs). Reconstruction
    is also reported per subset: documents of one window and longer documents.
    """

    def __init__(self, model: HookedTransformer, texts: Any, documents: Sequence[int], cfg: TrainingConfig) -> None:
        dataset = windowed_dataset(texts, model.tokenizer, cfg.windows, windows_per_document=cfg.windows_per_document)
        sampler, items = drawn_windows(dataset, documents, cfg.loader, cfg.evaluation.eval_windows, (cfg.seed, EVAL_STREAM))
        pad, ce = pad_id_of(model.tokenizer), cfg.evaluation.ce_windows
        self.loader = self._loader(dataset, sampler.restricted(items[:ce], pack=False), pad)
        self.reconstruction_loader = self._loader(dataset, sampler.restricted(items[ce:]), pad)
        room = dataset.max_text_length - int(dataset.prepend_bos)
        long = {d for d in sampler.documents if sampler.tokens[d] > room}
        self.subsets = {f"documents of one window (<= {room} tokens)": sorted(set(sampler.documents) - long),
                        f"longer documents (> {room} tokens)": sorted(long)}
        self.n_windows = len(items)
        self.model, self.cfg = model, cfg

    @staticmethod
    def _loader(dataset: WindowedTextDataset, sampler: TokenBudgetBatchSampler, pad: int) -> DataLoader:
        return DataLoader(dataset, batch_sampler=sampler.batches(0), collate_fn=PadCollate(pad, sampler.pack))

    def __call__(self, hook: str, sae: SAE, whitener: Any = None, ablation_mean: Tensor | None = None) -> EvalResult:
        return evaluate_sae(self.model, sae, hook, self.loader, self.cfg.policy, self.cfg.forward.dtype,
                            whitener, ablation_mean=ablation_mean, reconstruction_batches=self.reconstruction_loader,
                            subsets=self.subsets, compile=self.cfg.forward.compile)


Evaluator = Callable[..., EvalResult]


def checkpoint_dir_for(output_root: Path, hooks: Sequence[str]) -> Path:
    """Where a run on ``hooks`` keeps its checkpoints."""
    return Path(output_root) / CHECKPOINTS_DIRNAME / "+".join(hooks)


def _init_b_dec(states: list[SAEState], batch: Chunk, whitener: Any) -> None:
    """Decoder bias = mean of the first batch (over all ranks), for the units that start there."""
    for state in states:
        if state.cfg.sae.b_dec_init != "mean":
            continue
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
    """Train the units of ``cfg`` (one SAE per hook point, or per hook and sweep entry) on ``source``;
    write each to ``output_root/<unit>`` (``<hook>`` or ``<hook>/<sweep name>``).

    ``whitener`` (optional): the SAEs see ``whitener.forward(x)`` (or ``x`` itself when the source
    is already whitened, ``inputs_whitened``) and the whitening is saved beside each SAE.
    ``evaluator(hook, sae, whitener, ablation_mean)`` scores the final SAEs
    (and intermediate ones every ``eval_every_tokens``). With ``resume``, an interrupted run
    continues from its last checkpoint in ``output_root/checkpoints/<hooks>``, refused when
    ``identity`` (what the rows are made from: model fingerprint, texts) or a setting differs.
    Holds a lock on ``output_root`` throughout: a second training into it is refused.
    """
    check_sizes(cfg, widths)
    lock = _training_lock(Path(output_root))
    try:
        return _train(cfg, source, widths, output_root, evaluator, whitener, inputs_whitened, metadata, resume,
                      {**to_json(cfg), "identity": json.loads(json.dumps(dict(identity or {}), default=str))})
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
    states = [SAEState(unit.hook, build_training_sae(unit.config, widths[unit.hook], unit.hook,
                                                     cfg.seed + hooks.index(unit.hook), metadata), unit.config, unit.name)
              for unit in cfg.units()]
    shuffler = BlockShuffler(batch // world, cfg.batches_per_block, cfg.shuffle_buffer_tokens > 0, cfg.seed * 1_000_003 + rank,
                             cfg.buffer_passes, progress=rank == 0)
    directory = checkpoint_dir_for(Path(output_root), hooks)
    start = load_checkpoint(directory, states, shuffler, config) if resume else None
    if start is not None and start.source_digest is not None and hasattr(source, "expected_digest"):
        source.expected_digest = start.source_digest
    step = start.step if start else 0
    curves = start.curves if start else {s.name: [] for s in states}
    feed = whitener if whitener is not None and not inputs_whitened else None
    batches = shuffler.batches(source, cfg.total_steps - step)
    progress = tqdm(total=cfg.total_steps * batch, initial=step * batch, unit="tok", unit_scale=True,
                    desc="train SAE", disable=rank != 0)
    profile = StepProfile.of(source)
    began, first = time.perf_counter(), step
    while step < cfg.total_steps:
        rows = next(batches)
        if step == 0:
            _init_b_dec(states, rows, feed)
        log = (step + 1) % cfg.log_every_steps == 0 or step + 1 == cfg.total_steps
        tokens = (step + 1) * batch
        with profile.timed("step"):
            _step_units(states, rows, feed, step, log, tokens, curves, shuffler)
        step += 1
        progress.update(batch)
        if log:
            last = curves[states[0].name][-1]
            progress.set_postfix(loss=f"{last['loss']:.4g}", L0=f"{last['l0']:.1f}", EV=f"{last['explained_variance']:.3f}")
        if evaluator is not None and _due(tokens, cfg.evaluation.eval_every_tokens, batch) and step < cfg.total_steps:
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
    saes = {s.name: _finish(s, Path(output_root) / s.name, curves[s.name], evaluator, whitener, seconds,
                            world, metadata) for s in states}
    trained, summary = (step - first) * batch, _write_profile(Path(output_root), profile.summary(seconds, step - first))
    return TrainingRun(saes, step, step * batch, seconds, trained / seconds if seconds > 0 else float("nan"), summary)


def _write_profile(output_root: Path, summary: dict[str, Any]) -> dict[str, Any]:
    """Rank 0 writes where the run's wall time went to ``output_root/profile.json``."""
    if rank_and_world()[0] == 0:
        atomic_write_json(output_root / PROFILE_FILENAME, summary)
    return summary


def _step_units(states: list[SAEState], rows: Chunk, feed: Any, step: int, log: bool, tokens: int,
                curves: dict[str, list[dict[str, Any]]], shuffler: BlockShuffler) -> None:
    """One step of every unit on this batch; the units of a hook share its rows (moved and whitened once)."""
    inputs: dict[str, Tensor] = {}
    for state in states:
        if state.hook not in inputs:
            x = rows[state.hook].to(device=state.cfg.device, dtype=torch.float32)  # the SAE may sit elsewhere than the model
            inputs[state.hook] = feed.forward(x) if feed is not None else x
        lr = state.lr
        try:
            stats = state.step(inputs[state.hook], step, log)
        except FloatingPointError as err:
            raise FloatingPointError(f"{err} (source position {shuffler.position})") from None
        if stats is not None:
            append_curve(curves[state.name], **_curve_point(state, stats, tokens, lr))


def _evaluate_now(states: list[SAEState], evaluator: Evaluator, whitener: Any,
                  curves: dict[str, list[dict[str, Any]]], tokens: int) -> None:
    """An intermediate evaluation (rank 0) recorded in the curve as ``eval_*`` keys."""
    means = [s.input_mean() for s in states]
    if rank_and_world()[0] != 0:
        return
    for state, mean in zip(states, means, strict=True):
        result = evaluator(state.hook, to_inference_sae(state.sae), whitener, _model_space(mean, whitener))
        append_curve(curves[state.name], tokens=tokens, eval_explained_variance=result.explained_variance,
                     eval_l0=result.l0, eval_ce_recovered=result.ce_recovered, eval_dead_fraction=result.dead_fraction)


def _model_space(mean: Tensor, whitener: Any) -> Tensor:
    """The mean SAE input mapped back to the model's activation space (float32)."""
    return (whitener.reverse(mean) if whitener is not None else mean).float()


def _finish(state: SAEState, folder: Path, curve: list[dict[str, Any]], evaluator: Evaluator | None,
            whitener: Any, seconds: float, world: int, metadata: Mapping[str, Any] | None) -> TrainedSAE:
    """Rank 0: write the unit's SAE folder (with its own config) and evaluate the SAE read back from it."""
    mean, cfg = state.input_mean(), state.cfg
    if rank_and_world()[0] != 0:
        return TrainedSAE(state.hook, None, to_inference_sae(state.sae), None, curve, state.name)
    write_sae_folder(to_inference_sae(state.sae), folder, whitener)
    write_curve(folder, curve)
    atomic_write_json(folder / CONFIG_FILENAME, {
        "config": to_json(cfg), "hook": state.hook, "unit": state.name, "d_in": state.sae.cfg.d_in, "d_sae": state.sae.cfg.d_sae,
        "steps": cfg.total_steps, "tokens": cfg.total_steps * cfg.train_batch_size_tokens, "world_size": world,
        "seconds": seconds, "token_policy": cfg.policy.to_json(), "metadata": dict(metadata or {})})
    sae, _ = load_sae_folder(folder, cfg.device)
    result = None
    if evaluator is not None:
        result = evaluator(state.hook, sae, whitener, _model_space(mean, whitener))
        write_eval(folder, result)
    logger.info("wrote the SAE %s to %s", state.name, folder)
    return TrainedSAE(state.hook, folder, sae, result, curve, state.name)


def model_source(model: HookedTransformer, dataset: WindowedTextDataset, cfg: TrainingConfig,
                 documents: Sequence[int]) -> ModelActivationSource:
    """The activation stream of ``cfg``'s hook points over windows of ``documents``."""
    return ModelActivationSource(model, dataset, cfg.hook_points, cfg.policy, cfg.forward.dtype, documents,
                                 cfg.loader.training_batch_tokens, cfg.loader.length_group_documents, cfg.loader,
                                 cfg.forward.compile)


def train_from_model(model: HookedTransformer, texts: Any, cfg: TrainingConfig, output_root: str | Path,
                     metadata: Mapping[str, Any] | None = None, resume: bool = True) -> TrainingRun:
    """Train on activations of ``model`` over windows of ``texts``, holding out the run's split.

    The split (:class:`~sae_core.texts.DocumentSplit`: ``EVALUATION['held_out_documents']`` seeded
    documents, length-stratified by default) is saved as ``split.json`` in every SAE folder; the
    evaluation scores windows drawn from them as training draws windows (:class:`HeldOutEvaluator`),
    and the analysis reads the split back, so no later stage sees a training document.
    """
    check_texts(texts, cfg.windows.text_field)
    check_against_model(model, cfg.windows.max_text_length, "TrainingConfig")
    split = DocumentSplit.of(texts, cfg.evaluation.held_out_documents, cfg.seed, cfg.windows.text_field,
                             cfg.evaluation.split)
    dataset = windowed_dataset(texts, model.tokenizer, cfg.windows, windows_per_document=cfg.windows_per_document)
    source = model_source(model, dataset, cfg, split.train)
    widths = hook_widths(model, cfg.hook_points)
    whitener = None
    if cfg.whitening_path is not None:
        whitener = Whitener.load(cfg.whitening_path, expected_d=widths[cfg.hook_points[0]], device=cfg.device)
    info = {"model_name": model.cfg.model_name, "context_size": cfg.windows.max_text_length,
            "prepend_bos": cfg.windows.prepend_bos, **dict(metadata or {})}
    evaluator = HeldOutEvaluator(model, texts, split.held_out, cfg)  # every rank has one; rank 0 runs it
    identity = {"model": model.cfg.model_name, "model_fingerprint": model_fingerprint(model), "widths": widths,
                "texts": {"n_documents": len(texts), "sha256": texts_digest(texts, cfg.windows.text_field)}}
    run = train_saes(cfg, source, widths, output_root, evaluator=evaluator, whitener=whitener,
                     metadata=info, resume=resume, identity=identity)
    for trained in run.saes.values():
        if trained.folder is not None:
            write_split(trained.folder, split)
    return run


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


def init_distributed() -> tuple[int, int]:
    """Join the ``torchrun`` process group when launched by it (gloo on CPU); returns (rank, world)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
    return rank_and_world()
