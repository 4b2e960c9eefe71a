"""Per-latent dashboard data from the CSR latent store, the decoder and the co-occurrence memmap.

Everything the feature browser (:mod:`sae_core.browser`) shows is computed here from disk alone,
with no model forward: one pass over the CSR's nonzeros plus ``latents x k`` work per table.

Decisions:
- The CSR is row-major (one row per token); a latent's view needs its column. One streaming pass
  buckets the nonzeros by latent chunk into scratch files (:func:`partition_by_latent`, a bucket
  sort to disk), then each chunk is sorted into a small column-major block (:class:`ChunkColumns`).
  Memory is one row block during the pass and one chunk's share of the nonzeros afterwards.
  Rejected: a full CSC copy (memory grows with nnz), and re-scanning the CSR per chunk (cost
  grows with nnz x chunks).
- A chunk's entries are ordered by (latent, -value, row), the order of
  :func:`sae_core.latents.top_activating_examples`, so the top examples, max, min and the
  activation quantiles are positions in that order. Quantile examples are deterministic: the
  firings are split into ``n_quantiles`` groups of equal count by rank and evenly spaced ranks are
  taken from each group (reproducible, and testable against a plain sort).
- Per-token activations of the latent over an example's context come from the same chunk, looked
  up by ``searchsorted`` on ``latent * n_rows + row`` keys. Context bounds follow
  :func:`sae_core.latents._context_rows` (a stretch of consecutive tokens of one document, ``window`` rows each
  side), from the rows where a window starts (one pass, ``n_windows`` integers).
- Logit lens: ``W_dec @ W_U`` in row blocks (never ``n x vocab``); with a whitener the decoder
  rows are first mapped back to the residual stream, ``W_dec @ reverse_transform``, because the
  SAE decodes into whitened space (``x = z @ reverse + mean``; the mean is no direction).
- Co-occurrence neighbours read the stored ``count`` / ``jaccard`` / ``correlation`` memmap in row
  blocks, recover the integer counts ``C_ij`` from it (exact after rounding) and rank both Jaccard
  and PMI from those, so one stored metric gives both tables. A ``pmi`` memmap cannot be inverted
  (``0`` means both "never together" and "independent"), so then, or with no memmap, the counts
  are streamed from the CSR (:func:`sae_core.similarity.cooccurrence_blocks`). PMI is ranked only
  over pairs seen together at least ``pmi_min_count`` times: with a count of one, PMI favours the
  rarest latents.
- Top-k selections go through :func:`sae_core.similarity.top_k_neighbours` (its sampled-threshold
  partition) on single-block streams, so ties follow its rule (lower index first).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from sae_core.latents import LatentCSR, follows
from sae_core.similarity import (
    Block,
    BlockStream,
    Neighbours,
    top_k_neighbours,
)

logger = logging.getLogger(__name__)

INVERTIBLE_COOCCURRENCE = ("count", "jaccard", "correlation")
# Entries of a (rows, n) float64 scratch block while ranking co-occurrence or logits (~32 MB).
BLOCK_ENTRIES = 1 << 22


@dataclass(frozen=True)
class BrowserConfig:
    """What the browser computes per latent."""

    chunk_latents: int = 512
    """Latents per data chunk file (and per column-major block in memory)."""
    top_k_examples: int = 10
    """Top-activating examples per latent."""
    n_quantiles: int = 5
    """Equal-count groups of a latent's firings that examples are sampled from."""
    examples_per_quantile: int = 2
    """Examples taken from each group (evenly spaced ranks)."""
    context_window: int = 8
    """Tokens each side of an example (same document and window)."""
    n_bins: int = 32
    """Bins of the activation and logit histograms."""
    n_logits: int = 10
    """Promoted and suppressed tokens of the logit lens."""
    n_neighbours: int = 8
    """Nearest latents by decoder cosine, and co-occurring latents per metric."""
    pmi_min_count: int = 2
    """Pairs must fire together on at least this many tokens to be ranked by PMI."""
    n_top_tokens: int = 5
    """Distinct tokens a latent fires most strongly on (index table and token search)."""
    heatmap_latents: int = 96
    """Latents in the clustered similarity heatmap."""
    nnz_block: int = 1 << 22
    """Nonzeros read per step of the partition pass."""

    def __post_init__(self) -> None:
        for name in ("chunk_latents", "top_k_examples", "n_quantiles", "n_bins", "n_logits", "n_neighbours",
                     "n_top_tokens", "nnz_block"):
            if getattr(self, name) < 1:
                raise ValueError(f"BrowserConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.examples_per_quantile < 0 or self.context_window < 0 or self.pmi_min_count < 1:
            raise ValueError("BrowserConfig needs examples_per_quantile >= 0, context_window >= 0 and "
                             f"pmi_min_count >= 1, got {self.examples_per_quantile}, {self.context_window}, "
                             f"{self.pmi_min_count}")
        if self.heatmap_latents < 0:
            raise ValueError(f"BrowserConfig.heatmap_latents must be >= 0, got {self.heatmap_latents}")


def top_k_rows(values: np.ndarray, k: int) -> Neighbours:
    """The ``k`` largest entries of each row of a 2-D array, best first (ties: lower column first)."""
    k = min(k, values.shape[1])
    stream = BlockStream(values.shape, values.dtype, iter([Block(0, values)]), False, "rows", max(1, values.shape[0]))
    return top_k_neighbours(stream, k, exclude_self=False, progress=False)


# --- the CSR by latent ----------------------------------------------------------------------------

def window_starts(csr: LatentCSR, block: int = 1 << 22) -> np.ndarray:
    """Sorted rows where a new context starts: a row that does not continue the row before it
    (another document, or not its next token: :func:`sae_core.latents.follows`)."""
    starts = [np.zeros(1, np.int64)]
    for start in range(1, csr.n_rows, block):
        stop = min(start + block, csr.n_rows)
        new = ~follows(csr.doc_index[start - 1:stop], csr.position[start - 1:stop])
        starts.append(np.flatnonzero(new) + start)
    return np.concatenate(starts)


def context_bounds(starts: np.ndarray, n_rows: int, rows: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """First and last context row (inclusive) of each of ``rows``: ``window`` each side, same context."""
    segment = np.searchsorted(starts, rows, side="right") - 1
    seg_end = np.append(starts[1:], n_rows)[segment] - 1
    return np.maximum(rows - window, starts[segment]), np.minimum(rows + window, seg_end)


def small_ints(n: int) -> type:
    """The narrowest unsigned dtype for ids below ``n``: numpy's stable sort is a radix sort up to 16 bits."""
    return np.uint8 if n <= 1 << 8 else np.uint16 if n <= 1 << 16 else np.int64


def by_group_then_value(groups: np.ndarray, values: np.ndarray, tiebreak: np.ndarray) -> np.ndarray:
    """Order by group, then value descending, then ``tiebreak`` ascending.

    One unstable argsort of a 64-bit key (group, order-preserving bits of the float32 value), then
    the rare runs of equal keys re-sorted by ``tiebreak``: ~5x faster than a stable multi-key sort.
    """
    bits = np.ascontiguousarray(values, np.float32).view(np.uint32)
    ascending = np.where(bits >> 31, ~bits, bits | np.uint32(0x80000000))  # orders like the float
    key = (groups.astype(np.uint64) << np.uint64(32)) | (~ascending).astype(np.uint64)
    order = np.argsort(key)
    sorted_key = key[order]
    tied = np.flatnonzero(sorted_key[1:] == sorted_key[:-1])
    if tied.size:
        at = np.union1d(tied, tied + 1)
        sub = order[at]
        order[at] = sub[np.lexsort((tiebreak[sub], key[sub]))]
    return order


def partition_by_latent(csr: LatentCSR, chunk_latents: int, scratch: Path, block: int = 1 << 22,
                        progress: bool = True) -> list[int]:
    """Bucket the nonzeros by latent chunk into ``scratch/<chunk>.{rows,cols,vals}`` (rows ascending).

    Returns the number of entries per chunk.
    """
    from tqdm.auto import tqdm

    n_chunks = -(-csr.n_features // chunk_latents)
    handles = {(c, part): open(scratch / f"{c}.{part}", "wb")  # noqa: SIM115 - closed below
               for c in range(n_chunks) for part in ("rows", "cols", "vals")}
    sizes = np.zeros(n_chunks, np.int64)
    indptr = csr.indptr
    try:
        with tqdm(total=csr.nnz, desc="partition latents", unit="nnz", disable=not progress) as bar:
            row = 0
            while row < csr.n_rows:
                # as many rows as fit ``block`` nonzeros (at least one)
                stop = max(row + 1, int(np.searchsorted(indptr, indptr[row] + block, side="right")) - 1)
                stop = min(stop, csr.n_rows)
                lo, hi = int(indptr[row]), int(indptr[stop])
                cols = np.asarray(csr.indices[lo:hi], np.int64)
                rows = np.repeat(np.arange(row, stop, dtype=np.int64), np.diff(np.asarray(indptr[row:stop + 1])))
                vals = np.asarray(csr.data[lo:hi], np.float32)
                chunk = (cols // chunk_latents).astype(small_ints(n_chunks))
                order = np.argsort(chunk, kind="stable")  # radix sort for 16-bit keys
                bounds = np.searchsorted(chunk[order], np.arange(n_chunks + 1))
                for c in np.flatnonzero(np.diff(bounds)):
                    take = order[bounds[c]:bounds[c + 1]]
                    handles[c, "rows"].write(rows[take].tobytes())
                    handles[c, "cols"].write((cols[take] - c * chunk_latents).astype(np.int32).tobytes())
                    handles[c, "vals"].write(vals[take].tobytes())
                    sizes[c] += take.size
                bar.update(hi - lo)
                row = stop
    finally:
        for fh in handles.values():
            fh.close()
    return sizes.tolist()


class ChunkColumns:
    """The nonzeros of latents ``start .. stop`` by column: ``by_value`` and ``by_row`` orders.

    ``indptr[j]:indptr[j + 1]`` are latent ``start + j``'s entries in both orders; ``*_value``
    arrays are sorted by (-value, row) within a latent, ``*_row`` arrays by row.
    """

    def __init__(self, start: int, stop: int, rows: np.ndarray, cols: np.ndarray, vals: np.ndarray,
                 n_rows: int) -> None:
        self.start, self.stop, self.n_rows = start, stop, n_rows
        counts = np.bincount(cols, minlength=stop - start)
        self.indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        by_value = by_group_then_value(cols, vals, rows)
        self.rows_value, self.vals_value = rows[by_value], vals[by_value]
        by_row = np.argsort(cols.astype(small_ints(stop - start)), kind="stable")  # rows ascending per latent
        self.keys_row = cols[by_row].astype(np.int64) * n_rows + rows[by_row]
        self.vals_row = vals[by_row]

    @classmethod
    def load(cls, scratch: Path, chunk: int, start: int, stop: int, n_rows: int) -> ChunkColumns:
        rows, cols, vals = (np.fromfile(scratch / f"{chunk}.{part}", dtype)
                            for part, dtype in (("rows", np.int64), ("cols", np.int32), ("vals", np.float32)))
        return cls(start, stop, rows, cols.astype(np.int64), vals, n_rows)

    @property
    def counts(self) -> np.ndarray:
        return np.diff(self.indptr)

    def values_of(self, local: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Value of local latent ``local[i]`` at row ``rows[i]`` (0 where it does not fire)."""
        keys = local.astype(np.int64) * self.n_rows + rows
        at = np.minimum(np.searchsorted(self.keys_row, keys), max(self.keys_row.size - 1, 0))
        if self.keys_row.size == 0:
            return np.zeros(keys.shape, np.float32)
        return np.where(self.keys_row[at] == keys, self.vals_row[at], np.float32(0))


def chunk_stats(cols: ChunkColumns, n_rows: int) -> dict[str, np.ndarray]:
    """count, density, max, min and mean (over firings; 0 for a dead latent) of each latent."""
    counts = cols.counts
    alive = counts > 0
    first, last = cols.indptr[:-1], cols.indptr[1:] - 1
    pick = np.zeros(1, np.float32) if cols.vals_value.size == 0 else cols.vals_value
    maxima = np.where(alive, pick[np.where(alive, first, 0)], 0).astype(np.float64)
    minima = np.where(alive, pick[np.where(alive, last, 0)], 0).astype(np.float64)
    local = np.repeat(np.arange(counts.size), counts)
    sums = np.bincount(local, weights=cols.vals_value, minlength=counts.size)
    mean = np.divide(sums, counts, out=np.zeros_like(sums), where=alive)
    return {"count": counts, "density": counts / max(n_rows, 1), "max": maxima, "min": minima, "mean": mean}


def histograms(values: np.ndarray, owner: np.ndarray, lo: np.ndarray, hi: np.ndarray,
               n_bins: int, exact: bool = True) -> np.ndarray:
    """(n, n_bins) counts of ``values`` per owner row, ``n_bins`` equal bins over ``[lo, hi]`` each.

    Bin edges and boundary handling are those of ``numpy.histogram(v, n_bins, range=(lo, hi))``;
    ``exact=False`` skips numpy's edge corrections (a value within rounding of an edge may land
    in the neighbouring bin), a third of the cost for the logit histograms.
    """
    n = lo.size
    degenerate = hi <= lo  # numpy widens an empty range by 0.5 each side
    lo, hi = np.where(degenerate, lo - 0.5, lo), np.where(degenerate, hi + 0.5, hi)
    span = hi - lo
    v = values.astype(np.float64)
    index = ((v - lo[owner]) / span[owner] * n_bins).astype(np.int64)
    index[index == n_bins] -= 1
    if not exact:
        return np.bincount(owner * n_bins + index, minlength=n * n_bins).reshape(n, n_bins)
    edges = lo[:, None] + np.arange(n_bins + 1) * (span / n_bins)[:, None]  # np.linspace's values
    edges[:, -1] = hi
    index[v < edges[owner, index]] -= 1
    index[(v >= edges[owner, index + 1]) & (index != n_bins - 1)] += 1
    return np.bincount(owner * n_bins + index, minlength=n * n_bins).reshape(n, n_bins)


def example_ranks(count: int, config: BrowserConfig) -> tuple[list[int], list[tuple[int, int, list[int]]]]:
    """Ranks (0 = largest value) of the top examples and, per quantile group, its (first, stop, ranks)."""
    top = list(range(min(count, config.top_k_examples)))
    groups = []
    for q in range(config.n_quantiles if config.examples_per_quantile else 0):
        first, stop = q * count // config.n_quantiles, (q + 1) * count // config.n_quantiles
        length = stop - first
        if length <= 0:
            continue
        take = min(config.examples_per_quantile, length)
        groups.append((first, stop, [first + (2 * j + 1) * length // (2 * take) for j in range(take)]))
    return top, groups


class Contexts(NamedTuple):
    """Context rows of examples, flattened: example ``e`` is ``flat[offsets[e]:offsets[e + 1]]``."""

    flat: np.ndarray
    offsets: np.ndarray
    focus: np.ndarray  # index of the example's row within its context


def gather_contexts(rows: np.ndarray, starts: np.ndarray, n_rows: int, window: int) -> Contexts:
    lo, hi = context_bounds(starts, n_rows, rows, window)
    lengths = hi - lo + 1
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    flat = np.repeat(lo, lengths) + (np.arange(offsets[-1]) - np.repeat(offsets[:-1], lengths))
    return Contexts(flat, offsets, rows - lo)


def first_occurrences(keys: np.ndarray) -> np.ndarray:
    """Index of the first occurrence of each distinct non-negative key (one sort of key x size + index)."""
    size = keys.size
    if size == 0 or int(keys.max()) >= np.iinfo(np.int64).max // max(size, 1):
        return np.unique(keys, return_index=True)[1]
    composite = np.sort(keys.astype(np.int64) * size + np.arange(size))
    distinct, position = np.divmod(composite, size)
    return position[np.concatenate([[True], distinct[1:] != distinct[:-1]])]


def top_tokens(cols: ChunkColumns, token_ids: np.ndarray, n: int) -> list[list[tuple[int, float]]]:
    """Per latent, the ``n`` distinct tokens with the highest activation on them: (token, max value)."""
    m = cols.stop - cols.start
    if cols.rows_value.size == 0:
        return [[] for _ in range(m)]
    tokens = np.asarray(token_ids[cols.rows_value], np.int64)
    local = np.repeat(np.arange(m, dtype=np.int64), cols.counts)
    vocab = int(tokens.max()) + 1
    first = first_occurrences(local * vocab + tokens)  # by_value order: the first is the highest value
    lat, tok, val = local[first], tokens[first], cols.vals_value[first]
    order = by_group_then_value(lat, val, tok)
    lat, tok, val = lat[order], tok[order], val[order]
    rank = np.arange(lat.size) - np.searchsorted(lat, lat, side="left")
    keep = rank < n
    out: list[list[tuple[int, float]]] = [[] for _ in range(m)]
    for latent, token, value in zip(lat[keep].tolist(), tok[keep].tolist(), val[keep].tolist(), strict=True):
        out[latent].append((token, value))
    return out


# --- decoder: logit lens, neighbours --------------------------------------------------------------
