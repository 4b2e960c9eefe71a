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

from sae_core.browser.data import BLOCK_ENTRIES, INVERTIBLE_COOCCURRENCE, histograms, top_k_rows
from sae_core.latents import LatentCSR, as_host_array, firing_counts
from sae_core.similarity import (
    Neighbours,
    cooccurrence_blocks,
    matrix_blocks,
    similarity_blocks,
    top_k_neighbours,
)

logger = logging.getLogger(__name__)


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
    """``directions @ W_U`` (rows, vocab) in row blocks: top / bottom ``n`` tokens and a histogram per row."""
    step = max(1, BLOCK_ENTRIES // (2 * W_U.shape[1]))
    parts = []
    for start in range(0, directions.shape[0], step):
        logits = directions[start:start + step] @ W_U  # (rows, vocab)
        top = top_k_rows(logits, n)
        np.negative(logits, out=logits)
        bottom = top_k_rows(logits, n)
        np.negative(logits, out=logits)
        lo, hi = logits.min(axis=1).astype(np.float64), logits.max(axis=1).astype(np.float64)
        owner = np.repeat(np.arange(logits.shape[0]), logits.shape[1])
        counts = histograms(logits.reshape(-1), owner, lo, hi, n_bins, exact=False)
        parts.append((top, Neighbours(bottom.indices, -bottom.values), lo, hi, counts))
    return LogitLens(Neighbours(*(np.concatenate([p[0][i] for p in parts]) for i in range(2))),
                     Neighbours(*(np.concatenate([p[1][i] for p in parts]) for i in range(2))),
                     *(np.concatenate([p[i] for p in parts]) for i in (2, 3, 4)))


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
