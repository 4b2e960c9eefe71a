"""Chunked similarity, co-occurrence and top-k neighbours against dense numpy / scipy references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

from sae_core import similarity
from sae_core.latents import CSRBuilder
from sae_core.similarity import (
    BlockStream,
    compute_feature_cooccurrence,
    compute_feature_similarity,
    cooccurrence_blocks,
    match_features,
    matrix_blocks,
    similarity_blocks,
    top_k_neighbours,
    write_blocks,
)

TOL = {"rtol": 1e-5, "atol": 1e-5}


def dense_similarity(a: np.ndarray, b: np.ndarray, metric: str) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    if metric == "dot":
        return a @ b.T
    if metric == "neg_euclidean":
        return -cdist(a, b)
    with np.errstate(invalid="ignore"):
        cosine = 1 - cdist(a, b, "cosine")
    return np.nan_to_num(cosine)  # scipy leaves zero rows undefined: 0 by our convention


@pytest.fixture()
def decoder() -> np.ndarray:
    W = np.random.default_rng(0).normal(size=(37, 12)).astype(np.float32)
    W[5] = 0  # a zero decoder row
    return W


@pytest.mark.parametrize("metric", ["cosine", "dot", "neg_euclidean"])
@pytest.mark.parametrize("chunk_size", [5, 64])
def test_similarity_equals_dense(tmp_path, decoder, metric, chunk_size):
    path = compute_feature_similarity(torch.from_numpy(decoder), metric, chunk_size, out=tmp_path)
    result = np.load(path, mmap_mode="r")
    assert isinstance(result, np.memmap) and path.parent == tmp_path
    np.testing.assert_allclose(result, dense_similarity(decoder, decoder, metric), **TOL)
    if metric == "neg_euclidean":
        np.testing.assert_array_equal(np.diag(result), 0)


@pytest.mark.parametrize("metric", ["cosine", "neg_euclidean"])
def test_cross_similarity_and_matching(tmp_path, decoder, metric, sample_columns):
    other = np.random.default_rng(1).normal(size=(23, 12)).astype(np.float32)
    path = compute_feature_similarity(decoder, metric, 7, out=tmp_path, other=other)
    expected = dense_similarity(decoder, other, metric)
    np.testing.assert_allclose(np.load(path, mmap_mode="r"), expected, **TOL)
    match = match_features(decoder, other, metric, k=3, chunk_size=6)
    np.testing.assert_allclose(match.values, -np.sort(-expected, axis=1)[:, :3], **TOL)
    np.testing.assert_allclose(np.take_along_axis(expected, match.indices, axis=1), match.values, **TOL)


def binary_store(tmp_path, n_rows=60, n_features=19):
    rng = np.random.default_rng(2)
    dense = np.where(rng.random((n_rows, n_features)) < 0.25, rng.random((n_rows, n_features)) + 0.1, 0)
    dense[:, [4, 13]] = 0  # never fire
    dense[:, 7] = 0.5  # fires on every row: a constant firing column
    dense[:, 8] = dense[:, 2]  # identical firing
    with CSRBuilder(workdir=tmp_path) as builder:
        builder.add(dense.astype(np.float32), np.arange(n_rows), np.zeros(n_rows), np.arange(n_rows))
        csr = builder.finish(tmp_path / "store")
    return csr, (dense != 0).astype(np.float64)


def dense_cooccurrence(binary: np.ndarray, metric: str) -> np.ndarray:
    """The metrics with numpy / scipy on the dense binary matrix, then the documented conventions."""
    n_rows, n = binary.shape
    counts = binary.T @ binary
    fired = binary.sum(axis=0)
    if metric == "count":
        return counts
    if metric == "jaccard":
        result = 1 - cdist(binary.T.astype(bool), binary.T.astype(bool), "jaccard")
        both_dead = (fired[:, None] == 0) & (fired[None, :] == 0)
        result[both_dead] = 0  # scipy calls two empty sets identical; ours: empty union -> 0
        np.fill_diagonal(result, 1)
        return result
    if metric == "correlation":
        with np.errstate(invalid="ignore", divide="ignore"):
            result = np.corrcoef(binary.T)
        result = np.nan_to_num(result)
        np.fill_diagonal(result, 1)
        return result
    with np.errstate(divide="ignore", invalid="ignore"):
        pmi = np.log((counts / n_rows) / np.outer(fired / n_rows, fired / n_rows))
    return np.where(counts > 0, pmi, 0)


@pytest.mark.parametrize("metric", ["count", "jaccard", "correlation", "pmi"])
@pytest.mark.parametrize("chunk_size", [4, 512])
def test_cooccurrence_equals_dense(tmp_path, metric, chunk_size):
    csr, binary = binary_store(tmp_path)
    path = compute_feature_cooccurrence(csr, metric, chunk_size, out=tmp_path / "analysis")
    result = np.load(path, mmap_mode="r")
    assert isinstance(result, np.memmap) and np.isfinite(result).all()
    np.testing.assert_allclose(result, dense_cooccurrence(binary, metric), **TOL)


@pytest.mark.parametrize("scratch_entries", [1, 40, 10_000])
def test_cooccurrence_counts_split_over_scratch_budget(tmp_path, monkeypatch, scratch_entries):
    """Counting in small bincount slices (down to one latent at a time) still gives X.T @ X."""
    from sae_core import similarity

    monkeypatch.setattr(similarity, "COUNT_SCRATCH_ENTRIES", scratch_entries)
    csr, binary = binary_store(tmp_path)
    stream = cooccurrence_blocks(csr, "count", chunk_size=5, dtype=np.int64)
    result = np.concatenate([block.values.copy() for block in stream.blocks])
    np.testing.assert_array_equal(result, (binary.T @ binary).astype(np.int64))


def check_neighbours(neighbours, dense: np.ndarray, k: int, exclude_self: bool) -> None:
    dense = dense.astype(np.float64).copy()
    if exclude_self:
        np.fill_diagonal(dense, -np.inf)
    np.testing.assert_allclose(neighbours.values, -np.sort(-dense, axis=1)[:, :k], **TOL)
    # Indices point at those values (ties may pick either column) and never at the row itself.
    np.testing.assert_allclose(np.take_along_axis(dense, np.asarray(neighbours.indices), axis=1),
                               neighbours.values, **TOL)
    assert all(len(set(row)) == k for row in np.asarray(neighbours.indices).tolist())


@pytest.fixture(params=[2048, 64], ids=["full-rank", "sampled-threshold"])
def sample_columns(request, monkeypatch):
    """Top-k ranks whole rows (2048 > n) or only entries above a threshold from a column sample."""
    monkeypatch.setattr(similarity, "TOPK_SAMPLE_COLUMNS", request.param)
    return request.param


@pytest.mark.parametrize("metric", ["cosine", "neg_euclidean", "dot"])
def test_top_k_similarity_neighbours(metric, sample_columns):
    W = np.random.default_rng(3).normal(size=(301, 12)).astype(np.float32)  # 301 > 2 x 64 sampled columns
    neighbours = top_k_neighbours(similarity_blocks(W, metric, chunk_size=50), k=5)
    check_neighbours(neighbours, dense_similarity(W, W, metric), 5, exclude_self=True)
    assert not (np.asarray(neighbours.indices) == np.arange(301)[:, None]).any()


@pytest.mark.parametrize("metric", ["jaccard", "pmi", "correlation", "count"])
def test_top_k_cooccurrence_neighbours_saved(tmp_path, metric, sample_columns):
    csr, binary = binary_store(tmp_path)
    neighbours = top_k_neighbours(cooccurrence_blocks(csr, metric, chunk_size=3), k=4, out=tmp_path / "nb")
    assert isinstance(neighbours.indices, np.memmap)
    reopened = np.load(tmp_path / "nb" / "neighbours_values.npy", mmap_mode="r")
    np.testing.assert_array_equal(reopened, neighbours.values)
    check_neighbours(neighbours, dense_cooccurrence(binary, metric), 4, exclude_self=True)


def test_top_k_from_stored_matrix(tmp_path, decoder):
    path = compute_feature_similarity(decoder, "cosine", 8, out=tmp_path)
    from_file = top_k_neighbours(matrix_blocks(path, chunk_size=7), k=3)
    from_array = top_k_neighbours(matrix_blocks(np.load(path), chunk_size=40), k=3)
    check_neighbours(from_file, dense_similarity(decoder, decoder, "cosine"), 3, exclude_self=True)
    np.testing.assert_array_equal(from_file.indices, from_array.indices)


def test_interrupted_write_leaves_no_file(tmp_path, decoder):
    stream = similarity_blocks(decoder, "dot", chunk_size=5)

    def failing():
        for number, block in enumerate(stream.blocks):
            if number == 3:
                raise KeyboardInterrupt
            yield block

    with pytest.raises(KeyboardInterrupt):
        write_blocks(BlockStream(stream.shape, stream.dtype, failing(), True, "dot", 5), tmp_path / "s.npy")
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments(tmp_path, decoder):
    with pytest.raises(ValueError, match="cosine, dot, neg_euclidean"):
        similarity_blocks(decoder, "manhattan")
    with pytest.raises(ValueError, match="same d_in"):
        similarity_blocks(decoder, other=np.zeros((3, 5), np.float32))
    with pytest.raises(ValueError, match="out="):
        compute_feature_similarity(decoder)
    with pytest.raises(ValueError, match="k must be in 1..36"):
        top_k_neighbours(similarity_blocks(decoder), k=37)
    csr, _ = binary_store(tmp_path)
    with pytest.raises(ValueError, match="count, correlation, jaccard, pmi"):
        cooccurrence_blocks(csr, "phi")


def test_integer_counts_and_their_neighbours(tmp_path):
    csr, binary = binary_store(tmp_path)
    path = compute_feature_cooccurrence(csr, "count", 5, out=tmp_path, dtype=np.int64)
    counts = np.load(path, mmap_mode="r")
    assert counts.dtype == np.int64
    np.testing.assert_array_equal(counts, binary.T @ binary)
    neighbours = top_k_neighbours(cooccurrence_blocks(csr, "count", 6, dtype=np.int64), k=2)
    check_neighbours(neighbours, binary.T @ binary, 2, exclude_self=True)
