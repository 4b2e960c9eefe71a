"""Evaluate an SAE on held-out windows: reconstruction, sparsity and the spliced model's loss.

Definitions (all over the *kept rows* of the eval set: ``attention_mask == 1`` and not excluded
by the :class:`~sae_core.activations.TokenPolicy`; x is the activation at the hook, x_hat its
reconstruction ``reverse(decode(encode(forward(x))))``, always compared in the model's own space):

* ``mse`` = (1/N) sum_rows ||x - x_hat||^2: the per-token squared error (summed over d_in,
  averaged over rows: SAELens' ``mse``); ``mse_per_element`` = ``mse / d_in`` (torch's
  ``MSELoss``, what most training logs print).
* ``explained_variance`` = 1 - FVU, FVU = sum_rows ||x - x_hat||^2 / sum_rows ||x - mean(x)||^2,
  mean(x) over all kept rows of the eval set (against the mean: SAELens' convention, and R^2).
  Accumulated in float64 while streaming, with SAELens' ``ExplainedVarianceCalculator`` fed
  float64 rows (so no float32 sum is ever formed).
* ``explained_variance_zero`` = 1 - sum_rows ||x - x_hat||^2 / sum_rows ||x||^2 (against zero,
  as some tools print it). A residual stream has a large mean, so this one is much higher: an
  SAE that outputs only the mean scores 0 against the mean but ||mean||^2 / E||x||^2 against zero.
* ``normalized_mse`` = (1/N) sum_rows ||x - x_hat||^2 / ||x||^2 (per-row normalised, then
  averaged: OpenAI's ``normalized_mean_squared_error``; rows with x = 0 are left out).
* ``conventions`` names each of these in ``eval.json`` (:data:`METRIC_CONVENTIONS`), so numbers can
  be compared across libraries.
* ``l0`` = mean over rows of #{j : f_j(x) != 0}; ``firing_counts[j]`` = #rows with f_j(x) != 0;
  ``dead_fraction`` = fraction of latents with ``firing_counts == 0`` on this eval set.
* ``mean_activation_norm`` = mean ||x||_2 (``mean_reconstruction_norm`` likewise for x_hat).
* Next-token CE is averaged over predictions whose *target* is a real token
  (``attention_mask[i + 1] == 1``); predictions of pad are never counted. Predictions made at BOS
  count like any other. ``kl_spliced`` = mean over the same predictions of
  KL(p_clean || p_spliced) in nats.
* ``ce_recovered`` = (CE_zero - CE_spliced) / (CE_zero - CE_clean); ``ce_recovered_mean`` the same
  with the mean-ablation baseline (only when ``ablation_mean`` is given, e.g. the training set's
  mean: a baseline not fitted on the eval windows).

Splicing: only kept rows are replaced (reconstruction, zeros or the mean). BOS / special rows keep
their clean activation: the SAE never saw them in training (the BOS attention sink has outsized
norms), so replacing them would score out-of-distribution inputs and swamp the CE. Ablations touch
the same rows, so a zero SAE scores exactly 0 and a perfect one exactly 1.

Two tiers of windows, as SAELens separates its reconstruction and sparsity batches: each window
of ``batches`` costs one full forward per variant (clean, spliced, zero-ablated, [mean-ablated])
and is scored for everything, its reconstruction metrics taken inside the splice hook, whose input
equals the clean activation (nothing upstream changed), so the SAE encodes each row once; each
window of ``reconstruction_batches`` (packed or not) costs one forward stopped after the hook and
adds to the reconstruction and sparsity metrics only. So the explained variance can be measured on
many windows at little cost, and ``n_rows`` / ``n_predictions`` say how many rows each figure has.
``subsets`` (name -> documents) reports the reconstruction metrics on each subset's rows as well. Hooks are added with
``model.hooks(...)``, which removes them even after an exception. No attention mask is passed:
padding is on the right and attention is causal, so real tokens never see the pads.

``sae_lens.evals`` is not called as a whole: ``run_evals`` / ``get_recons_loss`` draw tokens from an
``ActivationsStore``, ignore tokens by id (SmolLM2's PAD id is its EOS id, so pad cannot be told
from a real EOS), mask CE by the *input* token rather than the target, offer no mean ablation and
take an ``ActivationScaler`` rather than a whitener. TransformerLens' ``lm_cross_entropy_loss``
log-softmaxes every position, pads included, and the log-probs are needed again for the KL, so
log-probs of the counted predictions are taken once and reused (``torch.nn.functional.kl_div``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from sae_lens.evals import ExplainedVarianceCalculator
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from sae_core.activations import forward_context, run_to_hooks
from sae_core.config import TokenPolicy
from sae_core.data import WindowBatch
from sae_core.files import atomic_write_json, read_json
from sae_core.hooks import validate_hook
from sae_core.sae_folders import reconstruct

logger = logging.getLogger(__name__)

EVAL_FILENAME = "eval.json"
CURVE_FILENAME = "training_curve.json"
# Rows of log-probs handled at once in the KL (bounds the temporaries to chunk x vocab floats).
KL_CHUNK_ROWS = 256
# Pad, BOS, EOS and other special rows excluded: the rows SAEs are trained on.
DEFAULT_POLICY = TokenPolicy()
METRIC_CONVENTIONS = {
    "explained_variance": "against the mean: 1 - FVU = 1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 (SAELens, R^2)",
    "explained_variance_zero": "against zero: 1 - sum ||x - x_hat||^2 / sum ||x||^2",
    "mse": "per token: mean over rows of ||x - x_hat||^2, summed over d_in (SAELens mse)",
    "mse_per_element": "mean over rows and d_in of (x - x_hat)^2 = mse / d_in (torch MSELoss)",
    "normalized_mse": "mean over rows of ||x - x_hat||^2 / ||x||^2 (OpenAI normalized_mean_squared_error)",
}
"""What each reconstruction metric of ``eval.json`` means (x: kept rows at the hook, model space)."""


class WhitenerLike(Protocol):
    """What the evaluation needs of a whitener (``sae_core.whitening.Whitener`` has it)."""

    def forward(self, x: Tensor) -> Tensor: ...

    def reverse(self, z: Tensor) -> Tensor: ...


@dataclass(frozen=True)
class EvalResult:
    """Metrics of one SAE on one eval set (definitions in the module docstring)."""

    hook: str
    n_batches: int
    n_rows: int
    """Kept activation rows the SAE was evaluated on."""
    n_predictions: int
    """Next-token predictions the CE and KL average over."""
    mse: float
    explained_variance: float
    l0: float
    dead_fraction: float
    mean_activation_norm: float
    mean_reconstruction_norm: float
    ce_clean: float
    ce_spliced: float
    ce_zero_ablated: float
    ce_recovered: float
    kl_spliced: float
    kl_zero_ablated: float
    ce_mean_ablated: float | None = None
    ce_recovered_mean: float | None = None
    explained_variance_zero: float = math.nan
    mse_per_element: float = math.nan
    normalized_mse: float = math.nan
    conventions: dict[str, str] = field(default_factory=lambda: dict(METRIC_CONVENTIONS), compare=False)
    """Definitions of the reconstruction metrics (:data:`METRIC_CONVENTIONS`)."""
    whitened: bool = False
    forward_dtype: str = "float32"
    policy: dict[str, Any] = field(default_factory=dict, compare=False)
    firing_counts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64), compare=False, repr=False)
    """(d_sae,) int64: rows on which each latent was non-zero."""
    subsets: dict[str, dict[str, float]] = field(default_factory=dict, compare=False)
    """Reconstruction metrics (``n_rows``, ``l0`` and those of :data:`METRIC_CONVENTIONS`) on the rows of
    named subsets of the documents (e.g. short and long documents), when the caller names some."""

    @property
    def latent_density(self) -> np.ndarray:
        """(d_sae,) fraction of kept rows on which each latent fired."""
        return self.firing_counts / max(self.n_rows, 1)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (NaN becomes None; ``firing_counts`` a list)."""
        record = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for key, value in record.items():
            if isinstance(value, float) and not math.isfinite(value):
                record[key] = None
        record["firing_counts"] = self.firing_counts.tolist()
        return record

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> EvalResult:
        """Inverse of :meth:`to_json` (None read back as NaN for required floats)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(record) - names)
        if unknown:
            raise ValueError(f"unknown eval fields {unknown}; this eval.json was written by another version")
        values = dict(record)
        for f in dataclasses.fields(cls):
            if f.type == "float" and values.get(f.name, 0.0) is None:
                values[f.name] = math.nan
        values["firing_counts"] = np.asarray(values.get("firing_counts", []), dtype=np.int64)
        return cls(**values)


class _ReconstructionTotals:
    """Streaming float64 sums of the reconstruction and sparsity metrics."""

    def __init__(self, d_sae: int) -> None:
        self.variance, self.firing_counts = ExplainedVarianceCalculator(), torch.zeros(d_sae, dtype=torch.int64)
        self.l0_sum, self.norm_sum, self.recon_norm_sum = 0, 0.0, 0.0
        self.row_nmse_sum, self.row_nmse_rows, self.d = 0.0, 0, 0

    def add(self, x: Float[Tensor, "rows d"], x_hat: Float[Tensor, "rows d"],
            latents: Float[Tensor, "rows d_sae"] | None = None) -> None:
        x64, x_hat64 = x.double(), x_hat.double()  # float64 before squaring or summing
        self.variance.add_batch(sae_output=x_hat64, hidden_acts=x64)
        if latents is not None:
            fired = latents != 0  # != 0 so signed (e.g. AbsTopK) activations count too
            self.firing_counts += fired.sum(dim=0).cpu()
            self.l0_sum += int(fired.sum())
        self.norm_sum += float(x64.norm(dim=-1).sum())
        self.recon_norm_sum += float(x_hat64.norm(dim=-1).sum())
        squared, residual = x64.pow(2).sum(-1), (x64 - x_hat64).pow(2).sum(-1)  # (rows,)
        nonzero = squared > 0
        self.row_nmse_sum += float((residual[nonzero] / squared[nonzero]).sum())
        self.row_nmse_rows += int(nonzero.sum())
        self.d = int(x.shape[-1])

    @property
    def n_rows(self) -> int:
        return self.variance.num_samples

    def metrics(self) -> dict[str, float]:
        """The reconstruction metrics of :data:`METRIC_CONVENTIONS` over the rows added so far."""
        v, n = self.variance, max(self.n_rows, 1)
        return {"explained_variance": v.compute(), "mse": v.sum_squared_residual / n,
                "explained_variance_zero": 1 - v.sum_squared_residual / v.sum_squared_norm if v.sum_squared_norm else math.nan,
                "mse_per_element": v.sum_squared_residual / (n * max(self.d, 1)),
                "normalized_mse": self.row_nmse_sum / self.row_nmse_rows if self.row_nmse_rows else math.nan}


class _Scores:
    """Reconstruction totals of every kept row, and of the rows of each named subset of documents."""

    def __init__(self, d_sae: int, subsets: Mapping[str, Collection[int]]) -> None:
        self.all = _ReconstructionTotals(d_sae)
        self.subsets = {name: (torch.as_tensor(sorted(docs), dtype=torch.long), _ReconstructionTotals(d_sae))
                        for name, docs in subsets.items()}

    def add(self, x: Float[Tensor, "rows d"], x_hat: Float[Tensor, "rows d"], latents: Float[Tensor, "rows d_sae"],
            docs: Int[Tensor, " rows"]) -> None:
        self.all.add(x, x_hat, latents)
        for members, totals in self.subsets.values():
            rows = torch.isin(docs, members).to(x.device)
            if rows.any():
                totals.add(x[rows], x_hat[rows], latents[rows])

def reconstruction_metrics(pairs: Iterable[tuple[Tensor, Tensor]]) -> dict[str, float]:
    """:data:`METRIC_CONVENTIONS` metrics of ``(x, x_hat)`` row batches, streamed as :func:`evaluate_sae` does."""
    totals = _ReconstructionTotals(0)
    for x, x_hat in pairs:
        totals.add(x, x_hat)
    return totals.metrics()


def _check_activation(act: Tensor, sae: Any, hook: str) -> None:
    if act.ndim != 3 or act.shape[-1] != sae.cfg.d_in:
        raise ValueError(f"activation at {hook} has shape {tuple(act.shape)} but the SAE expects "
                         f"(batch, pos, {sae.cfg.d_in}); evaluate it at a hook of width d_in "
                         f"(per-head hooks such as hook_z are not supported)")


def _score(act: Tensor, keep: Bool[Tensor, "batch pos"], sae: Any, hook: str, whitener: WhitenerLike | None,
           scores: _Scores, docs: Int[Tensor, " rows"]) -> Float[Tensor, "rows d"]:
    """Reconstruct the kept rows of ``act`` and add them to ``scores``; returns the reconstruction."""
    _check_activation(act, sae, hook)
    x = act[keep]  # (rows, d)
    if not torch.isfinite(x).all():
        raise FloatingPointError(f"non-finite activations at {hook}; check forward_dtype and the model")
    latents, x_hat = reconstruct(sae, x, whitener)
    scores.add(x, x_hat, latents, docs)
    return x_hat


def _splice_hook(sae: Any, keep: Bool[Tensor, "batch pos"], whitener: WhitenerLike | None,
                 scores: _Scores, docs: Int[Tensor, " rows"]) -> Any:
    """A hook replacing kept rows with their reconstruction and recording the metrics."""

    def hook_fn(act: Tensor, hook: Any) -> Tensor:
        out = act.clone()
        out[keep] = _score(act, keep, sae, hook.name, whitener, scores, docs)
        return out

    return hook_fn


def _ablate_hook(keep: Bool[Tensor, "batch pos"], value: Float[Tensor, " d"] | None) -> Any:
    """A hook replacing kept rows with zeros (``value`` None) or with ``value``."""

    def hook_fn(act: Tensor, hook: Any) -> Tensor:
        fill = torch.zeros_like(act[0, 0]) if value is None else value.to(device=act.device, dtype=act.dtype)
        return torch.where(keep[..., None], fill, act)

    return hook_fn


def target_log_probs(logits: Float[Tensor, "batch pos vocab"], counted: Bool[Tensor, "batch pos_minus_1"]
                     ) -> Float[Tensor, "n vocab"]:
    """float32 log-probs of the counted predictions (``logits[:, :-1][counted]``)."""
    return F.log_softmax(logits[:, :-1][counted].float(), dim=-1)  # (n, vocab)


def _ce_and_kl(log_probs: Float[Tensor, "n vocab"], targets: Int[Tensor, " n"],
               clean: Float[Tensor, "n vocab"] | None) -> tuple[float, float]:
    """Sums over predictions of the CE and of KL(clean || log_probs) (0 when ``clean`` is None)."""
    ce = -log_probs.gather(-1, targets[:, None]).double().sum()
    kl = 0.0
    if clean is not None:
        for start in range(0, log_probs.shape[0], KL_CHUNK_ROWS):
            chunk = slice(start, start + KL_CHUNK_ROWS)
            kl += float(F.kl_div(log_probs[chunk], clean[chunk], reduction="sum", log_target=True))
    return float(ce), kl


def _eval_batch(model: HookedTransformer, sae: Any, hook: str, batch: WindowBatch, policy: TokenPolicy,
                whitener: WhitenerLike | None, ablation_mean: Tensor | None, scores: _Scores,
                sums: dict[str, float]) -> None:
    """Run every variant of one batch and add its CE / KL sums to ``sums``."""
    device = model.cfg.device
    tokens = batch.input_ids.to(device)
    keep_cpu = policy.keep_mask(batch.input_ids, batch.attention_mask, model.tokenizer)
    keep = keep_cpu.to(device)
    counted = batch.attention_mask[:, 1:].bool().to(device)  # (batch, pos-1): target is real
    targets = tokens[:, 1:][counted]  # (n,)
    sums["n"] += int(counted.sum())

    clean = target_log_probs(model(tokens, return_type="logits"), counted)
    sums["ce_clean"] += _ce_and_kl(clean, targets, None)[0]
    variants = {"spliced": _splice_hook(sae, keep, whitener, scores, batch.cell_doc_index()[keep_cpu]),
                "zero_ablated": _ablate_hook(keep, None)}
    if ablation_mean is not None:
        variants["mean_ablated"] = _ablate_hook(keep, ablation_mean)
    for name, hook_fn in variants.items():
        with model.hooks(fwd_hooks=[(hook, hook_fn)]):
            log_probs = target_log_probs(model(tokens, return_type="logits"), counted)
        ce, kl = _ce_and_kl(log_probs, targets, clean)
        sums[f"ce_{name}"] += ce
        sums[f"kl_{name}"] += kl
        del log_probs


def _reconstruction_batch(model: HookedTransformer, sae: Any, hook: str, batch: WindowBatch, policy: TokenPolicy,
                          whitener: WhitenerLike | None, forward_dtype: str | torch.dtype, scores: _Scores, compile: bool) -> None:
    """Score one (possibly packed) batch for reconstruction only: one forward, stopped after the hook."""
    keep = policy.keep_mask(batch.input_ids, batch.attention_mask, model.tokenizer)
    act = run_to_hooks(model, [hook], batch.input_ids, forward_dtype, batch, compile)[hook]
    _score(act, keep.to(act.device), sae, hook, whitener, scores, batch.cell_doc_index()[keep])


def _recovered(ablated: float, spliced: float, clean: float) -> float:
    gap = ablated - clean
    if gap == 0:
        logger.warning("ablating the hook does not change the CE; CE recovered is undefined (NaN)")
        return math.nan
    return (ablated - spliced) / gap


def evaluate_sae(model: HookedTransformer, sae: Any, hook: str, batches: Iterable[WindowBatch],
                 policy: TokenPolicy = DEFAULT_POLICY, forward_dtype: str | torch.dtype = "float32",
                 whitener: WhitenerLike | None = None, max_batches: int | None = None,
                 ablation_mean: Float[Tensor, " d"] | None = None,
                 reconstruction_batches: Iterable[WindowBatch] = (),
                 subsets: Mapping[str, Collection[int]] | None = None, compile: bool = False) -> EvalResult:
    """Evaluate a SAELens SAE at ``hook`` on held-out windows (see the module docstring).

    ``sae`` is any SAELens SAE (inference or training class; only ``encode`` / ``decode`` are
    used). ``whitener`` (optional) whitens the SAE's input and un-whitens its output.
    ``ablation_mean`` (optional, shape (d_in,)) adds the mean-ablation baseline.
    ``reconstruction_batches`` (optional, packed or not) are scored for reconstruction and sparsity
    only, one forward each (compiled with ``compile``); ``subsets`` (name -> document indices) adds
    those metrics per subset.
    """
    validate_hook(model, hook)
    if max_batches is not None and max_batches <= 0:
        raise ValueError(f"max_batches must be positive or None, got {max_batches}")
    if ablation_mean is not None and tuple(ablation_mean.shape) != (sae.cfg.d_in,):
        raise ValueError(f"ablation_mean has shape {tuple(ablation_mean.shape)}; give a ({sae.cfg.d_in},) vector")
    metadata_hook = getattr(getattr(sae.cfg, "metadata", None), "hook_name", None)
    if metadata_hook and metadata_hook != hook:
        logger.warning("evaluating at %s an SAE whose config names hook %s", hook, metadata_hook)
    scores, n_batches = _Scores(sae.cfg.d_sae, subsets or {}), 0
    sums = dict.fromkeys(["n", "ce_clean", "ce_spliced", "kl_spliced", "ce_zero_ablated",
                          "kl_zero_ablated", "ce_mean_ablated", "kl_mean_ablated"], 0.0)
    with torch.inference_mode(), forward_context(model.cfg.device, forward_dtype):
        for batch in tqdm(batches, desc=f"eval {hook}", total=max_batches, leave=False):
            if max_batches is not None and n_batches >= max_batches:
                break
            if batch.input_ids.numel() == 0:
                continue
            _eval_batch(model, sae, hook, batch, policy, whitener, ablation_mean, scores, sums)
            n_batches += 1
    with torch.no_grad(), forward_context(model.cfg.device, forward_dtype):  # inference_mode: never compiled
        for batch in tqdm(reconstruction_batches, desc=f"eval {hook} (reconstruction)", leave=False,
                          total=len(reconstruction_batches) if hasattr(reconstruction_batches, "__len__") else None):
            _reconstruction_batch(model, sae, hook, batch, policy, whitener, forward_dtype, scores, compile)
            n_batches += 1
    return _summarise(hook, n_batches, scores, sums, ablation_mean is not None, whitener is not None,
                      str(forward_dtype).removeprefix("torch."), policy.to_json(model.tokenizer))


def _summarise(hook: str, n_batches: int, scores: _Scores, sums: dict[str, float],
               with_mean: bool, whitened: bool, forward_dtype: str, policy: dict[str, Any]) -> EvalResult:
    totals = scores.all
    n_rows, n_pred = totals.n_rows, int(sums["n"])
    if n_rows == 0 or n_pred == 0:
        raise ValueError(f"the eval set has {n_rows} kept rows and {n_pred} real next-token targets; "
                         "give more (or longer) held-out windows or a less strict TokenPolicy")
    ce = {key: sums[key] / n_pred for key in sums if key.startswith(("ce_", "kl_"))}
    counts = totals.firing_counts.numpy()
    result = EvalResult(
        hook=hook, n_batches=n_batches, n_rows=n_rows, n_predictions=n_pred,
        **totals.metrics(),
        l0=totals.l0_sum / n_rows, dead_fraction=float((counts == 0).mean()),
        mean_activation_norm=totals.norm_sum / n_rows, mean_reconstruction_norm=totals.recon_norm_sum / n_rows,
        ce_clean=ce["ce_clean"], ce_spliced=ce["ce_spliced"], ce_zero_ablated=ce["ce_zero_ablated"],
        ce_recovered=_recovered(ce["ce_zero_ablated"], ce["ce_spliced"], ce["ce_clean"]),
        kl_spliced=ce["kl_spliced"], kl_zero_ablated=ce["kl_zero_ablated"],
        ce_mean_ablated=ce["ce_mean_ablated"] if with_mean else None,
        ce_recovered_mean=_recovered(ce["ce_mean_ablated"], ce["ce_spliced"], ce["ce_clean"]) if with_mean else None,
        whitened=whitened, forward_dtype=forward_dtype, policy=policy, firing_counts=counts,
        subsets={name: {"n_rows": t.n_rows, "l0": t.l0_sum / t.n_rows, **t.metrics()}
                 for name, (_, t) in scores.subsets.items() if t.n_rows})
    logger.info("eval %s: EV %.4f, L0 %.1f, dead %.3f, CE recovered %.4f, KL %.4g over %d rows",
                hook, result.explained_variance, result.l0, result.dead_fraction, result.ce_recovered,
                result.kl_spliced, n_rows)
    return result


def write_eval(folder: str | os.PathLike[str], result: EvalResult) -> Path:
    """Write ``result`` to ``<folder>/eval.json`` atomically; returns the path."""
    return atomic_write_json(Path(folder) / EVAL_FILENAME, result.to_json())


def read_eval(folder: str | os.PathLike[str]) -> EvalResult:
    """Read ``<folder>/eval.json`` back."""
    return EvalResult.from_json(read_json(Path(folder) / EVAL_FILENAME))


def _scalar(name: str, value: Any) -> float | int:
    if isinstance(value, (Tensor, np.ndarray, np.generic)):
        if (value.numel() if isinstance(value, Tensor) else np.size(value)) != 1:
            raise ValueError(f"curve metric {name!r} must be a scalar, got shape {tuple(value.shape)}")
        value = value.item()
    if not isinstance(value, (int, float)):
        raise TypeError(f"curve metric {name!r} must be a number, got {type(value).__name__}")
    return value


def append_curve(records: list[dict[str, Any]], **metrics: Any) -> list[dict[str, Any]]:
    """Append one training-curve point (``tokens=`` required; e.g. loss, l0, explained_variance,
    dead_fraction) to ``records`` and return it. Tensors and numpy scalars become Python numbers."""
    if "tokens" not in metrics:
        raise ValueError("append_curve needs tokens= (training tokens seen so far)")
    record = {name: _scalar(name, value) for name, value in metrics.items()}
    record["tokens"] = int(record["tokens"])
    if records and record["tokens"] < records[-1]["tokens"]:
        raise ValueError(f"curve tokens must not decrease: {record['tokens']} after {records[-1]['tokens']}")
    records.append(record)
    return records


def write_curve(folder: str | os.PathLike[str], records: list[dict[str, Any]]) -> Path:
    """Write the curve to ``<folder>/training_curve.json`` atomically; returns the path."""
    return atomic_write_json(Path(folder) / CURVE_FILENAME, records)


def read_curve(folder: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read ``<folder>/training_curve.json`` back."""
    return read_json(Path(folder) / CURVE_FILENAME)
