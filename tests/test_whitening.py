"""Whitening: streaming statistics against numpy, transforms against scipy, files, two-pass extraction.

References are independent of the code under test: numpy's two-pass float64 mean / ``np.cov``,
``scipy.linalg.fractional_matrix_power`` for ZCA, SAELens's ``ActivationScaler``, a reload from
disk, and TransformerLens's ``run_with_cache`` for the stored whitened chunks.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from safetensors.torch import save_file

from sae_core.whitening import (
    WHITENED_RUN,
    ActivationExtractor,
    ExtractionConfig,
    IncrementalWhitener,
    Whitener,
    statistics_from_run,
)


def correlated(n: int, d: int, seed: int, offset: float = 50.0, dtype=torch.float64) -> torch.Tensor:
    """Gaussian rows with a random covariance, spread-out scales and a large mean (cancellation-prone)."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=gen, dtype=torch.float64) * torch.logspace(-1, 1, d, dtype=torch.float64)
    mean = offset * torch.randn(d, generator=gen, dtype=torch.float64)
    return (torch.randn(n, d, generator=gen, dtype=torch.float64) @ mix + mean).to(dtype)


def rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def random_splits(n: int, seed: int) -> list[int]:
    """Batch sizes summing to n, including 1-row and empty batches."""
    rng = np.random.default_rng(seed)
    sizes, left = [0, 1], n - 1
    while left > 0:
        size = int(min(left, rng.choice([0, 1, 2, rng.integers(1, 60)])))
        sizes.append(size)
        left -= size
    return sizes


# --- statistics ----------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(6))
def test_moments_match_numpy_whatever_the_batch_split(seed):
    x = correlated(400, 9, seed)
    rng = np.random.default_rng(100 + seed)
    keep = torch.from_numpy(rng.random(400) < 0.8)
    keep[50:80] = False  # a run of masked rows: some batches are entirely masked
    stats, start = IncrementalWhitener(9), 0
    for size in random_splits(400, seed):
        stats.update(x[start:start + size], keep[start:start + size])
        start += size
    kept = x.numpy()[keep.numpy()]
    assert stats.n == len(kept)
    assert rel(stats.mean, kept.mean(axis=0)) < 1e-10
    assert rel(stats.covariance(), np.cov(kept, rowvar=False)) < 1e-10


def test_update_takes_any_leading_shape_and_mask():
    x = correlated(6 * 7, 5, 1).reshape(6, 7, 5)  # (batch, pos, d)
    mask = torch.rand(6, 7, generator=torch.Generator().manual_seed(0)) < 0.7
    stats = IncrementalWhitener(5)
    assert stats.update(x, mask) == int(mask.sum())
    kept = x.numpy()[mask.numpy()]
    assert rel(stats.covariance(), np.cov(kept, rowvar=False)) < 1e-10
    with pytest.raises(ValueError, match="mask shape"):
        stats.update(x, mask[:, :3])
    with pytest.raises(ValueError, match="d=5"):
        stats.update(torch.zeros(3, 4))


def test_float32_input_is_accumulated_in_float64():
    x = correlated(300, 6, 2, dtype=torch.float32)
    stats = IncrementalWhitener(6)
    for part in x.split(7):
        stats.update(part)
    ref = x.numpy().astype(np.float64)
    assert rel(stats.mean, ref.mean(axis=0)) < 1e-10
    assert rel(stats.covariance(), np.cov(ref, rowvar=False)) < 1e-10


def test_merge_of_shards_equals_the_whole():
    x = correlated(500, 8, 3)
    shards = [IncrementalWhitener(8) for _ in range(4)]
    for i, part in enumerate(torch.tensor_split(x, [10, 11, 300])):  # sizes 10, 1, 289, 200
        shards[i].update(part)
    empty = IncrementalWhitener(8)
    merged = IncrementalWhitener(8).merge(shards[0]).merge(empty).merge(shards[1]).merge(shards[2]).merge(shards[3])
    assert merged.n == 500
    assert rel(merged.mean, x.numpy().mean(axis=0)) < 1e-10
    assert rel(merged.covariance(), np.cov(x.numpy(), rowvar=False)) < 1e-10
    with pytest.raises(ValueError, match="width"):
        merged.merge(IncrementalWhitener(7))


def test_statistics_save_load_then_resume_equals_the_whole(tmp_path):
    x = correlated(300, 6, 4)
    first = IncrementalWhitener(6)
    first.update(x[:120])
    first.save(tmp_path, batches_done=3)
    resumed = IncrementalWhitener.load(tmp_path, expected_d=6)
    assert resumed.n == 120 and torch.equal(resumed.m2, first.m2)
    resumed.update(x[120:])
    assert rel(resumed.covariance(), np.cov(x.numpy(), rowvar=False)) < 1e-10
    with pytest.raises(ValueError, match="d=6"):
        IncrementalWhitener.load(tmp_path, expected_d=7)


# --- transforms ----------------------------------------------------------------------------------

def test_zca_equals_inverse_square_root_of_the_covariance():
    x = correlated(2000, 7, 5)
    stats = IncrementalWhitener(7)
    stats.update(x)
    w = stats.to_whitener("zca", eps=0.0)
    reference = np.real(scipy.linalg.fractional_matrix_power(np.cov(x.numpy(), rowvar=False), -0.5))
    assert rel(w.transform, reference) < 1e-8
    assert rel(w.reverse_transform, np.linalg.inv(reference)) < 1e-8
    assert np.allclose(w.eigenvalues, np.linalg.eigvalsh(np.cov(x.numpy(), rowvar=False))[::-1], rtol=1e-10)


@pytest.mark.parametrize("method", ["zca", "pca"])
def test_whitened_covariance_is_identity(method):
    d = 8
    data = correlated(800_000, d, 6)
    train, held_out = data[:400_000], data[400_000:]
    stats = IncrementalWhitener(d)
    for part in train.split(65536):
        stats.update(part)
    w = stats.to_whitener(method, eps=0.0)
    z_train = w.forward(train).numpy()
    assert np.abs(z_train.mean(axis=0)).max() < 1e-6
    assert np.abs(np.cov(z_train, rowvar=False) - np.eye(d)).max() < 1e-6
    # held-out: entries of the sample covariance have std ~ sqrt(2 / 400k) ~ 2e-3 per side
    assert np.abs(np.cov(w.forward(held_out).numpy(), rowvar=False) - np.eye(d)).max() < 1e-2
    if method == "pca":  # columns by decreasing variance: transform^T transform = diag(1 / lambda), increasing
        gram = (w.transform.T @ w.transform).numpy()
        assert np.allclose(gram, np.diag(np.diag(gram)), atol=1e-10)
        assert np.all(np.diff(np.diag(gram)) > 0)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_reverse_undoes_forward_on_any_leading_shape(dtype, tol):
    x = correlated(3000, 12, 7, offset=3.0)
    stats = IncrementalWhitener(12)
    stats.update(x)
    w = stats.to_whitener("zca", eps=1e-4)
    batch = correlated(2 * 3 * 5, 12, 8, offset=3.0, dtype=dtype).reshape(2, 3, 5, 12)
    z = w.forward(batch)
    assert z.dtype == dtype and z.shape == batch.shape
    back = w.reverse(z)
    assert back.dtype == dtype
    # relative error per row (the covariance has condition number ~4e5, so elementwise float32
    # errors scale with the largest entries of the row)
    assert ((back - batch).norm(dim=-1) / batch.norm(dim=-1)).max() < tol
    flat = ((batch.double().reshape(-1, 12) - w.mean) @ w.transform).reshape(batch.shape)
    assert ((z.double() - flat).norm(dim=-1) / flat.norm(dim=-1)).max() < tol
    assert w.forward(batch.bfloat16()).dtype == torch.bfloat16


def test_shrinkage_mixes_toward_scaled_identity():
    x = correlated(500, 6, 9)
    stats = IncrementalWhitener(6)
    stats.update(x)
    a = 0.3
    cov = np.cov(x.numpy(), rowvar=False)
    shrunk = (1 - a) * cov + a * np.trace(cov) / 6 * np.eye(6)
    w = stats.to_whitener("zca", eps=0.0, shrinkage=a)
    assert np.allclose(w.eigenvalues, np.linalg.eigvalsh(shrunk)[::-1], rtol=1e-10)
    assert rel(w.transform, np.real(scipy.linalg.fractional_matrix_power(shrunk, -0.5))) < 1e-8


@pytest.mark.parametrize("case", ["more_dims_than_rows", "dead_channel"])
def test_singular_covariance_is_finite_with_eps_and_raises_without(case):
    if case == "more_dims_than_rows":
        x = correlated(5, 10, 10)
    else:
        x = correlated(200, 10, 10)
        x[:, 3] = 2.5  # a constant (dead) channel
    stats = IncrementalWhitener(10)
    stats.update(x)
    w = stats.to_whitener("zca", eps=1e-3)
    z = w.forward(x)
    assert torch.isfinite(z).all() and torch.isfinite(w.reverse(z)).all()
    assert torch.isfinite(stats.to_whitener("pca", eps=1e-3).forward(x)).all()
    with pytest.raises(ValueError, match="singular"):
        stats.to_whitener("zca", eps=0.0)


def test_sae_lens_activation_scaler_applies_the_same_transform():
    from sae_lens.training.activation_scaler import ActivationScaler

    x = correlated(1000, 6, 11, offset=2.0, dtype=torch.float32)
    stats = IncrementalWhitener(6)
    stats.update(x)
    w = stats.to_whitener("pca", eps=1e-4)
    scaler = ActivationScaler(whitening=w.to_sae_lens())
    assert torch.allclose(scaler.scale(x), w.forward(x), atol=1e-5)
    assert torch.allclose(scaler.unscale(w.forward(x)), x, atol=1e-4)


# --- files ---------------------------------------------------------------------------------------

@pytest.fixture()
def whitener() -> Whitener:
    stats = IncrementalWhitener(5)
    stats.update(correlated(200, 5, 12))
    return stats.to_whitener("pca", eps=1e-3, shrinkage=0.1, hook="blocks.0.hook_resid_post")


@pytest.mark.parametrize("form", ["folder", "safetensors", "torch"])
def test_save_load_round_trip(tmp_path, whitener, form):
    if form == "torch":
        path = whitener.save_torch(tmp_path / "w.pt")
    else:
        whitener.save(tmp_path)
        path = tmp_path if form == "folder" else tmp_path / "whitening.safetensors"
    loaded = Whitener.load(path, expected_d=5)
    for name in ("mean", "transform", "reverse_transform", "eigenvalues"):
        assert torch.equal(getattr(loaded, name), getattr(whitener, name)), name
    assert (loaded.method, loaded.eps, loaded.shrinkage, loaded.n_samples, loaded.hook) == \
        ("pca", 1e-3, 0.1, 200, "blocks.0.hook_resid_post")
    x = correlated(4, 5, 13, dtype=torch.float32)
    assert torch.equal(loaded.forward(x), whitener.forward(x))


def test_load_rejects_wrong_width_and_missing_keys(tmp_path, whitener):
    whitener.save(tmp_path / "ok")
    with pytest.raises(ValueError, match="d=5 activations but d=6 was expected"):
        Whitener.load(tmp_path / "ok", expected_d=6)
    bad = tmp_path / "bad.safetensors"
    save_file({"mean": whitener.mean, "reverse_transform": whitener.reverse_transform,
               "n_samples": torch.tensor(3)}, str(bad), metadata={"method": "zca", "eps": "0.1"})
    with pytest.raises(KeyError, match="transform"):
        Whitener.load(bad)
    record = {"mean": whitener.mean, "transform": whitener.transform,
              "reverse_transform": whitener.reverse_transform, "n_samples": 3, "method": "zca"}
    torch.save(record, tmp_path / "bad.pt")
    with pytest.raises(KeyError, match="eps"):
        Whitener.load(tmp_path / "bad.pt")
    with pytest.raises(FileNotFoundError, match="Whitener.save"):
        Whitener.load(tmp_path / "empty_folder")


def test_eigenvalues_are_recovered_from_a_file_without_them(tmp_path, whitener):
    record = {"mean": whitener.mean, "transform": whitener.transform,
              "reverse_transform": whitener.reverse_transform, "n_samples": 200, "method": "pca", "eps": 1e-3}
    torch.save(record, tmp_path / "old.pt")
    assert torch.allclose(Whitener.load(tmp_path / "old.pt").eigenvalues, whitener.eigenvalues, atol=1e-10)


# --- configuration -------------------------------------------------------------------------------

def test_extraction_config_rejects_bad_values(tmp_path):
    with pytest.raises(ValueError, match="unknown exclude_tokens"):
        ExtractionConfig.document("tiny_random", tmp_path, exclude_tokens=("bos", "pad", "cls"))
    with pytest.raises(ValueError, match="keep 'pad'"):
        ExtractionConfig.document("tiny_random", tmp_path, exclude_tokens=("bos",))
    with pytest.raises(ValueError, match="zca"):
        ExtractionConfig.document("tiny_random", tmp_path, method="cholesky")
    policy = ExtractionConfig.document("tiny_random", tmp_path, exclude_tokens=("bos", "pad", 42)).windows.policy
    assert (policy.exclude_bos, policy.exclude_eos, policy.exclude_special, policy.exclude_token_ids) == \
        (True, False, False, (42,))


def test_config_from_constants_reads_the_whitening_section(tmp_path):
    from sae_core.models import load_run_config

    run = load_run_config("tiny_random")
    cfg = ExtractionConfig.from_constants("tiny_random", tmp_path, chunk_size=3)
    assert cfg.whitening == run.whitening and cfg.windows == run.windows and cfg.forward == run.forward
    assert (cfg.hook_point, cfg.chunk_size, cfg.device) == (run.hook_points[0], 3, run.device)
    assert not cfg.loader.pack_windows  # pass two stores one window per row
    document = ExtractionConfig.document("tiny_random", tmp_path, batch_size=3, max_length=16, num_samples=5,
                                         dtype="bfloat16", eps=1e-3)
    assert (document.loader.batch_size, document.windows.max_text_length, document.sample_limit,
            document.forward.dtype, document.whitening.eps) == (3, 16, 5, "bfloat16", 1e-3)


# --- two-pass extraction on the tiny model ---------------------------------------------------------

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def texts(corpus_texts):
    return corpus_texts[:32]


def tiny_config(tiny_model, out, **overrides) -> ExtractionConfig:
    fields = dict(hook_point=HOOK, batch_size=4, max_length=16, chunk_size=100, eps=1e-4, checkpoint_batches=2)
    return ExtractionConfig.document(tiny_model, out, **{**fields, **overrides})


@pytest.fixture(scope="module")
def reference_run(tiny_model, texts, tmp_path_factory):
    """Both passes, uninterrupted, in one folder shared by the tests below (read-only)."""
    out = tmp_path_factory.mktemp("reference")
    extractor = ActivationExtractor(tiny_config(tiny_model, out), texts)
    extractor.compute_whitening_statistics()
    return out, extractor.process_and_store_whitened()


def load_chunks(run_dir) -> dict[str, np.ndarray]:
    files = sorted(run_dir.glob("shard-*.npz"))
    assert len(files) > 1, "the test should exercise several chunks"
    parts = [dict(np.load(f)) for f in files]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def test_pass_two_without_statistics_raises(tiny_model, texts, tmp_path):
    with pytest.raises(FileNotFoundError, match="compute_whitening_statistics"):
        ActivationExtractor(tiny_config(tiny_model, tmp_path), texts).process_and_store_whitened()


def test_two_pass_chunks_equal_forward_of_run_with_cache(tiny_model, texts, reference_run):
    out, result = reference_run
    chunks = load_chunks(out / WHITENED_RUN)
    tokenizer = tiny_model.tokenizer
    tokens = torch.from_numpy(chunks["token_ids"])
    keep = torch.from_numpy(chunks["attention_mask"]).bool()
    # kept rows: real tokens (texts hold no PAD = EOS id) that are not the prepended BOS
    assert torch.equal(keep, (tokens != tokenizer.pad_token_id) & (tokens != tokenizer.bos_token_id))
    assert result.n_rows == int(keep.sum()) and result.n_windows == len(texts) == len(tokens)

    with torch.no_grad():
        _, cache = tiny_model.run_with_cache(tokens, names_filter=HOOK)
    acts = cache[HOOK][keep].double()  # (rows, d)
    stats = IncrementalWhitener.load(out)
    assert stats.n == int(keep.sum())
    assert rel(stats.mean, acts.mean(dim=0)) < 1e-5
    assert rel(stats.covariance(), np.cov(acts.numpy(), rowvar=False)) < 1e-5

    whitener = Whitener.load(out, expected_d=tiny_model.cfg.d_model)
    stored = torch.from_numpy(chunks["activations"])
    assert torch.allclose(stored[keep].double(), whitener.forward(acts), atol=2e-4, rtol=1e-4)
    assert torch.count_nonzero(stored[~keep]) == 0
    # every kept row maps back to its document's token
    for window in range(0, len(tokens), 7):
        ids = tokenizer(texts[int(chunks["doc_index"][window])], add_special_tokens=False)["input_ids"]
        cells = keep[window].nonzero().flatten().tolist()
        assert [ids[int(chunks["position"][window, c])] for c in cells] == tokens[window, cells].tolist()


class Interrupted(Exception):
    pass


class InterruptingExtractor(ActivationExtractor):
    """Raises after ``limit`` batches, as a killed process would stop."""

    limit = 5

    def _batches(self, start_batch):
        for number, batch in enumerate(super()._batches(start_batch)):
            if number == self.limit:
                raise Interrupted
            yield batch


def test_resume_after_interruption_gives_identical_chunks_and_statistics(tiny_model, texts, reference_run, tmp_path):
    reference, _ = reference_run
    config = tiny_config(tiny_model, tmp_path)
    with pytest.raises(Interrupted):
        InterruptingExtractor(config, texts).compute_whitening_statistics()
    first = ActivationExtractor(config, texts).compute_whitening_statistics()
    assert first.resumed
    assert torch.equal(first.statistics.m2, IncrementalWhitener.load(reference).m2)
    with pytest.raises(Interrupted):
        InterruptingExtractor(config, texts).process_and_store_whitened()
    assert len(list((tmp_path / WHITENED_RUN).glob("shard-*.npz"))) >= 1
    ActivationExtractor(config, texts).process_and_store_whitened()

    ref_files = sorted((reference / WHITENED_RUN).glob("shard-*.npz"))
    cut_files = sorted((tmp_path / WHITENED_RUN).glob("shard-*.npz"))
    assert [f.name for f in ref_files] == [f.name for f in cut_files]
    for a, b in zip(ref_files, cut_files, strict=True):
        with np.load(a) as x, np.load(b) as y:
            assert sorted(x.files) == sorted(y.files)
            for key in x.files:
                assert np.array_equal(x[key], y[key]), (a.name, key)
    with pytest.raises(ValueError, match="other settings"):
        ActivationExtractor(tiny_config(tiny_model, tmp_path, seed=1), texts).compute_whitening_statistics()


def test_statistics_from_an_existing_run(reference_run, tmp_path):
    from sae_core.store import ActivationRun, ShardWriter

    rows = correlated(90, 4, 14, dtype=torch.float32)
    writer = ShardWriter(tmp_path / "rows", {"test": 1}, header={"hooks": [HOOK], "tensor_keys": {HOOK: HOOK}})
    for part in rows.split(40):
        ids = {k: torch.zeros(len(part), dtype=torch.long) for k in ("token_ids", "doc_index", "position")}
        writer.write({HOOK: part, **ids}, batches_end=1)
    with pytest.raises(ValueError, match="allow_incomplete=True"):  # an interrupted run: refused unless asked
        statistics_from_run(tmp_path / "rows", HOOK)
    partial = statistics_from_run(tmp_path / "rows", HOOK, allow_incomplete=True)
    writer.finish()
    stats = statistics_from_run(tmp_path / "rows", HOOK)
    assert partial.n == stats.n == 90
    assert rel(stats.covariance(), np.cov(rows.double().numpy(), rowvar=False)) < 1e-10

    run = reference_run[0] / WHITENED_RUN
    chunks = load_chunks(run)
    kept = chunks["activations"][chunks["attention_mask"].astype(bool)].astype(np.float64)
    assert np.array_equal(ActivationRun(run).activations(HOOK)[:].numpy(), kept)
    stats = statistics_from_run(run)
    assert rel(stats.covariance(), np.cov(kept, rowvar=False)) < 1e-10


# --- distributed ---------------------------------------------------------------------------------

def _dist_worker(rank: int, world: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    x = correlated(300, 5, 15)
    stats = IncrementalWhitener(5)
    stats.update(x[:100] if rank == 0 else x[100:])
    stats.all_reduce()
    torch.save({"n": stats.n, "mean": stats.mean, "m2": stats.m2}, f"{out}.{rank}")
    dist.destroy_process_group()


@pytest.mark.dist
@pytest.mark.slow  # two spawned processes
def test_all_reduce_across_two_processes(tmp_path):
    import torch.multiprocessing as mp

    out = str(tmp_path / "stats")
    mp.spawn(_dist_worker, args=(2, str(tmp_path / "init"), out), nprocs=2, join=True)
    x = correlated(300, 5, 15).numpy()
    results = [torch.load(f"{out}.{r}", weights_only=True) for r in range(2)]
    assert torch.equal(results[0]["m2"], results[1]["m2"])
    assert results[0]["n"] == 300
    assert rel(results[0]["m2"] / 299, np.cov(x, rowvar=False)) < 1e-10


# --- the default model ---------------------------------------------------------------------------

@pytest.mark.slow
def test_statistics_of_two_halves_agree_within_sampling_error(smollm2):
    """20k real tokens of blocks.10.hook_resid_post, split by document into two halves.

    Tolerance: tokens of one document are correlated, so the sampling error is estimated by
    document clusters: for an estimate C_A from the documents of half A (n_A rows),
    E||C_A - C||_F^2 ~= sum_docs ||sum_t (x_t x_t^T - C)||_F^2 / n_A^2 (centred x), and likewise for
    the mean. Two independent halves differ by sqrt(V_A + V_B) in expectation; a sum of ~330k
    squared entries concentrates, so the ratio observed / expected should be near 1: we require
    it below 3 (non-stationarity across documents or a wrong accumulator would exceed it) and above
    1/3 (identical or over-smoothed halves would fall below).
    """
    from sae_core.activations import iter_activation_batches
    from sae_core.config import LoaderConfig, TokenPolicy
    from sae_core.corpora import fortunes_corpus
    from sae_core.data import WindowedTextDataset
    from sae_core.loader import make_dataloader

    hook = "blocks.10.hook_resid_post"
    dataset = WindowedTextDataset(fortunes_corpus()[:1000], smollm2.tokenizer, 128, seed=0, prepend_bos=True)
    loader = make_dataloader(dataset, LoaderConfig(batch_size=32, group_by_length=False))
    rows, docs = [], []
    for batch in iter_activation_batches(smollm2, loader, [hook], TokenPolicy(), "auto"):
        rows.append(batch.acts[hook])
        docs.append(batch.doc_index)
        if sum(len(r) for r in rows) >= 20_000:
            break
    acts, doc_index = torch.cat(rows), torch.cat(docs)  # (rows, 576), (rows,)
    split = int(doc_index.median())
    halves = [IncrementalWhitener(576), IncrementalWhitener(576)]
    for part, part_doc in zip(acts.split(4096), doc_index.split(4096), strict=True):
        halves[0].update(part, part_doc < split)
        halves[1].update(part, part_doc >= split)
    x, doc = acts.double().numpy(), doc_index.numpy()
    assert x.shape[0] >= 20_000 and min(h.n for h in halves) > 5_000
    centred = x - x.mean(axis=0)
    cov = np.cov(x, rowvar=False)
    var_cov, var_mean = [0.0, 0.0], [0.0, 0.0]
    for d in np.unique(doc):
        xc = centred[doc == d]
        g = xc.T @ xc - len(xc) * cov
        side = int(d >= split)
        var_cov[side] += float((g ** 2).sum()) / halves[side].n ** 2
        var_mean[side] += float((xc.sum(axis=0) ** 2).sum()) / halves[side].n ** 2
    cov_ratio = np.linalg.norm(halves[0].covariance().numpy() - halves[1].covariance().numpy()) / np.sqrt(sum(var_cov))
    mean_ratio = np.linalg.norm(halves[0].mean.numpy() - halves[1].mean.numpy()) / np.sqrt(sum(var_mean))
    assert 1 / 3 < cov_ratio < 3, cov_ratio
    assert 1 / 3 < mean_ratio < 3, mean_ratio
    # the pooled statistics equal the two halves merged
    merged = IncrementalWhitener(576).merge(halves[0]).merge(halves[1])
    assert rel(merged.covariance(), cov) < 1e-10
    assert torch.isfinite(merged.to_whitener("zca", eps=1e-4).transform).all()
