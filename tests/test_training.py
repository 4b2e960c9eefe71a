"""SAE training: the sparse TopK step against SAELens, the data path, resume, outputs, quality.

Unit tests use the tiny random model or synthetic sparse data (seconds); the integration test
trains on SmolLM2 with a small budget and compares against baselines computed in the same test.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from sae_lens import SAE
from sae_lens.saes.sae import TrainStepInput
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

from sae_core.config import TrainingConfig, build_flat
from sae_core.data import WindowedTextDataset
from sae_core.evaluation import evaluate_sae
from sae_core.loader import make_dataloader
from sae_core.sae_folders import write_sae_folder
from sae_core.training import (
    build_training_sae,
    hook_widths,
    model_source,
    sparse_topk,
    split_documents,
    to_inference_sae,
    train_from_activations,
    train_saes,
)
from sae_core.training import state as training_state
from sae_core.training.sources import BlockShuffler, TensorChunkSource
from sae_core.training.sparse_topk import topk_training_step

HOOK = "blocks.1.hook_resid_post"
GOLDEN = Path(__file__).parent / "golden" / "smollm2_training.json"


# --- the sparse TopK step --------------------------------------------------------------------------

def _saelens_topk(d_in: int, d_sae: int, k: int, rescale: bool, b_dec_in: bool, dtype: str) -> TopKTrainingSAE:
    torch.manual_seed(0)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k, dtype=dtype,
                                                rescale_acts_by_decoder_norm=rescale, apply_b_dec_to_input=b_dec_in))
    with torch.no_grad():  # move away from the symmetric init: uneven decoder norms, non-zero biases
        sae.W_dec.mul_(torch.rand(d_sae, 1, dtype=sae.W_dec.dtype) + 0.5)
        sae.b_enc.normal_(0, 0.05)
        sae.b_dec.normal_(0, 0.1)
    return sae


def _grads(sae: TopKTrainingSAE, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    sae.zero_grad()
    loss.backward()
    return {name: p.grad.clone() for name, p in sae.named_parameters()}


@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("b_dec_in", [True, False])
@pytest.mark.parametrize("dead_every,dense_ratio", [(None, 8), (3, 8), (5, 8), (20, 8), (3, 1), (20, 0)])
def test_sparse_step_equals_saelens_dense_step(rescale, b_dec_in, dead_every, dense_ratio, monkeypatch):
    """Loss and every gradient equal SAELens's dense ``training_forward_pass`` (MSE + AuxK).

    In float64 both compute the same sums in different orders, so they agree to ~1e-15 relative;
    1e-10 leaves room for the rescale identity relu(h n)/n = relu(h) (SAELens differentiates
    both sides, we use the identity), which is exact in real arithmetic.
    """
    # dead_every: no AuxK; 32 dead > 2 k_aux = 24; 20 dead between k_aux = 12 and 2 k_aux (the dropped ones
    # are the selection); 5 dead < k_aux. dense_ratio: the AuxK path (dense over the
    # dead columns while n_dead <= ratio * k_aux: 8 takes it in both cases, 1 and 0 take the sparse one)
    monkeypatch.setattr(sparse_topk, "DENSE_AUX_RATIO", dense_ratio)
    sae = _saelens_topk(24, 96, 6, rescale, b_dec_in, "float64")
    x = torch.randn(64, 24, dtype=torch.float64) * 2
    dead = (torch.arange(96) % dead_every == 0) if dead_every else None
    ref = sae.training_forward_pass(TrainStepInput(x, {}, dead, 0, False))
    ref_grads = _grads(sae, ref.loss)
    out = topk_training_step(sae, x, dead, torch.float64)
    grads = _grads(sae, out.loss)
    assert out.loss.item() == pytest.approx(ref.loss.item(), rel=1e-12)
    if dead_every:
        assert out.aux_loss.item() == pytest.approx(ref.losses["auxiliary_reconstruction_loss"].item(), rel=1e-12)
        assert out.aux_loss.item() > 0
    torch.testing.assert_close(out.sae_out, ref.sae_out.detach(), rtol=1e-12, atol=1e-12)
    for name, grad in ref_grads.items():
        scale = grad.abs().max().item()
        assert (grads[name] - grad).abs().max().item() <= 1e-10 * scale, name


def test_dense_aux_decode_in_bfloat16_matches_float64_autograd():
    """The dense AuxK path with its matmuls in bfloat16 (the compute dtype) returns the output and
    every gradient in the parameters' float32, equal to plain float64 autograd to bfloat16 rounding."""
    gen = torch.Generator().manual_seed(0)
    rows, d_in, d_sae = 256, 32, 128
    dead = torch.arange(0, d_sae, 3)
    keep = torch.rand(rows, len(dead), generator=gen) < 0.6
    x = torch.randn(rows, d_in, generator=gen, dtype=torch.float64) * 2
    start = [torch.randn(d_in, d_sae, generator=gen, dtype=torch.float64) / 6, torch.randn(d_sae, generator=gen, dtype=torch.float64) / 10,
             torch.randn(d_in, generator=gen, dtype=torch.float64) / 10, torch.randn(d_sae, d_in, generator=gen, dtype=torch.float64) / 6]
    grad_out = torch.randn(rows, d_in, generator=gen, dtype=torch.float64)

    ref = [t.clone().requires_grad_(True) for t in start]  # W_enc, b_enc, b_dec, W_dec
    h = (x - ref[2]) @ ref[0] + ref[1]
    ref_out = (h[:, dead] * keep) @ ref[3][dead]
    ref_out.backward(grad_out)

    params = [t.float().requires_grad_(True) for t in start]
    centered = (x.float() - params[2].detach()).bfloat16()
    values = ((x.float() - params[2].detach()) @ params[0].detach() + params[1].detach())[:, dead].masked_fill(~keep, 0)
    out = sparse_topk._DenseDeadDecode.apply(values.bfloat16(), keep, centered, *params, dead)
    out.backward(grad_out.float())

    assert out.dtype == torch.float32 and all(p.grad.dtype == torch.float32 for p in params)
    torch.testing.assert_close(out.double(), ref_out.detach(), rtol=0, atol=2e-2 * ref_out.abs().max().item())
    for name, p, r in zip(("W_enc", "b_enc", "b_dec", "W_dec"), params, ref, strict=True):
        scale = r.grad.abs().max().item()
        assert scale > 0 and (p.grad.double() - r.grad).abs().max().item() <= 2e-2 * scale, name


def test_sparse_step_selects_exactly_k_distinct_latents():
    sae = _saelens_topk(16, 64, 5, True, True, "float32")
    out = topk_training_step(sae, torch.randn(40, 16), None, torch.bfloat16)
    assert out.indices.shape == (40, 5)
    assert all(len(set(row)) == 5 for row in out.indices.tolist())
    assert (out.acts >= 0).all()


# --- synthetic data --------------------------------------------------------------------------------

def _sparse_chunks(n_chunks: int = 12, rows: int = 256, d: int = 16, n_features: int = 48, active: int = 3,
                   seed: int = 0) -> list[torch.Tensor]:
    """Rows that are sums of ``active`` random unit features with positive magnitudes."""
    gen = torch.Generator().manual_seed(seed)
    features = torch.nn.functional.normalize(torch.randn(n_features, d, generator=gen), dim=-1)
    chunks = []
    for _ in range(n_chunks):
        which = torch.rand(rows, n_features, generator=gen).argsort(dim=-1)[:, :active]
        magnitude = torch.rand(rows, active, generator=gen) + 0.5
        chunks.append(torch.einsum("ra,rad->rd", magnitude, features[which]) + 1.0)
    return chunks


def _small_cfg(**overrides) -> TrainingConfig:
    base = dict(hook_points=(HOOK,), d_sae=64, k=4, lr=1e-2, total_training_tokens=256 * 40,
                train_batch_size_tokens=256, shuffle_buffer_tokens=1024, checkpoint_every_tokens=None,
                log_every_steps=1, lr_decay_fraction=0.0, dead_window_tokens=2048)
    return build_flat(TrainingConfig, "training", **{**base, **overrides})


ARCHITECTURES = [("topk", {}), ("topk", {"fast_topk": False}), ("batchtopk", {}),
                 ("jumprelu", {"l0_coefficient": 0.01}), ("standard", {"l1_coefficient": 0.05}),
                 ("matryoshka_batchtopk", {"matryoshka_widths": (16, 32)})]
INFERENCE_CLASS = {"topk": "topk", "batchtopk": "jumprelu", "jumprelu": "jumprelu", "standard": "standard",
                   "matryoshka_batchtopk": "jumprelu"}


@pytest.mark.parametrize(("architecture", "extra"), ARCHITECTURES)
def test_each_architecture_trains_and_reloads(tmp_path, architecture, extra):
    chunks = _sparse_chunks()
    cfg = _small_cfg(architecture=architecture, **extra)
    run = train_saes(cfg, TensorChunkSource(lambda: chunks, [HOOK]), {HOOK: 16}, tmp_path)
    curve = run.saes[HOOK].curve
    first, last = curve[0]["loss"], np.mean([p["loss"] for p in curve[-4:]])
    assert last < 0.5 * first, (first, last)
    assert curve[-1]["explained_variance"] > curve[0]["explained_variance"]
    folder = tmp_path / HOOK
    loaded = SAE.load_from_disk(str(folder))
    assert loaded.cfg.architecture() == INFERENCE_CLASS[architecture]
    assert {"cfg.json", "sae_weights.safetensors", "training_curve.json", "training_config.json"} <= {
        p.name for p in folder.iterdir()}


def test_whitened_training_feeds_whitened_rows_and_saves_the_whitening(tmp_path, monkeypatch):
    from sae_core.whitening import Whitener

    gen = torch.Generator().manual_seed(3)
    mixing = torch.randn(16, 16, generator=gen) * torch.linspace(0.1, 3.0, 16)  # correlated, uneven scales
    chunks = [torch.randn(256, 16, generator=gen) @ mixing + 2.0 for _ in range(12)]
    rows = torch.cat(chunks).double()
    whitener = Whitener.from_statistics(rows.mean(0), torch.cov(rows.T), rows.shape[0], eps=0.0)
    fed = []
    original = training_state.SAEState.step

    def spy(self, x, *args, **kwargs):
        fed.append(x.detach().clone())
        return original(self, x, *args, **kwargs)

    monkeypatch.setattr(training_state.SAEState, "step", spy)
    cfg = _small_cfg(total_training_tokens=256 * 12, shuffle_buffer_tokens=0)
    train_from_activations(lambda: chunks, cfg, tmp_path, whitener=whitener)
    seen = torch.cat(fed).double()
    # an epoch of rows, whitened: zero mean and identity covariance (numpy reference)
    np.testing.assert_allclose(np.cov(seen.numpy().T), np.eye(16), atol=1e-4)
    np.testing.assert_allclose(seen.mean(0).numpy(), 0, atol=1e-5)
    loaded = Whitener.load(tmp_path / HOOK)
    torch.testing.assert_close(loaded.transform, whitener.transform)
    assert (tmp_path / HOOK / "whitening.json").exists()


def test_block_shuffler_serves_each_row_once_and_resumes_exactly():
    sizes = [5, 11, 3, 17, 9, 8, 13, 4, 20, 7]
    ids = torch.arange(sum(sizes), dtype=torch.float32)[:, None]
    chunks = list(torch.split(ids, sizes))
    source = TensorChunkSource(lambda: chunks, ["h"])
    shuffler = BlockShuffler(batch_rows=8, batches_per_block=3, shuffle=True, seed=1)
    stream = shuffler.batches(source, 100)
    served = [next(stream)["h"][:, 0] for _ in range(4)]  # one block and one batch of the next
    first_block = torch.cat(served[:3])
    assert sorted(first_block.tolist()) == list(range(24))  # the first 24 rows, each once
    assert first_block.tolist() != list(range(24))  # and mixed
    state = shuffler.state_tensors()
    expected = [next(stream)["h"][:, 0] for _ in range(4)]
    resumed = BlockShuffler(batch_rows=8, batches_per_block=3, shuffle=True, seed=99)
    resumed.load_state_tensors(state)
    again = resumed.batches(source, 100)
    for want in expected:
        assert torch.equal(next(again)["h"][:, 0], want)
    assert sorted(torch.cat([*served[3:], *expected[:2]]).tolist()) == list(range(24, 48))


def test_filling_a_block_shows_a_bar_with_its_total(monkeypatch):
    """The first step waits for a whole shuffle buffer: its fill has a bar, total the block's source rows."""
    from _bars import recording_bar

    bars = []
    monkeypatch.setattr("sae_core.training.sources.tqdm", recording_bar(bars))
    ids = torch.arange(200, dtype=torch.float32)[:, None]
    source = TensorChunkSource(lambda: list(torch.split(ids, 7)), ["h"])
    list(BlockShuffler(batch_rows=8, batches_per_block=6, shuffle=True, seed=1, passes=3).batches(source, 12))
    # two blocks of 48 rows served from 16 source rows each; the second starts from the 5 rows left over
    assert [(b.total, b.n, b.disable) for b in bars] == [(16, 16, False), (16, 16, False)]
    assert [b.initial for b in bars] == [0, 5]
    bars.clear()
    list(BlockShuffler(batch_rows=8, batches_per_block=1, shuffle=True, seed=1).batches(source, 3))
    assert all(b.disable for b in bars)  # a block of one batch: no bar per batch


def test_buffer_passes_serve_each_source_row_that_many_times_and_resume_exactly():
    ids = torch.arange(200, dtype=torch.float32)[:, None]
    source = TensorChunkSource(lambda: list(torch.split(ids, 7)), ["h"])
    shuffler = BlockShuffler(batch_rows=8, batches_per_block=6, shuffle=True, seed=1, passes=3)
    stream = shuffler.batches(source, 100)
    served = [next(stream)["h"][:, 0] for _ in range(7)]  # one block (48 rows from 16 source rows) and a batch
    block = torch.cat(served[:6]).long()
    assert torch.bincount(block).tolist() == [3] * 16  # the first 16 source rows, three times each
    assert block.tolist() != sorted(block.tolist())  # in random order across the block
    state = shuffler.state_tensors()
    expected = [next(stream)["h"][:, 0] for _ in range(6)]
    resumed = BlockShuffler(batch_rows=8, batches_per_block=6, shuffle=True, seed=99, passes=3)
    resumed.load_state_tensors(state)
    again = resumed.batches(source, 100)
    for want in expected:
        assert torch.equal(next(again)["h"][:, 0], want)
    second = torch.cat([*served[6:], *expected[:5]]).long()
    assert torch.bincount(second, minlength=32)[16:].tolist() == [3] * 16  # the next 16, three times each
    with pytest.raises(ValueError, match="buffer_passes=4 .* must hold at least"):
        build_flat(TrainingConfig, "training", hook_points=(HOOK,), buffer_passes=4, shuffle_buffer_tokens=8192,
                   train_batch_size_tokens=4096)


def test_buffer_passes_halve_the_forwarded_tokens_of_a_training_run(tiny_model, corpus_texts, tmp_path):
    texts = corpus_texts[:64]
    runs = {}
    for passes in (1, 2):
        cfg = _model_cfg(total_training_tokens=128 * 8, buffer_passes=passes, checkpoint_every_tokens=None)
        source = _model_source(tiny_model, texts, cfg)[0]
        pulled = []
        chunks = source.chunks

        def counted(position, chunks=chunks, pulled=pulled):
            for chunk, at in chunks(position):
                pulled.append(_rows_of(chunk))
                yield chunk, at

        source.chunks = counted
        runs[passes] = (train_saes(cfg, source, hook_widths(tiny_model, [HOOK]), tmp_path / str(passes)), sum(pulled))
    (one, rows_one), (two, rows_two) = runs[1], runs[2]
    assert one.tokens == two.tokens == 128 * 8  # the same SAE steps
    assert 128 * 8 <= rows_one < 128 * 8 + 1024 and 128 * 4 <= rows_two < 128 * 4 + 1024  # one chunk of slack
    assert rows_two < rows_one


def _rows_of(chunk):
    return next(iter(chunk.values())).shape[0]


def test_config_rejects_bad_values():
    with pytest.raises(TypeError, match="architecture should be 'topk'"):
        _small_cfg(architecture="gated")
    with pytest.raises(ValueError, match="exactly one of d_sae and expansion_factor"):
        _small_cfg(expansion_factor=4.0)
    with pytest.raises(ValueError, match="shuffle_buffer_tokens"):
        _small_cfg(shuffle_buffer_tokens=1000)
    with pytest.raises(ValueError, match="hook_points"):
        _small_cfg(hook_points=())
    with pytest.raises(ValueError, match=r"ce_windows \(300\) must not exceed eval_windows \(256\)"):
        _small_cfg(ce_windows=300)
    with pytest.raises(ValueError, match="eval_windows must be positive"):
        _small_cfg(eval_windows=0, ce_windows=0)
    with pytest.raises(TypeError, match=re.escape("split should be 'length_stratified' | 'random', got 'by_length'")):
        _small_cfg(split="by_length")
    assert _small_cfg(d_sae=None, expansion_factor=4.0).sae.d_sae_for(16) == 64


# --- the model data path ---------------------------------------------------------------------------

def _model_cfg(**overrides) -> TrainingConfig:
    base = dict(hook_points=(HOOK,), d_sae=64, k=4, lr=1e-3, total_training_tokens=128 * 8,
                train_batch_size_tokens=128, shuffle_buffer_tokens=256, max_text_length=32,
                batch_tokens=256, held_out_documents=8, dtype="float32",
                checkpoint_every_tokens=256, log_every_steps=1, dead_window_tokens=256)
    return build_flat(TrainingConfig, "training", **{**base, **overrides})


def _model_source(model, texts, cfg):
    train_docs, _ = split_documents(len(texts), cfg.evaluation.held_out_documents, cfg.seed)
    dataset = WindowedTextDataset(texts, model.tokenizer, cfg.windows.max_text_length, cfg.seed, cfg.windows.prepend_bos,
                                  windows_per_document=cfg.windows_per_document)
    return model_source(model, dataset, cfg, train_docs), dataset, train_docs


def test_pad_and_special_rows_never_reach_the_sae(tiny_model, corpus_texts, tmp_path, monkeypatch):
    texts = corpus_texts[:64]
    cfg = _model_cfg(sae_dtype="float32", total_training_tokens=128 * 4, batch_tokens=1024)  # pads exist
    fed = []
    original = training_state.topk_training_step

    def spy(sae, x, *args):
        fed.append(x.detach().clone())
        return original(sae, x, *args)

    monkeypatch.setattr(training_state, "topk_training_step", spy)
    source = _model_source(tiny_model, texts, cfg)[0]
    train_saes(cfg, source, hook_widths(tiny_model, [HOOK]), tmp_path)
    rows = torch.cat(fed)
    assert rows.shape[0] == 4 * 128

    # Reference: run_with_cache over the same windows; label every position kept / pad / special.
    special = torch.tensor(tiny_model.tokenizer.all_special_ids)
    acts, labels = [], []
    for batch in source.loader():  # the same windows (epoch 0)
        _, cache = tiny_model.run_with_cache(batch.input_ids, names_filter=HOOK)
        pad = batch.attention_mask == 0
        is_special = torch.isin(batch.input_ids, special) & ~pad
        acts.append(cache[HOOK].reshape(-1, cache[HOOK].shape[-1]))
        labels.append((pad * 1 + is_special * 2).reshape(-1))  # 0 kept, 1 pad, 2 special
    acts, labels = torch.cat(acts), torch.cat(labels)
    assert (labels == 1).any() and (labels == 2).any()
    distance = torch.cdist(rows, acts, compute_mode="donot_use_mm_for_euclid_dist")  # (fed, reference)
    nearest = distance.argmin(dim=1)
    assert distance.min(dim=1).values.max() < 1e-4  # every fed row is a reference row
    assert (labels[nearest] == 0).all()  # and a kept one


def test_several_hooks_from_one_forward_pass_stay_row_aligned(tiny_model, corpus_texts, tmp_path, monkeypatch):
    hooks = ("blocks.0.hook_resid_post", "blocks.1.hook_resid_post")
    cfg = _model_cfg(hook_points=hooks, sae_dtype="float32", total_training_tokens=128 * 3)
    fed: dict[str, list[torch.Tensor]] = {h: [] for h in hooks}
    original = training_state.SAEState.step

    def spy(self, x, *args, **kwargs):
        fed[self.hook].append(x.detach().clone())
        return original(self, x, *args, **kwargs)

    monkeypatch.setattr(training_state.SAEState, "step", spy)
    source = _model_source(tiny_model, corpus_texts[:64], cfg)[0]
    run = train_saes(cfg, source, hook_widths(tiny_model, hooks), tmp_path)
    assert sorted(run.saes) == sorted(hooks) and all((tmp_path / h / "cfg.json").exists() for h in hooks)
    reference = {h: [] for h in hooks}
    for batch in source.loader():
        _, cache = tiny_model.run_with_cache(batch.input_ids, names_filter=lambda n: n in hooks)
        for h in hooks:
            reference[h].append(cache[h].reshape(-1, cache[h].shape[-1]))
    positions = {}
    for h in hooks:  # where each fed row sits in the reference (row index over all positions)
        distance = torch.cdist(torch.cat(fed[h]), torch.cat(reference[h]), compute_mode="donot_use_mm_for_euclid_dist")
        assert distance.min(dim=1).values.max() < 1e-4
        positions[h] = distance.argmin(dim=1)
    assert torch.equal(positions[hooks[0]], positions[hooks[1]])  # same tokens, same order, every step


def _weights(folder) -> dict[str, torch.Tensor]:
    return SAE.load_from_disk(str(folder)).state_dict()


@pytest.mark.parametrize("forward", [{}, {"pack_windows": True}, {"windows_per_document": "run_together"}])  # packed + compiled: the kill -9 test below
def test_resume_equals_uninterrupted(tiny_model, corpus_texts, tmp_path, monkeypatch, forward):
    texts = corpus_texts[:64]
    cfg = _model_cfg(total_training_tokens=128 * 10, lr_decay_fraction=0.3, **forward)
    widths = hook_widths(tiny_model, [HOOK])
    straight = train_saes(cfg, _model_source(tiny_model, texts, cfg)[0], widths, tmp_path / "a")

    calls = {"n": 0}
    original = training_state.SAEState.step

    def interrupted(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 8:  # after the checkpoint at step 6, mid-block
            raise KeyboardInterrupt("simulated interruption")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(training_state.SAEState, "step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_saes(cfg, _model_source(tiny_model, texts, cfg)[0], widths, tmp_path / "b")
    assert not (tmp_path / "b" / HOOK).exists()
    calls["n"] = -100
    resumed = train_saes(cfg, _model_source(tiny_model, texts, cfg)[0], widths, tmp_path / "b")
    assert calls["n"] == -100 + 10 - 6  # only the steps after the checkpoint ran again
    a, b = _weights(tmp_path / "a" / HOOK), _weights(tmp_path / "b" / HOOK)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert straight.saes[HOOK].curve == resumed.saes[HOOK].curve


KILLED_CHILD = """
import sys, time
from pathlib import Path

sys.path.insert(0, sys.argv[1])
from sae_core.corpora import fortunes_corpus
from sae_core.files import atomic_path
from sae_core.model_loading import load_model
from sae_core.training import hook_widths, train_saes
from sae_core.training import sparse_topk
from sae_core.training import state as training_state
from test_training import HOOK, _model_cfg, _model_source

out, signal_file, forward = Path(sys.argv[2]), Path(sys.argv[3]), eval(sys.argv[4])
real, calls = training_state._save_tensors, [0]

def torn_save(path, tensors):  # the third checkpoint's SAE file: half written, then hang until killed
    if path.name.startswith("sae-"):
        calls[0] += 1
        if calls[0] == 3:
            real(path, tensors)
            data = path.read_bytes()
            with atomic_path(path) as tmp:
                tmp.write_bytes(data[: len(data) // 2])
                signal_file.write_text("mid-write")
                time.sleep(600)
    return real(path, tensors)

training_state._save_tensors = torn_save
model = load_model("tiny_random")
texts = fortunes_corpus()[:300][:64]
cfg = _model_cfg(total_training_tokens=128 * 10, lr_decay_fraction=0.3, **forward)
train_saes(cfg, _model_source(model, texts, cfg)[0], hook_widths(model, [HOOK]), out)
"""


@pytest.mark.slow  # a subprocess (cold interpreter + imports) and two compiles
def test_kill_9_during_a_checkpoint_write_then_resume_equals_uninterrupted(tiny_model, corpus_texts, tmp_path,
                                                                           monkeypatch):
    """Packed and compiled forward on (the in-process resume test covers the other forwards)."""
    from _subprocess import kill_9_when_signalled

    texts, forward = corpus_texts[:64], {"pack_windows": True, "compile": True}
    cfg = _model_cfg(total_training_tokens=128 * 10, lr_decay_fraction=0.3, **forward)
    widths = hook_widths(tiny_model, [HOOK])
    straight = train_saes(cfg, _model_source(tiny_model, texts, cfg)[0], widths, tmp_path / "a")

    signal_file = tmp_path / "signal"
    kill_9_when_signalled(KILLED_CHILD, [str(Path(__file__).parent), str(tmp_path / "b"), str(signal_file), repr(forward)],
                          signal_file, "the third checkpoint")
    checkpoints = tmp_path / "b" / "checkpoints" / HOOK
    assert json.loads((checkpoints / "latest.json").read_text())["step"] == 4  # the torn step-6 one is not committed
    assert any(p.name.endswith(".tmp") for p in (checkpoints / "step-00000006").iterdir())
    assert not (tmp_path / "b" / HOOK).exists()

    calls = {"n": 0}
    original = training_state.SAEState.step

    def counted(self, *args, **kwargs):
        calls["n"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(training_state.SAEState, "step", counted)
    source = _model_source(tiny_model, texts, cfg)[0]
    assert source.static_shape == (256 // 32, 32)  # packed batches on the static-shape graph, padded when smaller
    resumed = train_saes(cfg, source, widths, tmp_path / "b")
    assert calls["n"] == 10 - 4  # only the steps after the last committed checkpoint ran again
    a, b = _weights(tmp_path / "a" / HOOK), _weights(tmp_path / "b" / HOOK)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert straight.saes[HOOK].curve == resumed.saes[HOOK].curve
    from sae_core.activations import compiled_forward

    compiled = compiled_forward(tiny_model)
    assert compiled.static_calls > 0 and compiled.disabled is None


def test_prefetched_keeps_order_raises_the_producers_error_and_stops():
    from sae_core.loader import prefetched

    assert list(prefetched(iter(range(50)), depth=3)) == list(range(50))

    def failing():
        yield 1
        raise OSError("disk gone")

    stream = prefetched(failing())
    assert next(stream) == 1
    with pytest.raises(OSError, match="disk gone"):
        next(stream)
    made = []

    def endless():
        for i in itertools.count():
            made.append(i)
            yield i

    stream = prefetched(endless(), depth=2)
    assert [next(stream) for _ in range(5)] == list(range(5))
    stream.close()  # the consumer stops: so does the thread, at most depth + 2 items ahead
    seen = len(made)
    time.sleep(0.3)
    assert len(made) == seen <= 5 + 2 + 1


def test_the_profile_of_a_run_accounts_for_its_wall_time(tiny_model, corpus_texts, tmp_path):
    cfg = _model_cfg(total_training_tokens=128 * 4)
    run = train_saes(cfg, _model_source(tiny_model, corpus_texts[:64], cfg)[0], hook_widths(tiny_model, [HOOK]),
                     tmp_path)
    written = json.loads((tmp_path / "profile.json").read_text())
    assert written == json.loads(json.dumps(run.profile)) and written["steps"] == 4
    assert written["wall_seconds"] == pytest.approx(run.seconds)
    assert all(written["seconds"][part] > 0 for part in ("forward", "step"))
    assert sum(written["seconds"].values()) == pytest.approx(run.seconds)  # forward + data + step + other
    assert sum(written["share"].values()) == pytest.approx(1.0)


def test_saved_sae_reloads_with_identical_encodings(tiny_model, corpus_texts, tmp_path):
    cfg = _model_cfg(total_training_tokens=128 * 4)
    source = _model_source(tiny_model, corpus_texts[:64], cfg)[0]
    x = next(source.chunks(0))[0][HOOK]
    sae = build_training_sae(cfg, 32, HOOK, seed=0)
    state = training_state.SAEState(HOOK, sae, cfg)
    for step in range(3):
        state.step(x[:128], step, log=False)
    write_sae_folder(to_inference_sae(sae), tmp_path)
    loaded = SAE.load_from_disk(str(tmp_path))
    assert loaded.cfg.metadata.hook_name == HOOK
    with torch.no_grad():
        assert torch.equal(loaded.encode(x), to_inference_sae(sae).encode(x))
        train_latents = sae.encode(x)  # the training SAE (decoder norms not folded in)
        latents = loaded.encode(x)
    torch.testing.assert_close(latents, train_latents, rtol=1e-5, atol=1e-5)
    # TopK keeps exactly k latents: min(k, #positive pre-activations), from a numpy reference
    W_enc, b_enc, b_dec = (loaded.state_dict()[n].numpy() for n in ("W_enc", "b_enc", "b_dec"))
    pre = (x.numpy() - b_dec) @ W_enc + b_enc
    top = np.sort(pre, axis=1)[:, -cfg.sae.k:]
    np.testing.assert_array_equal((latents != 0).sum(-1).numpy(), (top > 0).sum(-1))
    assert ((latents != 0).sum(-1) == cfg.sae.k).float().mean() > 0.9


# --- integration: SmolLM2 ---------------------------------------------------------------------------

def _explained_variance(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    x, x_hat = x.double(), x_hat.double()
    return 1 - ((x - x_hat) ** 2).sum().item() / ((x - x.mean(0)) ** 2).sum().item()


@pytest.mark.slow
def test_smollm2_sae_beats_baselines(smollm2, tmp_path, golden):
    from sae_core.corpora import fortunes_corpus

    hook, k = "blocks.10.hook_resid_post", 32
    texts = fortunes_corpus()[:3000]
    cfg = build_flat(TrainingConfig, "training", hook_points=(hook,), d_sae=4608, k=k, lr=4e-3, total_training_tokens=49_152,
                         train_batch_size_tokens=2048, shuffle_buffer_tokens=16_384, held_out_documents=64,
                         checkpoint_every_tokens=None, log_every_steps=4)
    source = _model_source(smollm2, texts, cfg)[0]
    run = train_saes(cfg, source, hook_widths(smollm2, [hook]), tmp_path)
    assert run.tokens == 49_152

    # Held-out rows, and references computed here: an untrained SAE (same init, decoder bias at
    # the held-out mean) and the best rank-k linear reconstruction (PCA fitted on the held-out rows).
    _, eval_docs = split_documents(len(texts), cfg.evaluation.held_out_documents, cfg.seed)
    dataset = WindowedTextDataset(texts, smollm2.tokenizer, cfg.windows.max_text_length, cfg.seed, cfg.windows.prepend_bos)
    from sae_core.activations import batch_activations

    x = torch.cat([batch_activations(smollm2, b, [hook], cfg.policy, "float32").acts[hook]
                   for b in make_dataloader(dataset, cfg.loader, eval_docs)])
    trained = run.saes[hook].sae
    with torch.no_grad():
        ev_trained = _explained_variance(x, trained.decode(trained.encode(x)))
        untrained = to_inference_sae(build_training_sae(cfg, x.shape[1], hook, cfg.seed))
        untrained.b_dec.copy_(x.mean(0))
        ev_untrained = _explained_variance(x, untrained.decode(untrained.encode(x)))
    centered = (x - x.mean(0)).double()
    eigenvalues = torch.linalg.eigvalsh(centered.T @ centered).flip(0)
    ev_pca_k = (eigenvalues[:k].sum() / eigenvalues.sum()).item()
    print(f"EV trained {ev_trained:.3f}, untrained {ev_untrained:.3f}, PCA-{k} {ev_pca_k:.3f}")
    assert math.isfinite(ev_trained)
    assert ev_trained > ev_untrained + 0.3
    assert ev_trained > 0.5 * ev_pca_k

    # Golden numbers of this fixed-seed run (tests/golden/smollm2_training.json): a regression
    # anywhere in windows, activations, the training step or the evaluation moves them. EV, L0 and
    # dead fraction on every held-out row; CE-loss recovered by evaluate_sae on 16 held-out documents
    # (three full forwards each: the cost of this test stays in the training).
    with torch.no_grad():
        fired = trained.encode(x) != 0
    ce = evaluate_sae(smollm2, trained, hook, make_dataloader(dataset, cfg.loader, eval_docs[:16]), cfg.policy)
    values = {"explained_variance": ev_trained, "l0": float(fired.sum(1).double().mean()),
              "dead_fraction": float((~fired.any(0)).double().mean()), "ce_loss_recovered": ce.ce_recovered}
    print(f"golden: {values}")
    golden(GOLDEN, values,
           how="tests/test_training.py::test_smollm2_sae_beats_baselines: 49,152 tokens of the first 3,000 "
               "fortunes, TopK k=32, d_sae 4608, lr 4e-3, seed 0, blocks.10, evaluated by evaluate_sae on "
               "its 64 held-out documents (CE-loss recovered: evaluate_sae on the first 16; float32, CPU)")
