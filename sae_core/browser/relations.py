"""What a latent writes and what it relates to: the logit lens through the unembedding (whitening
accounted for), nearest latents by decoder cosine, and co-occurring latents (Jaccard, PMI) read back
from a stored co-occurrence file or counted from the CSR, all in row blocks.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from sae_core.browser.data import BLOCK_ENTRIES, INVERTIBLE_COOCCURRENCE, top_k_rows
from sae_core.latents import LatentCSR, as_host_array, firing_counts
from sae_core.similarity import (
    Neighbours,
    cooccurrence_blocks,
    matrix_blocks,
    similarity_blocks,
    top_k_neighbours,
)

logger = logging.getLogger(__name__)

LOGIT_BLOCK_ENTRIES = 1 << 24
"""Logits per logit-lens block (64 MB of float32, ~340 latents at a 49k vocabulary): large enough
that streaming W_U (d_model x vocab, ~110 MB for SmolLM2) once per block does not dominate."""


def residual_directions(W_dec: Any, whitener: Any = None) -> np.ndarray:
    """Decoder rows in the residual stream: ``W_dec`` (n, d), or ``W_dec @ reverse_transform`` if whitened."""
    W = as_host_array(W_dec, np.float32, "W_dec")
    if whitener is None:
        return W
    reverse = as_host_array(whitener.reverse_transform, np.float64, "whitener.reverse_transform")
    if reverse.shape != (W.shape[1], W.shape[1]):
        raise ValueError(f"the whitener is {reverse.shape[0]}-dimensional but W_dec rows have {W.shape[1]} "
                         "entries; pass the whitener the SAE was trained with")
    return np.concatenate([(W[i:i + 4096].astype(np.float64) @ reverse).astype(np.float32)
                           for i in range(0, W.shape[0], 4096)])


class LogitLens(NamedTuple):
    """Promoted (``top``) and suppressed (``bottom``, most negative first) tokens, and a logit histogram."""

    top: Neighbours
    bottom: Neighbours
    hist_lo: np.ndarray  # (n,)
    hist_hi: np.ndarray
    hist_counts: np.ndarray  # (n, n_bins)


def logit_lens(directions: np.ndarray, W_U: np.ndarray, n: int, n_bins: int) -> LogitLens:
    """``directions @ W_U`` (rows, vocab) in row blocks: top / bottom ``n`` tokens and a histogram per row.

    In torch (float32, as the inputs): the matmul, ``topk`` and the bin counting run on every core,
    where numpy's element-wise passes ran on one (the logit lens was ~2/3 of a browser build).
    Ties are broken towards the lower token id, as ``top_k_rows`` does; histogram bins are those of
    ``numpy.histogram(row, n_bins)`` up to rounding at a bin edge (``histograms(..., exact=False)``).
    """
    import torch

    D = torch.from_numpy(np.ascontiguousarray(directions, dtype=np.float32))
    U = torch.from_numpy(np.ascontiguousarray(W_U, dtype=np.float32))
    n = min(n, U.shape[1])
    step = max(1, LOGIT_BLOCK_ENTRIES // U.shape[1])  # rows per block: W_U is read once per block
    parts = []
    with torch.inference_mode():
        for start in range(0, D.shape[0], step):
            logits = D[start:start + step] @ U  # (rows, vocab)
            top, bottom = _torch_top_k(logits, n, largest=True), _torch_top_k(logits, n, largest=False)
            lo, hi = torch.aminmax(logits, dim=1)
            parts.append((top, bottom, lo.double().numpy(), hi.double().numpy(), _row_histograms(logits, lo, hi, n_bins)))
    return LogitLens(Neighbours(*(np.concatenate([p[0][i] for p in parts]) for i in range(2))),
                     Neighbours(*(np.concatenate([p[1][i] for p in parts]) for i in range(2))),
                     *(np.concatenate([p[i] for p in parts]) for i in (2, 3, 4)))


def _torch_top_k(logits: Any, n: int, largest: bool) -> Neighbours:
    """Best ``n`` per row (most negative first when not ``largest``), ties to the lower column.

    ``torch.topk`` leaves the order of equal values open; rows where the n-th value equals the
    (n+1)-th (a tie across the cut) are redone by a full ``np.lexsort`` of the row; they are rare
    (a dead latent's zero direction is one).
    """
    import torch

    values, indices = torch.topk(logits, min(n + 1, logits.shape[1]), dim=1, largest=largest, sorted=True)
    tied = torch.nonzero(values[:, n - 1] == values[:, n]).flatten() if values.shape[1] > n else []
    indices, values = indices[:, :n].numpy().astype(np.int64), values[:, :n].double().numpy()
    order = np.lexsort((indices, -values if largest else values), axis=1)
    indices, values = np.take_along_axis(indices, order, axis=1), np.take_along_axis(values, order, axis=1)
    for row in tied.tolist():
        full = logits[row].double().numpy()
        best = np.lexsort((np.arange(full.size), -full if largest else full))[:n]
        indices[row], values[row] = best, full[best]
    return Neighbours(indices, values)


def _row_histograms(logits: Any, lo: Any, hi: Any, n_bins: int) -> np.ndarray:
    """(rows, n_bins) counts: ``n_bins`` equal bins over each row's [lo, hi] (numpy's bins, edges rounded)."""
    import torch

    degenerate = hi <= lo  # numpy widens an empty range by 0.5 each side
    lo, hi = torch.where(degenerate, lo - 0.5, lo), torch.where(degenerate, hi + 0.5, hi)
    scale = (n_bins / (hi - lo))[:, None]
    index = (logits - lo[:, None]).mul_(scale).to(torch.int32).clamp_(0, n_bins - 1)
    index += (torch.arange(logits.shape[0], dtype=torch.int32) * n_bins)[:, None]
    return torch.bincount(index.flatten(), minlength=logits.shape[0] * n_bins).reshape(-1, n_bins).numpy()


def unit_rows(W: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(W.astype(np.float64), axis=1, keepdims=True)
    return np.divide(W, norms, out=np.zeros(W.shape, np.float64), where=norms > 0)


def decoder_neighbours(W_dec: np.ndarray, k: int, neighbours_path: str | os.PathLike[str] | None = None,
                       chunk_size: int = 1024) -> Neighbours:
    """Nearest latents by decoder cosine: from a stored ``*_indices.npy`` (cosines recomputed), else computed."""
    if neighbours_path is None:
        found = top_k_neighbours(similarity_blocks(W_dec, "cosine", chunk_size), min(k, W_dec.shape[0] - 1))
        return Neighbours(np.asarray(found.indices), np.asarray(found.values, np.float64))
    stored = np.load(neighbours_path, mmap_mode="r")
    if stored.ndim != 2 or stored.shape[0] != W_dec.shape[0]:
        raise ValueError(f"{neighbours_path} holds {stored.shape} neighbours but W_dec has {W_dec.shape[0]} rows; "
                         "recompute them for this SAE (sae_core.similarity.top_k_neighbours)")
    indices = np.asarray(stored[:, :k], np.int64)
    norms = np.linalg.norm(W_dec, axis=1)
    inverse = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
    values = np.empty(indices.shape, np.float64)
    step = max(1, BLOCK_ENTRIES // (indices.shape[1] * W_dec.shape[1]))  # rows per (rows, k, d) gather
    for start in range(0, indices.shape[0], step):
        rows, ids = slice(start, start + step), indices[start:start + step]
        dots = np.einsum("nd,nkd->nk", W_dec[rows], W_dec[ids], dtype=np.float64)
        values[rows] = dots * inverse[rows, None] * inverse[ids]
    return Neighbours(indices, values)


# --- co-occurrence: Jaccard and PMI ---------------------------------------------------------------

def _counts_from_metric(block: np.ndarray, metric: str, fired: np.ndarray, start: int, total: int) -> np.ndarray:
    """Integer co-occurrence counts (rows, n) recovered from a block of a stored metric."""
    values = block.astype(np.float64)
    n_i = fired[start:start + block.shape[0]].astype(np.float64)[:, None]
    n_j = fired.astype(np.float64)[None, :]
    if metric == "count":
        counts = values
    elif metric == "jaccard":
        counts = values * (n_i + n_j) / (1 + values)
    else:  # correlation
        spread = np.sqrt(n_i * (total - n_i)) * np.sqrt(n_j * (total - n_j))
        counts = (values * spread + n_i * n_j) / total
    return np.rint(counts)


def count_blocks(csr: LatentCSR, fired: np.ndarray, path: str | os.PathLike[str] | None, metric: str | None,
                 chunk_size: int) -> Iterator[tuple[int, np.ndarray]]:
    """(start, counts) row blocks of the co-occurrence counts: from a stored memmap if invertible, else the CSR."""
    if path is not None:
        metric = metric or Path(path).stem.removeprefix("cooccurrence_")
        if metric in INVERTIBLE_COOCCURRENCE:
            stream = matrix_blocks(path, chunk_size)
            if stream.shape != (csr.n_features, csr.n_features):
                raise ValueError(f"{path} is {stream.shape} but the store has {csr.n_features} latents; "
                                 "recompute it from this store (sae_core.similarity.compute_feature_cooccurrence)")
            for block in stream.blocks:
                yield block.start, _counts_from_metric(block.values, metric, fired, block.start, csr.n_rows)
            return
        logger.info("the %s co-occurrence in %s cannot be turned back into counts; counting from the CSR",
                    metric, path)
    for block in cooccurrence_blocks(csr, "count", chunk_size).blocks:
        yield block.start, block.values.astype(np.float64)


def cooccurrence_neighbours(csr: LatentCSR, k: int, min_count: int, path: str | os.PathLike[str] | None = None,
                            metric: str | None = None, progress: bool = True) -> tuple[Neighbours, Neighbours]:
    """Top-``k`` co-occurring latents of every latent by Jaccard and by PMI (self excluded).

    Entries with no shared firing (Jaccard 0) or fewer than ``min_count`` (PMI) are -inf.
    """
    from tqdm.auto import tqdm

    n, total = csr.n_features, csr.n_rows
    fired = firing_counts(csr)[0]
    chunk = max(1, BLOCK_ENTRIES // n)
    k = min(k, max(n - 1, 1))
    out = {name: (np.empty((n, k), np.int64), np.empty((n, k), np.float64)) for name in ("jaccard", "pmi")}
    with tqdm(total=n, desc="co-occurring latents", disable=not progress) as bar:
        for start, counts in count_blocks(csr, fired, path, metric, chunk):
            rows = np.arange(counts.shape[0])
            n_i = fired[start:start + rows.size].astype(np.float64)[:, None]
            n_j = fired.astype(np.float64)[None, :]
            union = n_i + n_j - counts
            jaccard = np.divide(counts, union, out=np.zeros_like(counts), where=union > 0)
            jaccard[counts <= 0] = -np.inf
            with np.errstate(divide="ignore", invalid="ignore"):  # dead latents: masked below
                pmi = np.log(counts * total) - np.log(n_i) - np.log(n_j)
            pmi[counts < min_count] = -np.inf
            for name, values in (("jaccard", jaccard), ("pmi", pmi)):
                values[rows, start + rows] = -np.inf  # not its own neighbour
                found = top_k_rows(values, k)
                out[name][0][start:start + rows.size], out[name][1][start:start + rows.size] = found
            bar.update(rows.size)
    return Neighbours(*out["jaccard"]), Neighbours(*out["pmi"])
