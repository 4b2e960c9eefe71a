"""The per-SAE training state (optimiser, schedules, dead latents) and exact-resume checkpoints.

:func:`build_training_sae` makes a SAELens training SAE from a :class:`~sae_core.training.TrainingConfig`
(seeded, without touching the caller's RNG); :func:`to_inference_sae` gives the inference SAE that
SAELens would save (e.g. TopK with the decoder norms folded in, BatchTopK as JumpReLU).
:class:`SAEState` holds one SAELens training SAE with everything that changes while it trains:
fused Adam (float32 state), SAELens's LR schedule and coefficient warm-ups, tokens since each
latent last fired (the dead-latent rule behind AuxK and the dead fraction) and the running sum of
its inputs (the mean-ablation baseline of the evaluation). :meth:`SAEState.step` is one update:
forward (the sparse TopK step or SAELens's ``training_forward_pass``), backward, gradient
all-reduce across ranks, clipping, Adam, schedules, counters.

Checkpoints are safetensors + JSON (no pickles): ``step-<n>/sae-<i>.safetensors`` (parameters,
buffers, Adam moments, counters), ``step-<n>/data-rank<r>.safetensors`` (each rank's shuffle
buffer, generator and source position, plus the global torch RNG), ``step-<n>/state.json``
(steps, tokens, config, schedules, curves). ``latest.json`` is the commit point: it is replaced
(atomically) only after every rank has written its files, then older ``step-*`` folders go.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from sae_lens import SAE
from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
from sae_lens.saes.matryoshka_batchtopk_sae import (
    MatryoshkaBatchTopKTrainingSAE,
    MatryoshkaBatchTopKTrainingSAEConfig,
)
from sae_lens.saes.sae import SAEMetadata, TrainingSAE, TrainStepInput
from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.training.optim import CoefficientScheduler, get_lr_scheduler
from safetensors.torch import load_file, save_file
from torch import Tensor

from sae_core.activations import forward_context
from sae_core.checks import differences
from sae_core.config import TrainingConfig
from sae_core.files import atomic_path, atomic_write_json, file_sha256, read_json
from sae_core.model_loading import resolve_dtype
from sae_core.training.sources import BlockShuffler, rank_and_world
from sae_core.training.sparse_topk import topk_training_step

logger = logging.getLogger(__name__)

LATEST_FILENAME = "latest.json"
STATE_FILENAME = "state.json"
# Fields that may change between an interrupted run and its resumption.
RESUMABLE_CHANGES = frozenset({"checkpoint_every_tokens", "eval_every_tokens", "log_every_steps",
                               "num_dataloader_workers", "pin_memory", "persistent_workers", "compile", "extra"})

SAE_CLASSES = {"topk": (TopKTrainingSAE, TopKTrainingSAEConfig),
               "batchtopk": (BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig),
               "jumprelu": (JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig),
               "standard": (StandardTrainingSAE, StandardTrainingSAEConfig),
               "matryoshka_batchtopk": (MatryoshkaBatchTopKTrainingSAE, MatryoshkaBatchTopKTrainingSAEConfig)}
TOPK_FAMILY = ("topk", "batchtopk", "matryoshka_batchtopk")


def build_training_sae(cfg: TrainingConfig, d_in: int, hook: str, seed: int,
                       metadata: Mapping[str, Any] | None = None) -> TrainingSAE:
    """A fresh SAELens training SAE for ``hook`` (float32 master weights, seeded init)."""
    sae_class, cfg_class = SAE_CLASSES[cfg.sae.architecture]
    warm_up = round(cfg.optimizer.sparsity_warm_up_fraction * cfg.total_steps)
    extra: dict[str, Any] = {
        "topk": dict(k=cfg.sae.k, aux_loss_coefficient=cfg.sae.aux_loss_coefficient,
                     rescale_acts_by_decoder_norm=cfg.sae.rescale_acts_by_decoder_norm),
        "batchtopk": dict(k=cfg.sae.k, aux_loss_coefficient=cfg.sae.aux_loss_coefficient,
                          rescale_acts_by_decoder_norm=cfg.sae.rescale_acts_by_decoder_norm),
        "jumprelu": dict(l0_coefficient=cfg.sae.l0_coefficient, l0_warm_up_steps=warm_up,
                         jumprelu_init_threshold=cfg.sae.jumprelu_init_threshold,
                         jumprelu_bandwidth=cfg.sae.jumprelu_bandwidth),
        "standard": dict(l1_coefficient=cfg.sae.l1_coefficient, l1_warm_up_steps=warm_up),
        "matryoshka_batchtopk": dict(k=cfg.sae.k, aux_loss_coefficient=cfg.sae.aux_loss_coefficient,
                                     rescale_acts_by_decoder_norm=cfg.sae.rescale_acts_by_decoder_norm,
                                     matryoshka_widths=cfg.sae.matryoshka_widths_for(d_in),
                                     use_matryoshka_aux_loss=cfg.sae.use_matryoshka_aux_loss),
    }[cfg.sae.architecture]
    sae_cfg = cfg_class(d_in=d_in, d_sae=cfg.sae.d_sae_for(d_in), dtype="float32", device=cfg.device,
                        decoder_init_norm=cfg.sae.decoder_init_norm,
                        metadata=SAEMetadata(hook_name=hook, **dict(metadata or {})), **extra)
    with torch.random.fork_rng():  # seeded init without touching the caller's RNG
        torch.manual_seed(seed)
        return sae_class(sae_cfg)


def check_sizes(cfg: TrainingConfig, widths: Mapping[str, int]) -> None:
    """Sizes only the hook widths can check, per unit: ``d_sae >= 1``, ``1 <= k <= d_sae`` for the TopK
    family, Matryoshka levels within d_sae."""
    for unit in cfg.units():
        d_in, sae = widths[unit.hook], unit.config.sae
        d_sae = sae.d_sae_for(d_in)
        if d_sae < 1:
            raise ValueError(f"TrainingConfig: the SAE {unit.name} (d_in={d_in}) would have d_sae={d_sae}; "
                             "raise d_sae or expansion_factor")
        if sae.architecture in TOPK_FAMILY and not 1 <= sae.k <= d_sae:
            raise ValueError(f"TrainingConfig: k={sae.k} active latents do not fit the d_sae={d_sae} latents of the "
                             f"SAE {unit.name} (d_in={d_in}); set 1 <= k <= {d_sae}, or raise d_sae / expansion_factor")
        if sae.architecture == "matryoshka_batchtopk" and sae.matryoshka_widths and sae.matryoshka_widths[-1] > d_sae:
            raise ValueError(f"TrainingConfig: the last matryoshka width ({sae.matryoshka_widths[-1]}) of the SAE "
                             f"{unit.name} exceeds its d_sae ({d_sae}); lower it or raise d_sae / expansion_factor")


def to_inference_sae(sae: TrainingSAE) -> SAE:
    """The inference SAE that ``save_inference_model`` would write, built in memory."""
    state = {name: t.detach().clone() for name, t in sae.state_dict().items()}
    sae.process_state_dict_for_saving_inference(state)
    inference = SAE.from_dict(sae.cfg.get_inference_sae_cfg_dict())
    inference.load_state_dict(state)
    return inference.eval()


def _explain_non_finite_loss(hook: str, step: int, loss: float, x: Tensor) -> None:
    """Raise ``FloatingPointError`` naming why the loss of ``step`` is not finite: the rows, or the SAE."""
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        raise FloatingPointError(f"the training rows of {hook} for step {step} (batch {step}) hold {int(bad.sum())} "
                                 f"NaN / inf value(s) (first in row {int(bad.any(-1).nonzero()[0])}); fix or drop them "
                                 "at the source. Checkpoints are unchanged")
    raise FloatingPointError(f"the loss of the SAE for {hook} is {loss} at step {step} (batch {step}, largest |value| "
                             f"{float(x.abs().max()):.3g}): float32 overflows on rows this large, or the weights "
                             "diverged; scale or whiten the activations, or lower lr. Checkpoints are unchanged")


class StepStats(NamedTuple):
    """One step's metrics over all ranks' rows (float64 sums), for the training curve."""

    loss: float
    l0: float
    explained_variance: float


class SAEState:
    """One SAE with its optimiser, schedules and dead-latent counters."""

    def __init__(self, hook: str, sae: TrainingSAE, cfg: TrainingConfig, name: str | None = None) -> None:
        self.hook, self.sae, self.cfg = hook, sae, cfg
        self.name = name or hook  # the unit: the hook, or ``<hook>/<sweep name>``
        self.optimizer = torch.optim.Adam(sae.parameters(), lr=cfg.optimizer.lr, betas=cfg.optimizer.adam_betas,
                                          fused=torch.device(cfg.device).type in ("cpu", "cuda"))
        steps = cfg.total_steps
        self.scheduler = get_lr_scheduler(
            cfg.optimizer.lr_scheduler, self.optimizer, training_steps=steps, lr=cfg.optimizer.lr,
            warm_up_steps=round(cfg.optimizer.lr_warm_up_fraction * steps), decay_steps=round(cfg.optimizer.lr_decay_fraction * steps),
            lr_end=cfg.optimizer.lr if cfg.optimizer.lr_scheduler == "constant" else cfg.optimizer.lr / 10, num_cycles=1)
        self.coefficients = {name: CoefficientScheduler(getattr(c, "warm_up_steps", 0), getattr(c, "value", c))
                             for name, c in sae.get_coefficients().items()}
        device = torch.device(cfg.device)
        self.since_fired = torch.zeros(sae.cfg.d_sae, dtype=torch.long, device=device)  # tokens since each latent fired
        self.input_sum = torch.zeros(sae.cfg.d_in, dtype=torch.float64, device=device)  # for the mean-ablation baseline
        self.rows_seen = 0  # this rank's rows
        self.sparse = cfg.sae.architecture == "topk" and cfg.sae.fast_topk

    def dead_mask(self) -> Tensor:
        """Latents that have not fired for ``dead_window_tokens`` tokens."""
        return self.since_fired > self.cfg.dead_window_tokens

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def _forward(self, x: Tensor, step: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Loss, reconstruction, firing mask (d_sae,) and number of active (row, latent) pairs."""
        dtype = resolve_dtype(self.cfg.optimizer.sae_dtype)
        if self.sparse:
            out = topk_training_step(self.sae, x, self.dead_mask(), dtype)
            active = out.acts > 0
            fired = torch.zeros(self.sae.cfg.d_sae, dtype=torch.bool, device=x.device)
            fired.index_fill_(0, out.indices[active], True)
            return out.loss, out.sae_out, fired, active.sum()
        with forward_context(self.cfg.device, dtype):
            out = self.sae.training_forward_pass(TrainStepInput(
                sae_in=x, coefficients={n: c.value for n, c in self.coefficients.items()},
                dead_neuron_mask=self.dead_mask(), n_training_steps=step, is_logging_step=False))
        active = out.feature_acts != 0
        return out.loss, out.sae_out.detach().float(), active.any(0), active.sum()

    def step(self, x: Tensor, step: int, log: bool) -> StepStats | None:
        """Forward, backward, all-reduce, clip, Adam, schedules, counters; metrics if ``log``."""
        _, world = rank_and_world()
        self.sae.train()
        loss, sae_out, fired, active = self._forward(x, step)
        if not bool(torch.isfinite(loss)):  # one scalar per step; the rows are looked at only then
            _explain_non_finite_loss(self.name, step, float(loss.detach()), x)
        loss.backward()
        params = [p for p in self.sae.parameters() if p.requires_grad]
        if world > 1:
            all_reduce_mean_grads(params, world)
            torch.distributed.all_reduce(fired, op=torch.distributed.ReduceOp.MAX)
        if self.cfg.optimizer.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, self.cfg.optimizer.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if log:
            self.check_parameters(step)
        self.scheduler.step()
        for scheduler in self.coefficients.values():
            scheduler.step()
        if world > 1 and isinstance(self.sae, BatchTopKTrainingSAE):
            torch.distributed.all_reduce(self.sae.topk_threshold)  # ranks saw different batches
            self.sae.topk_threshold /= world
        self.since_fired += x.shape[0] * world
        self.since_fired[fired] = 0
        self.input_sum += x.double().sum(0)
        self.rows_seen += x.shape[0]
        return step_stats(loss.detach(), x, sae_out, active, world) if log else None

    def check_parameters(self, step: int) -> None:
        """Raise if an update made a parameter non-finite (run on log steps and before every save:
        a pass over the parameters costs about a tenth of a step, and the loss shows it next step)."""
        if not bool(torch.stack([torch.isfinite(p).all() for p in self.sae.parameters()]).all()):
            raise FloatingPointError(f"the parameters of the SAE for {self.name} are non-finite after the update of "
                                     f"step {step} (batch {step}; lr={self.lr}); lower lr or max_grad_norm. "
                                     "Checkpoints are unchanged")

    def input_mean(self) -> Tensor:
        """Mean SAE input over every rank's rows so far (float64)."""
        total, rows = self.input_sum.clone(), torch.tensor(float(self.rows_seen), dtype=torch.float64)
        if rank_and_world()[1] > 1:
            torch.distributed.all_reduce(total)
            torch.distributed.all_reduce(rows)
        return total / rows.clamp(min=1)

    def state_tensors(self) -> dict[str, Tensor]:
        tensors = {f"sae.{k}": v.detach().contiguous() for k, v in self.sae.state_dict().items()}
        for index, state in self.optimizer.state_dict()["state"].items():
            tensors.update({f"optim.{index}.{k}": v.contiguous() for k, v in state.items()})
        tensors.update(since_fired=self.since_fired, input_sum=self.input_sum)
        return tensors

    def state_json(self) -> dict[str, Any]:
        return {"param_groups": self.optimizer.state_dict()["param_groups"], "scheduler": self.scheduler.state_dict(),
                "coefficients": {n: c.state_dict() for n, c in self.coefficients.items()}, "rows_seen": self.rows_seen}

    def load(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        self.sae.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("sae.")})
        optim: dict[int, dict[str, Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, index, name = key.split(".", 2)
                optim.setdefault(int(index), {})[name] = value
        self.optimizer.load_state_dict({"state": optim, "param_groups": meta["param_groups"]})
        self.scheduler.load_state_dict(meta["scheduler"])
        for name, state in meta["coefficients"].items():
            self.coefficients[name].load_state_dict(state)
        self.since_fired, self.input_sum = tensors["since_fired"].clone(), tensors["input_sum"].clone()
        self.rows_seen = int(meta["rows_seen"])


def all_reduce_mean_grads(params: list[torch.nn.Parameter], world: int) -> None:
    """Average gradients over ranks with one collective (flattened into one buffer)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= world
    offset = 0
    for p in params:
        p.grad = flat[offset:offset + p.numel()].view_as(p)
        offset += p.numel()


def step_stats(loss: Tensor, x: Tensor, sae_out: Tensor, active: Tensor, world: int) -> StepStats:
    """Loss, L0 and explained variance (1 - SSE / total variance about the batch mean) of one step."""
    x64 = x.double()
    sums = torch.stack([loss.double() * x.shape[0], (x64 - sae_out.double()).pow(2).sum(), x64.pow(2).sum(),
                        active.double(), torch.tensor(float(x.shape[0]), dtype=torch.float64)])
    column = x64.sum(0)
    if world > 1:
        torch.distributed.all_reduce(sums)
        torch.distributed.all_reduce(column)
    loss_sum, residual, square, l0_sum, rows = sums.tolist()
    variance = square - column.pow(2).sum().item() / rows
    return StepStats(loss_sum / rows, l0_sum / rows, 1 - residual / variance if variance > 0 else float("nan"))


class Checkpoint(NamedTuple):
    """Where a loaded checkpoint left off."""

    step: int
    tokens: int
    complete: bool
    curves: dict[str, list[dict[str, Any]]]
    source_digest: dict[str, Any] | None = None  # this rank's activation stream up to the checkpoint


def _save_tensors(path: Path, tensors: dict[str, Tensor]) -> None:
    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))


def _barrier() -> None:
    if rank_and_world()[1] > 1:
        torch.distributed.barrier()


def save_checkpoint(directory: Path, step: int, tokens: int, states: list[SAEState], shuffler: BlockShuffler,
                    curves: dict[str, list[dict[str, Any]]], config: dict[str, Any], complete: bool,
                    source_digest: dict[str, Any] | None = None) -> Path:
    """Write this rank's part of checkpoint ``step``; rank 0 commits it once every rank is done.

    ``latest.json`` (the commit) records the size and SHA-256 of every file of the folder, so a
    resume reads nothing that was damaged since; ``source_digest`` (this rank's stream so far)
    lets a resume refuse another activation stream.
    """
    rank, world = rank_and_world()
    for state in states:
        state.check_parameters(step - 1)
    folder = directory / f"step-{step:08d}"
    folder.mkdir(parents=True, exist_ok=True)
    data = {**shuffler.state_tensors(), "torch_rng": torch.get_rng_state()}
    if source_digest is not None:
        data.update({"source_digest.items": torch.tensor(source_digest["items"]),
                     "source_digest.sha256": torch.frombuffer(bytearray.fromhex(source_digest["sha256"]), dtype=torch.uint8)})
    _save_tensors(folder / f"data-rank{rank}.safetensors", data)
    if rank == 0:
        for index, state in enumerate(states):
            _save_tensors(folder / f"sae-{index}.safetensors", state.state_tensors())
        atomic_write_json(folder / STATE_FILENAME, {
            "step": step, "tokens": tokens, "complete": complete, "world_size": world, "config": config,
            "hooks": [s.hook for s in states], "units": [s.name for s in states], "saes": [s.state_json() for s in states], "curves": curves})
    _barrier()
    if rank == 0:
        files = {p.name: {"nbytes": p.stat().st_size, "sha256": file_sha256(p)}
                 for p in sorted(folder.iterdir()) if not p.name.startswith(".")}
        atomic_write_json(directory / LATEST_FILENAME, {"folder": folder.name, "step": step, "complete": complete,
                                                        "files": files})
        for old in directory.glob("step-*"):
            if old != folder:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    if rank == 0:
        logger.info("checkpoint at step %d (%d tokens) in %s", step, tokens, folder)
    return folder


def _check_compatible(saved: dict[str, Any], config: dict[str, Any], world: int, folder: Path) -> None:
    config = json.loads(json.dumps(config))  # tuples as lists, as they were saved
    changed = [k for k in differences(saved["config"], config)
               if k.split(":")[0].rsplit(".", 1)[-1] not in RESUMABLE_CHANGES]
    if changed:
        raise ValueError(f"the checkpoint in {folder} was written for other inputs or settings ({'; '.join(changed)}); "
                         "restore them to resume, or delete the checkpoint folder (or pass resume=False) to start over")
    if saved["world_size"] != world:
        raise ValueError(f"the checkpoint in {folder} was written by {saved['world_size']} ranks, this run has "
                         f"{world}; resume with the same number of processes")


def _read_checked(folder: Path, name: str, files: dict[str, Any]) -> Path:
    """``folder / name`` after checking its size and SHA-256 against ``latest.json``."""
    path, fix = folder / name, "delete the checkpoint folder (or pass resume=False) to start over"
    record = files.get(name)
    if record is None:
        raise ValueError(f"{folder.parent / LATEST_FILENAME} records no hash for {name}; it was written by an "
                         f"older sae_core or damaged: {fix}")
    if not path.exists() or path.stat().st_size != record["nbytes"] or file_sha256(path) != record["sha256"]:
        state = "missing" if not path.exists() else "damaged (its size or SHA-256 differs from the recorded one)"
        raise ValueError(f"checkpoint file {path} is {state}; {fix}")
    return path


def load_checkpoint(directory: Path, states: list[SAEState], shuffler: BlockShuffler,
                    config: dict[str, Any]) -> Checkpoint | None:
    """Restore the newest committed checkpoint into ``states`` and ``shuffler`` (None if there is none).

    Every file is checked against the sizes and hashes in ``latest.json`` before it is read.
    """
    pointer = directory / LATEST_FILENAME
    if not pointer.exists():
        return None
    rank, world = rank_and_world()
    latest = read_json(pointer)
    if not isinstance(latest, dict) or "folder" not in latest:
        raise ValueError(f"{pointer} is not a checkpoint pointer; delete {directory} to start over")
    folder, files = directory / str(latest["folder"]), latest.get("files", {})
    if rank == 0:  # temp files of writes cut short (the committed files are named by latest.json)
        for leftover in [*directory.glob(".*.tmp"), *folder.glob(".*.tmp")]:
            logger.warning("removing %s, left over by an interrupted write", leftover)
            leftover.unlink(missing_ok=True)
    saved = read_json(_read_checked(folder, STATE_FILENAME, files))
    _check_compatible(saved, config, world, folder)
    units = saved.get("units", saved["hooks"])  # keyed by unit; older checkpoints: one unit per hook
    for state in states:
        if state.name not in units:
            raise ValueError(f"the checkpoint in {folder} holds no SAE {state.name} (it holds {', '.join(units)}); "
                             "delete the checkpoint folder (or pass resume=False) to start over")
        index = units.index(state.name)
        state.load(load_file(str(_read_checked(folder, f"sae-{index}.safetensors", files))), saved["saes"][index])
    data = load_file(str(_read_checked(folder, f"data-rank{rank}.safetensors", files)))
    torch.set_rng_state(data.pop("torch_rng"))
    digest = None
    if "source_digest.items" in data:
        digest = {"items": int(data.pop("source_digest.items")), "sha256": bytes(data.pop("source_digest.sha256").tolist()).hex()}
    shuffler.load_state_tensors(data)
    logger.info("resuming from %s (step %d, %d tokens)", folder, saved["step"], saved["tokens"])
    return Checkpoint(saved["step"], saved["tokens"], saved["complete"], saved["curves"], digest)
