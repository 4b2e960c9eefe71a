"""A fast TopK training step whose backward touches only the active latents.

SAELens's ``TopKTrainingSAE.training_forward_pass`` scatters the k active values into a dense
``(rows, d_sae)`` tensor and decodes it with a dense matmul, so its backward runs three more dense
``rows x d_in x d_sae`` matmuls although only ``k`` of the ``d_sae`` latents of each row carry a
gradient. This module computes the same loss (MSE plus SAELens's AuxK loss) from the same
parameters with

* the encoder pre-activations ``h = (x - b_dec) @ W_enc + b_enc`` as the one dense matmul (in
  ``compute_dtype``, e.g. bfloat16 under autocast; parameters stay float32), computed without
  autograd, then ``torch.topk`` on ``h * ||W_dec||`` (``rescale_acts_by_decoder_norm``);
* the decoder as ``torch.nn.functional.embedding_bag(indices, W_dec, per_sample_weights=acts)``,
  which reads only the k active rows of ``W_dec``;
* two small autograd functions whose backward is sparse: the gradient of ``W_dec`` and of
  ``W_enc`` is a sparse ``(d_sae, rows)`` matrix (``k`` non-zeros per batch row) times a dense
  ``(rows, d_in)`` matrix (``torch.sparse.mm``); ``b_enc`` gets an ``index_add``.

The AuxK loss picks its ``k_aux`` latents among the dead columns of the ranking alone, and while the
dead latents are few (``n_dead <= 8 k_aux``) reconstructs the residual with dense matmuls over those
columns (:class:`_DenseDeadDecode`; a long run at a low learning rate has hundreds of dead latents,
and ``k_aux = d_in / 2`` gathers per row made the step ~2.5x slower); with more, on the sparse path.
The dense AuxK matmuls run in ``compute_dtype`` as the encoder's does (SAELens's AuxK runs under the
same autocast), and when more than half of the dead latents are selected the ones left out are found
by a top-k of the smallest (a smaller selection than the top ``k_aux``).

Measured at SmolLM2 sizes (batch 4096, d_in 576, d_sae 4608, k 32; 2 CPU cores; the Adam update
included): ~4x the tokens/s of SAELens's step under bfloat16 autocast, ~3x in float32.

Identities used (``n = ||W_dec||`` row-wise, ``n_j > 0``): SAELens decodes
``(relu(h n) / n) @ W_dec``, and ``relu(h_j n_j) / n_j = relu(h_j)``, so the decoder weights are
``relu(h)`` at the selected latents and no gradient flows through ``n`` (SAELens's autograd
computes the two cancelling terms of that zero; they agree to rounding). The same holds for the
AuxK reconstruction ``(h' / n) @ W_dec = h @ W_dec`` over the selected dead latents.

Rejected: ``TopKTrainingSAEConfig(use_sparse_activations=True)`` (COO activations through
``torch.sparse.mm``: fails in backward on CPU with the decoder-norm rescale, and its encoder
backward stays dense); autograd through ``embedding_bag`` for ``W_dec`` (its dense-gradient
backward ran ~2.5x slower here than one ``torch.sparse.mm``); recomputing the selected
pre-activations in float32 by gathering ``W_enc`` columns (a ``(rows, k, d_in)`` gather is ~300 MB
per step at SmolLM2 sizes). Checked against SAELens's dense ``training_forward_pass`` (loss and
every parameter gradient) in ``tests/test_training.py``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from sae_lens.saes.topk_sae import TopKTrainingSAE
from torch import Tensor


def _transposed_sparse(indices: Int[Tensor, "rows k"], values: Float[Tensor, "rows k"], d_sae: int,
                       dtype: torch.dtype) -> Tensor:
    """The ``(d_sae, rows)`` COO matrix with ``values[r, i]`` at ``(indices[r, i], r)``."""
    rows, k = indices.shape
    row_ids = torch.arange(rows, device=indices.device).repeat_interleave(k)  # (rows*k,)
    coords = torch.stack([indices.reshape(-1), row_ids])  # (2, rows*k)
    return torch.sparse_coo_tensor(coords, values.reshape(-1).to(dtype), (d_sae, rows), check_invariants=False)


class _SelectedPreActs(torch.autograd.Function):
    """``h[r, i] = centered[r] . W_enc[:, idx[r, i]] + b_enc[idx[r, i]]`` with values computed elsewhere.

    Forward returns the given values (from the dense encoder matmul); backward gives ``W_enc``,
    ``b_enc`` and ``b_dec`` (through ``centered = x - b_dec``) their exact sparse gradients.
    """

    @staticmethod
    def forward(ctx, values: Tensor, centered: Tensor, W_enc: Tensor, b_enc: Tensor,  # type: ignore[override]
                b_dec: Tensor | None, indices: Tensor) -> Tensor:
        ctx.save_for_backward(centered, W_enc, indices)
        ctx.has_b_dec = b_dec is not None
        return values.to(W_enc.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        centered, W_enc, indices = ctx.saved_tensors
        d_sae = W_enc.shape[1]
        grad_W_enc = torch.sparse.mm(_transposed_sparse(indices, grad, d_sae, centered.dtype), centered).t()  # (d_in, d_sae)
        grad_b_enc = torch.zeros(d_sae, dtype=grad.dtype, device=grad.device)
        grad_b_enc.index_add_(0, indices.reshape(-1), grad.reshape(-1))
        # d h / d b_dec = -W_enc[:, j] for every selected (r, j): summed, that is -W_enc @ grad_b_enc
        grad_b_dec = -(W_enc @ grad_b_enc) if ctx.has_b_dec else None
        return None, None, grad_W_enc, grad_b_enc, grad_b_dec, None


class _SparseDecode(torch.autograd.Function):
    """``out[r] = sum_i weights[r, i] * W_dec[idx[r, i]]`` (embedding_bag), with a sparse backward."""

    @staticmethod
    def forward(ctx, weights: Tensor, W_dec: Tensor, indices: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(weights, W_dec, indices)
        return F.embedding_bag(indices, W_dec, per_sample_weights=weights, mode="sum")

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        weights, W_dec, indices = ctx.saved_tensors
        grad_W_dec = torch.sparse.mm(_transposed_sparse(indices, weights, W_dec.shape[0], grad_out.dtype), grad_out)
        # d out[r] / d weights[r, i] = W_dec[idx[r, i]]: embedding_bag's own fused kernel for it
        with torch.enable_grad():
            w = weights.detach().requires_grad_(True)
            out = F.embedding_bag(indices, W_dec.detach(), per_sample_weights=w, mode="sum")
            (grad_weights,) = torch.autograd.grad(out, w, grad_out)
        return grad_weights, grad_W_dec, None


class TopKStepOutput(NamedTuple):
    """One TopK training forward pass (the loss is differentiable; the rest is detached)."""

    loss: Tensor  # scalar: mse_loss + aux_loss
    mse_loss: Tensor  # scalar, sum over d_in, mean over rows (SAELens's definition)
    aux_loss: Tensor  # scalar AuxK loss (0 when no latent is dead)
    sae_out: Float[Tensor, "rows d_in"]
    indices: Int[Tensor, "rows k"]  # the k selected latents of each row
    acts: Float[Tensor, "rows k"]  # their activations (relu of the pre-activation, >= 0)


def _check_supported(sae: TopKTrainingSAE) -> None:
    cfg = sae.cfg
    if cfg.normalize_activations != "none" or cfg.reshape_activations != "none":
        raise NotImplementedError("the sparse TopK step supports normalize_activations='none' and "
                                  "reshape_activations='none' only; whiten with sae_core.whitening instead")


def topk_training_step(sae: TopKTrainingSAE, sae_in: Float[Tensor, "rows d_in"],
                       dead_mask: Tensor | None = None,
                       compute_dtype: torch.dtype = torch.float32) -> TopKStepOutput:
    """The loss of SAELens's ``training_forward_pass`` for a TopK SAE, with a sparse backward.

    ``dead_mask`` (bool, ``(d_sae,)``) switches on the AuxK loss exactly as SAELens does:
    ``k_aux = d_in // 2`` dead latents per row reconstruct the detached residual, scaled by
    ``min(n_dead / k_aux, 1) * aux_loss_coefficient``. ``compute_dtype`` is the precision of the
    dense encoder matmul (selection and activation values); gradients are in the parameters' dtype.
    """
    _check_supported(sae)
    cfg = sae.cfg
    x = sae_in.to(sae.W_enc.dtype)
    b_dec = sae.b_dec if cfg.apply_b_dec_to_input else None
    centered = x - sae.b_dec.detach() if b_dec is not None else x  # (rows, d_in)
    with torch.no_grad():
        # Rank by h * ||W_dec||: folding the norms into W_enc's columns (d_in x d_sae) is cheaper
        # than scaling the (rows x d_sae) output.
        norms = sae.W_dec.norm(dim=-1) if cfg.rescale_acts_by_decoder_norm else None
        W_enc = sae.W_enc * norms if norms is not None else sae.W_enc
        b_enc = sae.b_enc * norms if norms is not None else sae.b_enc
        centered_c = centered.to(compute_dtype)
        ranking = torch.addmm(b_enc.to(compute_dtype), centered_c, W_enc.to(compute_dtype))  # (rows, d_sae)
        indices = torch.topk(ranking, cfg.k, dim=-1, sorted=False).indices  # (rows, k)
        selected = _pre_acts_at(ranking, indices, norms, x.dtype)
    pre = _SelectedPreActs.apply(selected, centered, sae.W_enc, sae.b_enc, b_dec, indices)
    acts = pre.relu()
    sae_out = _SparseDecode.apply(acts, sae.W_dec, indices) + sae.b_dec  # (rows, d_in)
    mse_loss = (sae_out - x).pow(2).sum(dim=-1).mean()
    aux_loss = _aux_loss(sae, x, sae_out, ranking, norms, (centered, centered_c), b_dec, dead_mask)
    return TopKStepOutput(mse_loss + aux_loss, mse_loss.detach(), aux_loss.detach(), sae_out.detach(),
                          indices, acts.detach())


def _pre_acts_at(ranking: Tensor, indices: Tensor, norms: Tensor | None, dtype: torch.dtype) -> Tensor:
    """The pre-activations ``h`` at ``indices`` (in ``dtype``) from the ranking ``h * norms``."""
    selected = ranking.gather(1, indices).to(dtype)  # (rows, k)
    return selected / norms[indices] if norms is not None else selected


def _aux_loss(sae: TopKTrainingSAE, x: Tensor, sae_out: Tensor, ranking: Tensor, norms: Tensor | None,
              centered: tuple[Tensor, Tensor], b_dec: Tensor | None, dead_mask: Tensor | None) -> Tensor:
    """SAELens's AuxK loss (``calculate_topk_aux_loss``): dense over the dead columns when they are few
    enough next to ``k_aux`` (:data:`DENSE_AUX_RATIO`), else on the sparse path. ``centered`` is
    ``x - b_dec`` in the parameters' dtype and in the ranking's (compute) dtype."""
    n_dead = int(dead_mask.sum()) if dead_mask is not None else 0
    if n_dead == 0:
        return x.new_zeros(())
    k_aux = x.shape[-1] // 2
    scale = min(n_dead / k_aux, 1.0)
    k_aux = min(k_aux, n_dead)
    residual = (x - sae_out).detach()
    dense = n_dead <= DENSE_AUX_RATIO * k_aux
    with torch.no_grad():
        # the top k_aux of the dead columns alone: the same latents as a top-k over the ranking with the
        # live columns at -inf, without copying and masking the whole (rows, d_sae) ranking
        dead = dead_mask.to(ranking.device).nonzero().squeeze(1)  # (n_dead,)
        among = ranking.index_select(1, dead)  # (rows, n_dead), in the compute dtype
        if dense:
            values = (among.to(x.dtype) / norms[dead]).to(among.dtype) if norms is not None else among
            keep = _top_mask(among, k_aux) if k_aux < n_dead else None
            values = values.masked_fill(~keep, 0.0) if keep is not None else values
    if dense:
        recons = _DenseDeadDecode.apply(values, keep, centered[1], sae.W_enc, sae.b_enc, b_dec, sae.W_dec, dead)
    else:
        with torch.no_grad():
            aux_indices = dead[torch.topk(among, k_aux, dim=-1, sorted=False).indices]  # (rows, k_aux)
            aux_selected = _pre_acts_at(ranking, aux_indices, norms, x.dtype)
        aux_pre = _SelectedPreActs.apply(aux_selected, centered[0], sae.W_enc, sae.b_enc, b_dec, aux_indices)
        recons = _SparseDecode.apply(aux_pre, sae.W_dec, aux_indices)  # no b_dec: it is in the residual
    return sae.cfg.aux_loss_coefficient * scale * (recons - residual).pow(2).sum(dim=-1).mean()


def _top_mask(scores: Tensor, k: int) -> Tensor:
    """Boolean mask of each row's ``k`` largest entries; when ``k`` is more than half the row, found
    as the complement of the ``n - k`` smallest (the smaller selection)."""
    n = scores.shape[-1]
    if 2 * k > n:
        mask = torch.ones_like(scores, dtype=torch.bool)
        return mask.scatter_(1, torch.topk(scores, n - k, dim=-1, largest=False, sorted=False).indices, False)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    return mask.scatter_(1, torch.topk(scores, k, dim=-1, sorted=False).indices, True)


DENSE_AUX_RATIO = 8
"""The AuxK reconstruction runs as dense matmuls over the dead columns while there are at most this
many dead latents per selected one (``n_dead <= 8 k_aux``): four ``rows x n_dead x d_in`` matmuls
then cost less than the gathers and scatters of the ``rows x k_aux`` sparse path."""


class _DenseDeadDecode(torch.autograd.Function):
    """``values @ W_dec[dead]`` where ``values[r, j]`` is the pre-activation ``h`` of dead latent
    ``dead[j]`` if it is among row ``r``'s top ``k_aux`` (``keep``; None: all are) and 0 else, with exact gradients for
    ``W_enc``, ``b_enc``, ``b_dec`` (through ``h``) and ``W_dec``, all as dense matmuls over the
    dead columns. The matmuls run in the dtype of ``values`` and ``centered`` (the compute dtype);
    output and gradients are in the parameters' dtype."""

    @staticmethod
    def forward(ctx, values: Tensor, keep: Tensor | None, centered: Tensor, W_enc: Tensor,  # type: ignore[override]
                b_enc: Tensor, b_dec: Tensor | None, W_dec: Tensor, dead: Tensor) -> Tensor:
        W_dec_dead = W_dec.index_select(0, dead).to(values.dtype)  # (n_dead, d_in)
        ctx.save_for_backward(values, keep, centered, W_enc, W_dec, W_dec_dead, dead)
        ctx.has_b_dec = b_dec is not None
        return (values @ W_dec_dead).to(W_dec.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        values, keep, centered, W_enc, W_dec, W_dec_dead, dead = ctx.saved_tensors
        grad = grad_out.to(values.dtype)
        grad_W_dec = torch.zeros_like(W_dec).index_copy_(0, dead, (values.t() @ grad).to(W_dec.dtype))
        grad_values = grad @ W_dec_dead.t()  # (rows, n_dead)
        if keep is not None:
            grad_values.masked_fill_(~keep, 0.0)  # only the selected entries are pre-activations
        grad_W_enc = torch.zeros_like(W_enc).index_copy_(1, dead, (centered.t() @ grad_values).to(W_enc.dtype))
        grad_h_sum = grad_values.sum(0, dtype=W_enc.dtype)  # (n_dead,)
        grad_b_enc = torch.zeros(W_enc.shape[1], dtype=W_enc.dtype, device=grad_out.device).index_copy_(0, dead, grad_h_sum)
        grad_b_dec = -(W_enc.index_select(1, dead) @ grad_h_sum) if ctx.has_b_dec else None
        return None, None, None, grad_W_enc, grad_b_enc, grad_b_dec, grad_W_dec, None
