"""The CSR latent store against the dense latents it came from, and its statistics against numpy."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from sae_core.latents import (
    CSRBuilder,
    LatentCSR,
    encode_to_csr,
    from_activation_rows,
    latent_density,
    mean_activation_when_active,
    top_activating_examples,
)


def random_latents(rng: np.random.Generator, n: int, d_sae: int, density: float = 0.15) -> np.ndarray:
    values = rng.random((n, d_sae)).astype(np.float32) + 0.01
    return np.where(rng.random((n, d_sae)) < density, values, 0).astype(np.float32)


def documents(rng: np.random.Generator, lengths: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(token_ids, doc_index, position) of documents laid out row after row in token order."""
    doc = np.concatenate([np.full(n, d) for d, n in enumerate(lengths)])
    position = np.concatenate([np.arange(n) for n in lengths])
    return rng.integers(0, 1000, doc.size), doc, position


def build(folder, dense: np.ndarray, meta, batch_sizes, kind: str = "numpy") -> LatentCSR:
    token_ids, doc, position = meta
    with CSRBuilder(workdir=folder.parent) as builder:
        start = 0
        for size in batch_sizes:
            rows = slice(start, start + size)
            batch = dense[rows]
            if kind == "torch_dense":
                batch = torch.from_numpy(batch)
            elif kind == "torch_sparse":
                batch = torch.from_numpy(batch).to_sparse()
            elif kind == "scipy":
                batch = sp.csr_matrix(batch)
            builder.add(batch, torch.from_numpy(token_ids[rows]), doc[rows], position[rows])
            start += size
        return builder.finish(folder)


@pytest.fixture()
def stored(tmp_path):
    rng = np.random.default_rng(0)
    meta = documents(rng, [7, 1, 12, 9, 5])
    dense = random_latents(rng, meta[0].size, 24)
    dense[:, [3, 11]] = 0  # latents that never fire
    dense[5] = 0  # a row where nothing fires
    return build(tmp_path / "store", dense, meta, [10, 0, 13, 11]), dense, meta


@pytest.mark.parametrize("kind", ["numpy", "torch_dense", "torch_sparse", "scipy"])
def test_csr_equals_dense_latents(tmp_path, kind):
    rng = np.random.default_rng(1)
    meta = documents(rng, [20, 17])
    dense = random_latents(rng, 37, 40)
    csr = build(tmp_path / "store", dense, meta, [16, 5, 16], kind)
    assert (csr.n_rows, csr.n_features, csr.nnz) == (37, 40, np.count_nonzero(dense))
    np.testing.assert_array_equal(csr.to_scipy().toarray(), dense)
    for stored_array, expected in zip((csr.token_ids, csr.doc_index, csr.position), meta, strict=True):
        np.testing.assert_array_equal(stored_array, expected)


def test_reload_memmaps_and_no_copy(stored):
    csr, dense, _ = stored
    reloaded = LatentCSR.load(csr.folder)
    for name in ("indptr", "indices", "data", "token_ids", "doc_index", "position"):
        array = np.load(csr.folder / f"{name}.npy", mmap_mode="r")
        assert isinstance(array, np.memmap)
        np.testing.assert_array_equal(array, getattr(reloaded, name))
    matrix = reloaded.to_scipy()
    np.testing.assert_array_equal(matrix.toarray(), dense)
    for name in ("data", "indices", "indptr"):
        assert np.shares_memory(getattr(matrix, name), getattr(reloaded, name)), name
    assert not list(csr.folder.parent.glob(".*tmp")), "staging folders left behind"


def test_density_and_mean_match_numpy(stored):
    csr, dense, _ = stored
    np.testing.assert_allclose(latent_density(csr), (dense != 0).mean(axis=0), rtol=1e-12)
    with np.errstate(invalid="ignore"):
        expected = dense.sum(axis=0, dtype=np.float64) / (dense != 0).sum(axis=0)
    np.testing.assert_allclose(mean_activation_when_active(csr), np.nan_to_num(expected), rtol=1e-6)


def brute_force_examples(dense, meta, latent, k, window):
    token_ids, doc, position = meta
    rows = np.flatnonzero(dense[:, latent])
    rows = sorted(rows, key=lambda r: (-dense[r, latent], r))[:k]
    result = []
    for r in rows:
        same = (doc == doc[r]) & (np.abs(position - position[r]) <= window)
        context = token_ids[same][np.argsort(position[same])]
        result.append((r, doc[r], position[r], dense[r, latent], context, int(position[r] - position[same].min())))
    return result


@pytest.mark.parametrize("row_block", [4, 1 << 20])
def test_top_examples_equal_brute_force(stored, row_block):
    csr, dense, meta = stored
    latents = [0, 3, 7, 23, 11]
    found = top_activating_examples(csr, latents, k=4, context_window=2, row_block=row_block)
    assert set(found) == set(latents)
    for latent in latents:
        expected = brute_force_examples(dense, meta, latent, 4, 2)
        assert len(found[latent]) == len(expected)
        for example, (row, doc, pos, value, context, focus) in zip(found[latent], expected, strict=True):
            assert (example.latent, example.row, example.doc, example.position) == (latent, row, doc, pos)
            assert example.value == pytest.approx(value)
            np.testing.assert_array_equal(example.context_token_ids, context)
            assert example.focus == focus
    assert found[3] == [] and found[11] == []


def test_top_examples_of_every_latent(stored):
    csr, dense, meta = stored
    found = top_activating_examples(csr, k=3, context_window=1, row_block=9)
    assert sorted(found) == list(range(dense.shape[1]))
    for latent, examples in found.items():
        expected = brute_force_examples(dense, meta, latent, 3, 1)
        assert [(e.row, e.focus) for e in examples] == [(r, f) for r, _, _, _, _, f in expected]
        np.testing.assert_allclose([e.value for e in examples], [v for _, _, _, v, _, _ in expected])


def test_context_stops_at_window_boundaries(tmp_path):
    # Two windows of document 0 back to back: positions restart, so the context must not cross.
    token_ids = np.arange(8)
    doc = np.zeros(8, np.int64)
    position = np.array([0, 1, 2, 3, 0, 1, 2, 3])
    dense = np.zeros((8, 2), np.float32)
    dense[3, 0] = 1.0
    csr = build(tmp_path / "store", dense, (token_ids, doc, position), [8])
    (example,) = top_activating_examples(csr, [0], k=3, context_window=3)[0]
    np.testing.assert_array_equal(example.context_token_ids, [0, 1, 2, 3])
    assert example.focus == 3


def test_context_stops_between_windows_of_one_document_side_by_side(tmp_path):
    """Two windows of document 0 packed next to each other (positions 10-13, then a BOS and 40-43),
    then document 1: each context is one stretch of consecutive tokens, a BOS (position -1) joins the
    window it opens, and the browser's context starts agree with the examples' contexts."""
    from sae_core.browser.data import context_bounds, window_starts

    doc = np.array([0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1])
    position = np.array([10, 11, 12, 13, -1, 40, 41, 42, 43, 44, 45])
    token_ids = np.arange(doc.size) + 100
    dense = np.zeros((doc.size, 3), np.float32)
    dense[3, 0], dense[5, 1], dense[9, 2] = 1.0, 1.0, 1.0
    csr = build(tmp_path / "store", dense, (token_ids, doc, position), [doc.size])
    found = top_activating_examples(csr, [0, 1, 2], k=1, context_window=8)
    np.testing.assert_array_equal(found[0][0].context_token_ids, token_ids[0:4])  # not into the next window
    np.testing.assert_array_equal(found[1][0].context_token_ids, token_ids[4:9])  # the BOS opens its window
    np.testing.assert_array_equal(found[2][0].context_token_ids, token_ids[9:11])  # 44 -> 45 is another document
    starts = window_starts(csr, block=3)  # blocks smaller than the rows: starts found across block edges
    np.testing.assert_array_equal(starts, [0, 4, 9])
    lo, hi = context_bounds(starts, csr.n_rows, np.array([3, 5, 9]), 8)
    assert [(a, b) for a, b in zip(lo.tolist(), hi.tolist(), strict=True)] == [(0, 3), (4, 8), (9, 10)]


def test_bad_input_errors(tmp_path):
    with CSRBuilder(workdir=tmp_path) as builder:
        builder.add(np.ones((2, 4), np.float32), [1, 2], [0, 0], [0, 1])
        with pytest.raises(ValueError, match="columns"):
            builder.add(np.ones((2, 5), np.float32), [1, 2], [0, 0], [0, 1])
        with pytest.raises(ValueError, match="one entry per row"):
            builder.add(np.ones((2, 4), np.float32), [1], [0, 0], [0, 1])
        with pytest.raises(FloatingPointError):
            builder.add(np.full((1, 4), np.nan, np.float32), [1], [0], [0])
        builder.finish(tmp_path / "store")
    with CSRBuilder(workdir=tmp_path) as builder, pytest.raises(FileExistsError, match="overwrite=True"):
        builder.add(np.ones((1, 4), np.float32), [1], [0], [0])
        builder.finish(tmp_path / "store")
    with pytest.raises(ValueError, match="distinct latents"):
        top_activating_examples(LatentCSR.load(tmp_path / "store"), [0, 9])


def test_overwrite_and_interrupted_build(tmp_path):
    folder = tmp_path / "store"
    first = np.eye(3, dtype=np.float32)
    build(folder, first, (np.arange(3), np.zeros(3), np.arange(3)), [3])
    with CSRBuilder(workdir=tmp_path) as builder:
        builder.add(2 * first, np.arange(3), np.zeros(3), np.arange(3))
        builder.finish(folder, overwrite=True)
    np.testing.assert_array_equal(LatentCSR.load(folder).to_scipy().toarray(), 2 * first)
    with pytest.raises(KeyboardInterrupt), CSRBuilder(workdir=tmp_path) as builder:
        builder.add(first, np.arange(3), np.zeros(3), np.arange(3))
        raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"], "an interrupted build left files behind"


def test_from_activation_rows_equals_dense_encode(tmp_path):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(8, 16, generator=generator)
    acts = [torch.randn(n, 8, generator=generator) for n in (5, 9, 3)]

    def encode(x):
        return torch.relu(x @ weight - 0.5)

    rows = [(a, torch.arange(a.shape[0]), torch.full((a.shape[0],), i), torch.arange(a.shape[0]))
            for i, a in enumerate(acts)]
    csr = from_activation_rows(encode, iter(rows), tmp_path / "store", progress=False)
    expected = torch.cat([encode(a) for a in acts]).numpy()  # per batch: BLAS sums depend on the batch size
    np.testing.assert_array_equal(csr.to_scipy().toarray(), expected)
    np.testing.assert_array_equal(csr.doc_index, np.repeat([0, 1, 2], [5, 9, 3]))


def test_encode_to_csr_with_saelens_topk_sae(tmp_path, tiny_model):
    from sae_lens import TopKSAE, TopKSAEConfig

    from sae_core.activations import iter_activation_batches
    from sae_core.config import LoaderConfig
    from sae_core.data import WindowedTextDataset
    from sae_core.loader import make_dataloader

    torch.manual_seed(0)
    sae = TopKSAE(TopKSAEConfig(d_in=32, d_sae=64, k=4))
    hook = "blocks.1.hook_resid_post"
    texts = ["The cat sat on the mat.", "Sparse autoencoders find features.", "Hello world, again and again.",
             "A fourth document with a few more tokens in it than the others."]
    loader = make_dataloader(WindowedTextDataset(texts, tiny_model.tokenizer, max_text_length=16),
                             LoaderConfig(batch_size=3))
    batches = list(iter_activation_batches(tiny_model, loader, [hook]))
    csr = encode_to_csr(tiny_model, sae.encode, batches, hook, tmp_path / "store", progress=False)
    with torch.no_grad():
        expected = torch.cat([sae.encode(b.acts[hook]) for b in batches]).numpy()
    np.testing.assert_allclose(csr.to_scipy().toarray(), expected, rtol=0, atol=0)
    assert csr.n_rows > 10 and csr.nnz > 0 and (np.diff(csr.indptr) <= 4).all()
    np.testing.assert_array_equal(csr.token_ids, torch.cat([b.token_ids for b in batches]).numpy())
    assert csr.meta["hook"] == hook and csr.n_features == 64
    with pytest.raises(KeyError, match="closest valid names"):
        encode_to_csr(tiny_model, sae.encode, batches, "blocks.1.hook_resid_pots", tmp_path / "x")
