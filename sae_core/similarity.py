"""Latent-by-latent matrices (decoder similarity, co-occurrence) and top-k neighbours, out of core.

Every matrix is produced as a stream of row blocks (:class:`BlockStream`) of ``chunk_size`` rows;
:func:`write_blocks` writes a stream into a ``.npy`` file and :func:`top_k_neighbours` reduces one
to the ``k`` best columns per row. Peak memory is the inputs plus one ``(chunk_size, n)`` block,
never ``n x n``; the same path serves one SAE against itself and SAE A against SAE B.

Metrics (``W`` rows are decoder directions; ``n_i`` = rows where latent ``i`` fires, ``N`` = rows,
``C_ij`` = rows where both fire):

- similarity: ``cosine`` (a zero decoder row has cosine 0 with every row, itself included),
  ``dot``, ``neg_euclidean`` = ``-||w_i - w_j||`` (exactly 0 on the diagonal).
- co-occurrence: ``count`` = ``C_ij``; ``jaccard`` = ``C_ij / (n_i + n_j - C_ij)``;
  ``correlation`` = phi = Pearson correlation of the binary firing columns
  ``(N C_ij - n_i n_j) / sqrt(n_i (N - n_i) n_j (N - n_j))``; ``pmi`` = ``log(N C_ij / (n_i n_j))``.
- Values that the formulas leave undefined are fixed, never NaN. Jaccard: 0 when the union is
  empty (two latents that never fire share no evidence of overlap, so dead latents are not each
  other's nearest neighbours); the diagonal is 1 for every latent. Correlation: a latent that never
  fires (or fires on every row) is constant, so 0 with every other latent and 1 with itself: the
  matrix keeps a unit diagonal and stays positive semi-definite, a valid correlation matrix. PMI:
  0 where ``C_ij = 0`` (including latents that never fire). The true value there is -inf; any
  finite floor would be arbitrary, and 0 ("no evidence of association") keeps means and
  top-k searches finite. The PMI diagonal is ``log(N / n_i)`` (0 for a latent that never fires).

Decisions:
- Blocks are written with ``os.pwrite`` at their offset in a ``.npy`` whose header comes from
  ``np.lib.format``, not through a writable memmap: dirty pages of a mapping count in the process's
  RSS (a naive memmap at 65,536 latents peaked at 16.8 GB). After each block,
  ``posix_fadvise(DONTNEED)`` starts write-back of that block and drops the previous one's (by then
  clean) pages, so the page cache held stays near two blocks. The file is written under a temporary
  name and renamed when complete (``sae_core.files.atomic_path``).
- Co-occurrence transposes the CSR's binary firing pattern once (``scipy.sparse``: latents x
  rows) and counts each row block ``C[block] = X.T[block] @ X`` straight into a dense
  ``(chunk_size, n)`` array: for every (latent, row) where the latent fires, the latents of that
  row are gathered and tallied with ``np.bincount`` (:func:`_count_block`). This is the same work
  as scipy's sparse product but skips building a sparse result that is nearly dense anyway
  (~2x faster, and no 3.7 GB one-shot ``X.T @ X`` at 16,384 latents). Scratch is capped at
  ``COUNT_SCRATCH_ENTRIES`` gathered entries. Counts are exact integers; metrics are computed in
  float64.
- Self-similarity does not exploit symmetry: it would halve the flops but scatter the mirrored
  writes across the whole file (small, unaligned writes after their pages were dropped).
- Each stream reuses one output buffer (a block is valid until the next is requested). numpy only
  (no torch import: ~200 MB of RSS): CPU BLAS runs the blocks. Top-k ranks only the entries above a
  per-row threshold from a column sample (``_rows_top_k``), in row slices of ~64 MB of index scratch.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import scipy.sparse as sp
from jaxtyping import Float
from tqdm.auto import tqdm

from sae_core.files import atomic_path
from sae_core.latents import LatentCSR, as_host_array, firing_counts

if TYPE_CHECKING:  # annotations only: importing torch costs ~200 MB of RSS
    from torch import Tensor
logger = logging.getLogger(__name__)

SIMILARITY_METRICS = ("cosine", "dot", "neg_euclidean")
COOCCURRENCE_METRICS = ("count", "correlation", "jaccard", "pmi")
TOPK_SCRATCH_BYTES = 64 << 20  # index scratch per top-k slice (int64 per matrix entry, worst case)
TOPK_SAMPLE_COLUMNS = 2048  # columns sampled per row to bound its k-th largest entry from below
COUNT_SCRATCH_ENTRIES = 1 << 23  # gathered (latent, co-firing latent) entries per np.bincount call


class Block(NamedTuple):
    """Rows ``start .. start + len(values)`` of a matrix."""

    start: int
    values: np.ndarray  # (rows, n_cols); reused by the stream for the next block


class BlockStream(NamedTuple):
    """A matrix of ``shape`` produced block by block; ``is_self``: row i and column i are the same latent."""

    shape: tuple[int, int]
    dtype: np.dtype
    blocks: Iterator[Block]
    is_self: bool
    description: str
    chunk_size: int

    @property
    def n_blocks(self) -> int:
        return -(-self.shape[0] // self.chunk_size)


class Neighbours(NamedTuple):
    """Per row, the ``k`` best columns, best first.

    Equal values are listed lower column first; which of several columns tied at the k-th place
    is kept is unspecified.
    """

    indices: np.ndarray  # (n, k) int64
    values: np.ndarray  # (n, k)


def _check(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; use one of {', '.join(allowed)}")


def _check_chunk(chunk_size: int) -> None:
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")


def similarity_blocks(W: Float[np.ndarray, "n d_in"] | Float[Tensor, "n d_in"], metric: str = "cosine",
                      chunk_size: int = 1024, other: Any = None, dtype: Any = np.float32) -> BlockStream:
    """Row blocks of the (n, n) similarity of the rows of ``W``, or (n_a, n_b) against ``other``'s rows."""
    _check("similarity metric", metric, SIMILARITY_METRICS)
    _check_chunk(chunk_size)
    a = as_host_array(W, dtype, "W")
    b = a if other is None else as_host_array(other, dtype, "other")
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"need two (n, d_in) matrices with the same d_in, got {a.shape} and {b.shape}")

    def norms(x: np.ndarray) -> np.ndarray:
        return np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64))

    def inverse(x: np.ndarray) -> np.ndarray:
        return np.divide(1.0, x, out=np.zeros_like(x), where=x > 0).astype(dtype)

    norm_a = norms(a)
    norm_b = norm_a if other is None else norms(b)

    def blocks() -> Iterator[Block]:
        buffer = np.empty((min(chunk_size, a.shape[0]), b.shape[0]), dtype)
        inv_b, sq_b = inverse(norm_b), (norm_b**2).astype(dtype)
        for start in range(0, a.shape[0], chunk_size):
            rows = slice(start, min(start + chunk_size, a.shape[0]))
            out = buffer[: rows.stop - start]
            np.matmul(a[rows], b.T, out=out)  # (rows, n_b)
            if metric == "cosine":
                out *= inverse(norm_a[rows])[:, None]
                out *= inv_b[None, :]
            elif metric == "neg_euclidean":
                out *= -2
                out += (norm_a[rows] ** 2).astype(dtype)[:, None]
                out += sq_b[None, :]
                np.sqrt(np.maximum(out, 0, out=out), out=out)
                np.negative(out, out=out)
                if other is None:
                    out[np.arange(out.shape[0]), np.arange(rows.start, rows.stop)] = 0
            yield Block(start, out)

    return BlockStream((a.shape[0], b.shape[0]), np.dtype(dtype), blocks(), other is None,
                       f"{metric} similarity", chunk_size)


def _cooccurrence_metric(counts: np.ndarray, n_rows: np.ndarray, n_cols: np.ndarray, total: int,
                         metric: str, diagonal: np.ndarray | None, out: np.ndarray) -> None:
    """Fill ``out`` (rows, n) with ``metric`` from int counts ``C`` (rows, n) and firing counts."""
    if metric == "count":
        out[...] = counts
        return
    c = counts.astype(np.float64)
    if metric == "jaccard":
        union = n_rows[:, None] + n_cols[None, :] - c
        np.divide(c, union, out=out, where=union > 0)
        out[union <= 0] = 0
    elif metric == "correlation":
        numerator = total * counts.astype(np.int64) - np.outer(n_rows, n_cols)  # exact in int64
        spread_rows = np.sqrt(n_rows * (total - n_rows).astype(np.float64))
        spread_cols = np.sqrt(n_cols * (total - n_cols).astype(np.float64))
        denominator = spread_rows[:, None] * spread_cols[None, :]
        np.divide(numerator, denominator, out=out, where=denominator > 0)
        out[denominator <= 0] = 0
    else:  # pmi
        expected = np.outer(n_rows, n_cols).astype(np.float64)
        ratio = np.divide(c * total, expected, out=np.ones_like(c), where=c > 0)
        np.log(ratio, out=out, casting="same_kind")
    if diagonal is not None and metric in ("jaccard", "correlation"):
        out[np.arange(out.shape[0]), diagonal] = 1


def _count_block(by_latent: sp.csr_matrix, indptr: np.ndarray, indices: np.ndarray, start: int, stop: int,
                 out: np.ndarray) -> None:
    """``out[i - start, j]`` = rows where latents ``i`` and ``j`` both fire, for ``start <= i < stop``.

    ``by_latent`` (latents x rows) lists the rows each latent fires on; ``indptr`` / ``indices`` are
    the CSR's (rows x latents). Each (latent, row) pair contributes the latents of that row: they
    are gathered into keys ``local_latent * n + j`` and tallied by ``np.bincount``, a few latents
    at a time so that at most ``COUNT_SCRATCH_ENTRIES`` keys exist at once.
    """
    n = out.shape[1]
    pair_ptr = by_latent.indptr[start:stop + 1].astype(np.int64)
    rows = by_latent.indices[pair_ptr[0]:pair_ptr[-1]]
    lengths = indptr[rows + 1] - indptr[rows]  # latents of each paired row
    entry_ptr = np.concatenate([[0], np.cumsum(lengths)])
    per_latent = entry_ptr[pair_ptr - pair_ptr[0]]  # entries before each latent of the block
    first = 0
    while first < stop - start:
        # as many latents as fit the scratch budget (at least one)
        last = max(first + 1, int(np.searchsorted(per_latent, per_latent[first] + COUNT_SCRATCH_ENTRIES, "right")) - 1)
        last = min(last, stop - start)
        p0, p1 = pair_ptr[first] - pair_ptr[0], pair_ptr[last] - pair_ptr[0]
        take = lengths[p0:p1]
        total = int(per_latent[last] - per_latent[first])
        # position in `indices` of every gathered entry: each pair's row slice, laid end to end
        offsets = np.arange(total, dtype=np.int64)
        offsets += np.repeat(indptr[rows[p0:p1]] - (entry_ptr[p0:p1] - entry_ptr[p0]), take)
        local = np.repeat(np.arange(last - first, dtype=np.int64), np.diff(pair_ptr[first:last + 1]))
        keys = np.repeat(local * n, take)
        keys += indices[offsets]
        out[first:last] = np.bincount(keys, minlength=(last - first) * n).reshape(last - first, n)
        first = last


def cooccurrence_blocks(csr: LatentCSR, metric: str = "jaccard", chunk_size: int = 512,
                        dtype: Any = np.float32) -> BlockStream:
    """Row blocks of the (n, n) co-occurrence ``metric`` of the latents' binary firing over the CSR rows."""
    _check("co-occurrence metric", metric, COOCCURRENCE_METRICS)
    _check_chunk(chunk_size)
    if csr.n_rows == 0:
        raise ValueError(f"{csr.folder} holds no rows; co-occurrence is undefined")
    n = csr.n_features
    indptr, indices = np.asarray(csr.indptr, np.int64), np.asarray(csr.indices)
    fired = firing_counts(csr)[0]

    def blocks() -> Iterator[Block]:
        binary = sp.csr_matrix((np.ones(csr.nnz, np.int8), indices, indptr), shape=(csr.n_rows, n), copy=False)
        by_latent = binary.T.tocsr()  # (n, rows): the rows where each latent fires, built once
        count_buffer = np.empty((min(chunk_size, n), n), np.int64)
        buffer = np.empty((min(chunk_size, n), n), dtype)
        for start in range(0, n, chunk_size):
            stop = min(start + chunk_size, n)
            counts = count_buffer[: stop - start]
            _count_block(by_latent, indptr, indices, start, stop, counts)  # (rows, n) C_ij
            out = buffer[: stop - start]
            _cooccurrence_metric(counts, fired[start:stop], fired, csr.n_rows, metric, np.arange(start, stop), out)
            yield Block(start, out)

    return BlockStream((n, n), np.dtype(dtype), blocks(), True, f"{metric} co-occurrence", chunk_size)


def _npy_layout(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    with open(path, "rb") as fh:
        version = np.lib.format.read_magic(fh)
        shape, fortran, dtype = (np.lib.format.read_array_header_1_0(fh) if version == (1, 0)
                                 else np.lib.format.read_array_header_2_0(fh))
        if fortran:
            raise ValueError(f"{path} is stored in Fortran order; save it C-ordered")
        return shape, dtype, fh.tell()


def matrix_blocks(matrix: np.ndarray | str | os.PathLike[str], chunk_size: int = 1024,
                  is_self: bool | None = None) -> BlockStream:
    """Row blocks of a stored (n, m) matrix: an array, or a ``.npy`` path read with ``pread`` (no mapping).

    ``is_self`` (default: the matrix is square) says whether row i and column i are the same latent.
    """
    _check_chunk(chunk_size)
    if isinstance(matrix, (str, os.PathLike)):
        path = Path(matrix)
        shape, dtype, offset = _npy_layout(path)
        array = None
    else:
        array = np.asarray(matrix)
        shape, dtype = array.shape, array.dtype
    if len(shape) != 2:
        raise ValueError(f"need a 2-D matrix, got shape {shape}")
    row_bytes = shape[1] * dtype.itemsize

    def blocks() -> Iterator[Block]:
        buffer = np.empty((min(chunk_size, shape[0]), shape[1]), dtype)
        fd = os.open(path, os.O_RDONLY) if array is None else -1
        try:
            for start in range(0, shape[0], chunk_size):
                out = buffer[: min(chunk_size, shape[0] - start)]
                if array is None:
                    _pread_into(fd, out, offset + start * row_bytes)
                else:
                    out[...] = array[start:start + out.shape[0]]
                yield Block(start, out)
        finally:
            if fd >= 0:
                os.close(fd)

    square = shape[0] == shape[1]
    return BlockStream((shape[0], shape[1]), dtype, blocks(), square if is_self is None else is_self,
                       "stored matrix", chunk_size)


def _pread_into(fd: int, out: np.ndarray, position: int) -> None:
    view = memoryview(out).cast("B")
    while view.nbytes:
        got = os.preadv(fd, [view], position)
        if got == 0:
            raise EOFError("the .npy file is shorter than its header says; it is truncated")
        view, position = view[got:], position + got
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, position - out.nbytes, out.nbytes, os.POSIX_FADV_DONTNEED)


def _release(fd: int, position: int, length: int) -> None:
    """Start write-back of (or drop, once clean) the page cache of a file range."""
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, position, length, os.POSIX_FADV_DONTNEED)


def write_blocks(stream: BlockStream, path: str | os.PathLike[str], progress: bool = True) -> Path:
    """Write a stream into the ``.npy`` file ``path`` (atomically), releasing pages block by block."""
    path = Path(path)
    n_rows, n_cols = stream.shape
    row_bytes = n_cols * stream.dtype.itemsize
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, {"descr": np.lib.format.dtype_to_descr(stream.dtype),
                                                  "fortran_order": False, "shape": (n_rows, n_cols)})
        offset = fh.tell()
        fh.truncate(offset + n_rows * row_bytes)  # sparse file: no page is touched yet
        fd, previous, written = fh.fileno(), None, 0
        for block in tqdm(stream.blocks, desc=f"write {stream.description}", total=stream.n_blocks,
                          disable=not progress):
            values = np.ascontiguousarray(block.values, dtype=stream.dtype)
            if values.shape[1] != n_cols:
                raise ValueError(f"a block has {values.shape[1]} columns, the stream {n_cols}")
            view, position = memoryview(values).cast("B"), offset + block.start * row_bytes
            current = (position, view.nbytes)
            while view.nbytes:
                done = os.pwrite(fd, view, position)
                view, position = view[done:], position + done
            _release(fd, *current)
            if previous is not None:
                _release(fd, *previous)
            previous, written = current, written + values.shape[0]
        if written != n_rows:
            raise RuntimeError(f"the stream produced {written} of {n_rows} rows; the file is incomplete")
        if hasattr(os, "fdatasync"):
            os.fdatasync(fd)
        else:
            os.fsync(fd)
        _release(fd, 0, 0)
    logger.info("wrote %s %s to %s", stream.description, stream.shape, path)
    return path


def _output_path(out: str | os.PathLike[str] | None, filename: str) -> Path:
    if out is None:
        raise ValueError("give out=<folder> for the .npy result (it can be too large to hold in memory)")
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    return folder / filename


def compute_feature_similarity(W_dec: Float[np.ndarray, "n d_in"] | Float[Tensor, "n d_in"], metric: str = "cosine",
                               chunk_size: int = 1024, *, out: str | os.PathLike[str] | None = None,
                               other: Any = None, filename: str | None = None, dtype: Any = np.float32) -> Path:
    """Write the (n, n) decoder similarity (or (n_a, n_b) against ``other``) to ``out/filename``.

    ``filename`` defaults to ``similarity_<metric>.npy`` (``cross_similarity_<metric>.npy`` with
    ``other``). Returns the path; reopen it with ``np.load(path, mmap_mode="r")``.
    """
    name = filename or f"{'cross_' if other is not None else ''}similarity_{metric}.npy"
    path = _output_path(out, name)
    return write_blocks(similarity_blocks(W_dec, metric, chunk_size, other=other, dtype=dtype), path)


def compute_feature_cooccurrence(csr: LatentCSR, metric: str = "jaccard", chunk_size: int = 512, *,
                                 out: str | os.PathLike[str] | None = None, filename: str | None = None,
                                 dtype: Any = np.float32) -> Path:
    """Write the (n, n) co-occurrence ``metric`` of the store's latents to ``out/filename``.

    ``filename`` defaults to ``cooccurrence_<metric>.npy``. Returns the path. float32 holds counts
    exactly up to 2**24 rows; pass ``dtype=np.int64`` for exact counts over more rows.
    """
    path = _output_path(out, filename or f"cooccurrence_{metric}.npy")
    return write_blocks(cooccurrence_blocks(csr, metric, chunk_size, dtype=dtype), path)


def _rows_top_k(values: np.ndarray, k: int) -> np.ndarray:
    """Column indices of the k largest entries per row (unsorted).

    A row's k-th largest entry among a strided sample of its columns bounds its true k-th largest
    from below, so only entries at or above that threshold (about ``k * n / sample`` per row) are
    ranked; a full ``argpartition`` (~17 ns per entry) would cost as much as the matmul.
    """
    n_rows, n_cols = values.shape
    stride = max(1, n_cols // TOPK_SAMPLE_COLUMNS)
    sample = values[:, ::stride]  # (rows, m) view
    if stride == 1 or sample.shape[1] <= k:
        return np.argpartition(values, n_cols - k, axis=1)[:, n_cols - k:]
    threshold = np.partition(sample, sample.shape[1] - k, axis=1)[:, sample.shape[1] - k]
    flat = np.flatnonzero(values >= threshold[:, None])  # row-major candidates
    if flat.size > values.size // 8:  # heavy ties at the threshold: the sample did not help
        return np.argpartition(values, n_cols - k, axis=1)[:, n_cols - k:]
    rows, cols = np.divmod(flat, n_cols)
    order = np.lexsort((cols, -values.reshape(-1)[flat], rows))  # by row, best first
    rank = np.arange(order.size) - np.searchsorted(rows[order], rows[order], side="left")
    return cols[order[rank < k]].reshape(n_rows, k)


def _block_top_k(values: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices, values) of the k largest entries per row, best first (ties: lower index first)."""
    step = max(1, TOPK_SCRATCH_BYTES // (8 * values.shape[1]))
    indices = np.concatenate([_rows_top_k(values[start:start + step], k)
                              for start in range(0, values.shape[0], step)]).astype(np.int64)
    best = np.take_along_axis(values, indices, axis=1)
    order = np.lexsort((indices, -best), axis=1)
    return np.take_along_axis(indices, order, axis=1), np.take_along_axis(best, order, axis=1)


def top_k_neighbours(stream: BlockStream, k: int, *, exclude_self: bool | None = None,
                     out: str | os.PathLike[str] | None = None, name: str = "neighbours",
                     progress: bool = True) -> Neighbours:
    """The ``k`` largest entries of each row of a stream, without materialising the matrix.

    ``exclude_self`` (default: ``stream.is_self``) skips column i in row i. With ``out``, the
    result is also saved as ``out/<name>_indices.npy`` and ``out/<name>_values.npy`` and returned
    as read-only memmaps.
    """
    n_rows, n_cols = stream.shape
    exclude = stream.is_self if exclude_self is None else exclude_self
    if not 1 <= k <= n_cols - int(exclude):
        raise ValueError(f"k must be in 1..{n_cols - int(exclude)} for {n_cols} columns"
                         f"{' excluding self' if exclude else ''}, got {k}")
    indices = np.empty((n_rows, k), np.int64)
    values = np.empty((n_rows, k), stream.dtype)
    lowest = -np.inf if np.issubdtype(stream.dtype, np.floating) else np.iinfo(stream.dtype).min
    for block in tqdm(stream.blocks, desc=f"top-{k} {stream.description}", total=stream.n_blocks,
                      disable=not progress):
        rows = np.arange(block.values.shape[0])
        if exclude:
            block.values[rows, block.start + rows] = lowest
        stop = block.start + rows.size
        indices[block.start:stop], values[block.start:stop] = _block_top_k(block.values, k)
    if out is None:
        return Neighbours(indices, values)
    paths = [_output_path(out, f"{name}_{part}.npy") for part in ("indices", "values")]
    for path, array in zip(paths, (indices, values), strict=True):
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.save(fh, array)
    logger.info("wrote top-%d neighbours to %s and %s", k, *paths)
    return Neighbours(*(np.load(path, mmap_mode="r") for path in paths))


def match_features(W_a: Float[np.ndarray, "n_a d_in"] | Float[Tensor, "n_a d_in"],
                   W_b: Float[np.ndarray, "n_b d_in"] | Float[Tensor, "n_b d_in"], metric: str = "cosine",
                   k: int = 1, chunk_size: int = 1024) -> Neighbours:
    """For each latent of SAE A, its ``k`` best-matching latents of SAE B by decoder ``metric``."""
    return top_k_neighbours(similarity_blocks(W_a, metric, chunk_size, other=W_b), k, exclude_self=False)
