"""The ``torch.compile``d forward (``run_to_hooks(..., compile=True)``) against the eager TransformerLens forward."""

from __future__ import annotations

import logging

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from sae_core.activations import compiled_forward, run_to_hooks
from sae_core.compile_passes import COMPILE_OPTIONS, FORWARD_GRAPH_PASS, onednn_mm
from sae_core.data import WindowedTextDataset, pad_collate, pad_id_of
from sae_core.store import ActivationRun, save

TEXTS = ["The cat sat on the mat and looked at the dog for a long while.", "Hi", "Sparse features.",
         "One two three four five six seven eight nine ten eleven twelve thirteen", "A", "Yes, no, maybe.",
         "Short", "The quick brown fox jumps over the lazy dog, twice and then once more."]
HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]

pytestmark = pytest.mark.slow  # torch.compile from a cold cache


def _batches(model, texts=TEXTS, max_len=16):
    dataset = WindowedTextDataset(texts, model.tokenizer, max_len, prepend_bos=True)
    items = [dataset[i] for i in range(len(texts))]
    pad = pad_id_of(model.tokenizer)
    return pad_collate(items, pad), pad_collate(items, pad, pack=True)


def _fresh_model(tokenizer, positions="rotary", n_layers=2, seed=3):
    cfg = HookedTransformerConfig(n_layers=n_layers, d_model=32, d_head=8, n_heads=4, d_mlp=64, n_ctx=128, act_fn="silu",
                                  normalization_type="RMS", positional_embedding_type=positions,
                                  d_vocab=len(tokenizer), seed=seed)
    model = HookedTransformer(cfg, tokenizer=tokenizer)
    model.eval()
    return model


def _no_hooks_left(model):
    return not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_compiled_equals_eager_plain_and_packed_over_varying_shapes(tiny_model):
    compiled = compiled_forward(tiny_model)
    calls = compiled.compiled_calls
    short = _batches(tiny_model, TEXTS[:5], max_len=12)
    long = _batches(tiny_model, TEXTS, max_len=16)
    for batch in (*short, *long):  # two graphs (plain, packed); the second shapes reuse them
        got = run_to_hooks(tiny_model, HOOKS, batch.input_ids, batch=batch, compile=True)
        want = run_to_hooks(tiny_model, HOOKS, batch.input_ids, batch=batch)
        for hook in HOOKS:
            torch.testing.assert_close(got[hook], want[hook], rtol=0, atol=1e-5)
    assert compiled.compiled_calls == calls + 4 and compiled.disabled is None
    assert _no_hooks_left(tiny_model)


def test_blocks_share_one_graph_and_stay_eager_outside_the_call(tiny_model):
    """Regional compilation: a 6-layer model compiles no more graphs than a 2-layer one (blocks with the
    same hooks share a graph), and after the call the model's blocks are plain eager modules again."""
    from torch._dynamo.utils import counters

    plain, packed = _batches(tiny_model)
    graphs = {}
    for n_layers in (2, 6):
        model = _fresh_model(tiny_model.tokenizer, n_layers=n_layers)
        hook = f"blocks.{n_layers - 1}.hook_resid_post"
        before = counters["stats"]["unique_graphs"]
        for batch in (plain, packed):
            got = run_to_hooks(model, [hook], batch.input_ids, batch=batch, compile=True)[hook]
            torch.testing.assert_close(got, run_to_hooks(model, [hook], batch.input_ids, batch=batch)[hook],
                                       rtol=0, atol=1e-5)
        graphs[n_layers] = counters["stats"]["unique_graphs"] - before
        assert compiled_forward(model).compiled_calls == 2
        assert all(block._compiled_call_impl is None for block in model.blocks)
    assert 0 < graphs[6] <= graphs[2], graphs


def test_two_models_of_one_shape_each_get_their_own_activations(tiny_model):
    """Blocks of two models share compiled code (same class and shapes): each call must still read its
    own model's weights and write its own captures."""
    plain, packed = _batches(tiny_model)
    models = [_fresh_model(tiny_model.tokenizer, seed=seed) for seed in (5, 6)]
    for batch in (plain, packed, plain):
        outs = [run_to_hooks(m, HOOKS, batch.input_ids, batch=batch, compile=True) for m in models]
        for model, got in zip(models, outs, strict=True):
            want = run_to_hooks(model, HOOKS, batch.input_ids, batch=batch)
            for hook in HOOKS:
                torch.testing.assert_close(got[hook], want[hook], rtol=0, atol=1e-5)
        assert (outs[0][HOOKS[-1]] - outs[1][HOOKS[-1]]).abs().amax() > 1e-2


def test_compiled_packed_rows_are_kept_apart(tiny_model):
    """The window mask is a graph input: a packed batch's windows match their unpacked selves."""
    plain, packed = _batches(tiny_model)
    got = run_to_hooks(tiny_model, HOOKS[-1:], packed.input_ids, batch=packed, compile=True)[HOOKS[-1]]
    want = run_to_hooks(tiny_model, HOOKS[-1:], plain.input_ids)[HOOKS[-1]]
    offsets, windows = packed.cell_offsets(), packed.cell_windows()
    real = packed.attention_mask.bool()
    rows = [int(plain.doc_index.tolist().index(int(packed.doc_index[w]))) for w in windows[real].tolist()]
    torch.testing.assert_close(got[real], want[rows, offsets[real]], rtol=0, atol=2e-5)
    leaky = run_to_hooks(tiny_model, HOOKS[-1:], packed.input_ids, compile=True)[HOOKS[-1]]  # no mask
    assert (leaky[real] - got[real]).abs().amax() > 1e-3


def test_learned_positions_restart_in_compiled_packed_rows(tiny_model):
    model = _fresh_model(tiny_model.tokenizer, positions="standard")
    plain, packed = _batches(model)
    got = run_to_hooks(model, HOOKS, packed.input_ids, batch=packed, compile=True)
    want = run_to_hooks(model, HOOKS, packed.input_ids, batch=packed)
    for hook in HOOKS:
        torch.testing.assert_close(got[hook], want[hook], rtol=0, atol=1e-5)
    assert compiled_forward(model).compiled_calls == 1


def test_hook_sets_with_the_same_stop_layer_never_share_a_graph(tiny_model):
    plain, _ = _batches(tiny_model)
    outs = {}
    for hooks in (["blocks.1.hook_mlp_out"], ["blocks.1.hook_resid_mid"], ["blocks.1.hook_mlp_out"]):
        got = run_to_hooks(tiny_model, hooks, plain.input_ids, compile=True)
        want = run_to_hooks(tiny_model, hooks, plain.input_ids)
        torch.testing.assert_close(got[hooks[0]], want[hooks[0]], rtol=0, atol=1e-5)
        outs[hooks[0]] = got[hooks[0]]
    assert (outs["blocks.1.hook_mlp_out"] - outs["blocks.1.hook_resid_mid"]).abs().amax() > 1e-2


def test_compiled_bfloat16_runs_under_autocast(tiny_model):
    plain, _ = _batches(tiny_model)
    hook = HOOKS[-1]
    exact = run_to_hooks(tiny_model, [hook], plain.input_ids, "float32")[hook]
    eager = run_to_hooks(tiny_model, [hook], plain.input_ids, "bfloat16")[hook]
    got = run_to_hooks(tiny_model, [hook], plain.input_ids, "bfloat16", compile=True)[hook]
    error, eager_error = (got.float() - exact).abs().amax(), (eager.float() - exact).abs().amax()
    assert error > 1e-4  # bfloat16 did run: float32 would match to ~1e-6
    assert error <= 2 * eager_error  # and no worse than the eager autocast forward


def test_other_hooks_and_inference_mode_take_the_eager_forward(tiny_model):
    plain, _ = _batches(tiny_model)
    compiled = compiled_forward(tiny_model)
    calls = compiled.compiled_calls

    def ablate(tensor, hook):
        return torch.zeros_like(tensor)

    with tiny_model.hooks(fwd_hooks=[("blocks.0.hook_mlp_out", ablate)]):
        got = run_to_hooks(tiny_model, HOOKS, plain.input_ids, compile=True)
        want = run_to_hooks(tiny_model, HOOKS, plain.input_ids)
    with torch.inference_mode():
        inference = run_to_hooks(tiny_model, HOOKS, plain.input_ids, compile=True)
    clean = run_to_hooks(tiny_model, HOOKS, plain.input_ids)
    for hook in HOOKS:
        assert torch.equal(got[hook], want[hook])  # the user's ablation took effect
        assert torch.equal(inference[hook], clean[hook])
    assert (got[HOOKS[-1]] - clean[HOOKS[-1]]).abs().amax() > 1e-3
    assert compiled.compiled_calls == calls
    assert _no_hooks_left(tiny_model)


def test_a_failing_compiler_falls_back_to_the_eager_forward(tiny_model, caplog):
    model = _fresh_model(tiny_model.tokenizer)
    plain, packed = _batches(model)
    attempts = []

    def broken(*args, **kwargs):
        attempts.append(args)
        raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found")

    compiled_forward(model).compiler = lambda call, dynamic: broken
    with caplog.at_level(logging.WARNING, logger="sae_core.activations"):
        first = run_to_hooks(model, HOOKS, packed.input_ids, batch=packed, compile=True,
                             static_shape=tuple(packed.input_ids.shape))
        second = run_to_hooks(model, HOOKS, plain.input_ids, batch=plain, compile=True)
    assert "C++ compiler" in caplog.text and "eager forward" in caplog.text
    assert len(attempts) == 1 and "InvalidCxxCompiler" in compiled_forward(model).disabled
    assert compiled_forward(model).static_calls == 0 == compiled_forward(model).padded_cells  # none ran on it
    for batch, got in ((packed, first), (plain, second)):
        want = run_to_hooks(model, HOOKS, batch.input_ids, batch=batch)
        for hook in HOOKS:
            assert torch.equal(got[hook], want[hook])
    assert _no_hooks_left(model)


def test_save_with_the_compiled_forward_stores_the_same_rows(tiny_model, corpus_texts, tmp_path):
    docs = list(corpus_texts[:40])
    common = dict(max_text_length=32, batch_size=8, batch_tokens=8 * 32, shard_size=200, progress=False,
                  pack_windows=True)
    runs = {flag: ActivationRun.open(tmp_path / str(flag), save(tiny_model, HOOKS, docs, tmp_path / str(flag),
                                                                compile=flag, **common))
            for flag in (False, True)}
    eager, compiled = runs[False], runs[True]
    assert compiled.meta["config"]["forward"]["compile"] is True
    assert compiled_forward(tiny_model).static_calls > 0  # packed to a token budget: the static-shape graph
    for read in ("doc_index", "position", "token_ids"):
        assert torch.equal(torch.as_tensor(getattr(compiled, read)()), torch.as_tensor(getattr(eager, read)()))
    for hook in HOOKS:
        torch.testing.assert_close(torch.as_tensor(compiled.activations(hook)[:]),
                                   torch.as_tensor(eager.activations(hook)[:]), rtol=0, atol=2e-5)
    for key in ("sample_count", "token_count", "batch_count"):
        assert compiled.meta[key] == eager.meta[key]
    # compile_forward is not part of a run's identity: the run resumes (here: is complete) either way
    assert save(tiny_model, HOOKS, docs, tmp_path / "True", run_id=compiled.run_id, compile=False,
                **common) == compiled.run_id
    with pytest.raises(ValueError, match="cannot resume"):
        save(tiny_model, HOOKS, docs, tmp_path / "True", run_id=compiled.run_id, compile=False,
             **{**common, "pack_windows": False})


def _nan_guard(scores):  # TransformerLens's guard after the attention softmax
    pattern = torch.softmax(scores, dim=-1)
    return torch.where(torch.isnan(pattern), torch.zeros_like(pattern), pattern)


def test_the_isnan_pass_keeps_every_value_and_the_compiled_forward_runs_it(tiny_model):
    """``isnan(x)`` as ``x != x`` (sae_core.compile_passes): NaN, +-inf and fully masked rows as eager."""
    scores = torch.randn(4, 8, 16)
    scores[0, 1], scores[1, 2, 3], scores[2, 0, 5] = float("-inf"), float("nan"), float("inf")  # NaN rows
    scores[3, :, 8:] = float("-inf")  # partly masked rows keep their values
    before = FORWARD_GRAPH_PASS.isnan_rewritten
    with torch._inductor.config.patch(force_disable_caches=True):  # compile, so the pass runs
        got = torch.compile(_nan_guard, options=COMPILE_OPTIONS)(scores)
        plain = torch.compile(_nan_guard)(scores)
    assert FORWARD_GRAPH_PASS.isnan_rewritten == before + 1
    want = _nan_guard(scores)
    assert not want.isnan().any() and (want[0, 1] == 0).all() and (want[1, 2] == 0).all() and (want[2, 0] == 0).all()
    assert torch.equal(got, plain) and torch.allclose(got, want, rtol=0, atol=1e-7)
    model = _fresh_model(tiny_model.tokenizer, seed=5)
    packed = _batches(model)[1]
    before = FORWARD_GRAPH_PASS.isnan_rewritten
    with torch._inductor.config.patch(force_disable_caches=True):
        got = run_to_hooks(model, HOOKS, packed.input_ids, batch=packed, compile=True,
                           static_shape=tuple(packed.input_ids.shape))
    assert FORWARD_GRAPH_PASS.isnan_rewritten > before  # the blocks' graph had its guard rewritten
    want = run_to_hooks(model, HOOKS, packed.input_ids, batch=packed)
    for hook in HOOKS:
        torch.testing.assert_close(got[hook], want[hook], rtol=0, atol=1e-5)


def _projections(x, weight, bias):  # TransformerLens's linears: x @ W.T + b, and one without a bias
    return torch.nn.functional.linear(x, weight, bias), x @ weight.t()


def test_the_matmul_pass_runs_float32_cpu_matmuls_on_onednn_and_leaves_the_others(monkeypatch):
    """float32 CPU ``mm`` / ``addmm`` become oneDNN's linear (sae_core.compile_passes) with float32 results;
    bfloat16 ones, and all of them where oneDNN is missing, stay as they were."""
    x, weight, bias = torch.randn(64, 48), torch.randn(40, 48), torch.randn(40)
    want = x.double() @ weight.double().t()
    mat2 = torch.randn(40, 48).t()  # not contiguous in the layout oneDNN takes
    torch.testing.assert_close(onednn_mm(x, mat2, None).double(), x.double() @ mat2.double(), rtol=0, atol=1e-4)
    before = FORWARD_GRAPH_PASS.matmuls_rewritten
    with torch._inductor.config.patch(force_disable_caches=True):  # compile, so the pass runs
        with_bias, without = torch.compile(_projections, options=COMPILE_OPTIONS)(x, weight, bias)
        assert FORWARD_GRAPH_PASS.matmuls_rewritten == before + 2
        torch.testing.assert_close(with_bias.double(), want + bias.double(), rtol=0, atol=1e-4)
        torch.testing.assert_close(without.double(), want, rtol=0, atol=1e-4)
        halves = [t.bfloat16() for t in (x, weight, bias)]
        got = torch.compile(_projections, options=COMPILE_OPTIONS)(*halves)
        assert FORWARD_GRAPH_PASS.matmuls_rewritten == before + 2 and got[0].dtype == torch.bfloat16
        monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
        torch._dynamo.reset()
        torch.compile(_projections, options=COMPILE_OPTIONS)(x, weight, bias)
        assert FORWARD_GRAPH_PASS.matmuls_rewritten == before + 2


def test_compile_and_pack_windows_must_be_bools():
    from sae_core.config import StoreConfig, with_overrides

    with pytest.raises(TypeError, match="save.forward.compile should be bool, got 'yes'"):
        with_overrides(StoreConfig(), "save", compile="yes")
    with pytest.raises(TypeError, match="save.loader.pack_windows should be bool, got 1"):
        with_overrides(StoreConfig(), "save", pack_windows=1)


def _dynamic_shape_blocks(compiled):
    """Blocks for which the dynamic-shape graph was asked for (made on first use)."""
    return sorted(index for index, static in compiled.blocks if not static)


def _assert_eager(model, batch, static_shape, hooks=HOOKS):
    got = run_to_hooks(model, hooks, batch.input_ids, batch=batch, compile=True, static_shape=static_shape)
    want = run_to_hooks(model, hooks, batch.input_ids, batch=batch)
    for hook in hooks:
        assert got[hook].shape == want[hook].shape
        torch.testing.assert_close(got[hook], want[hook], rtol=0, atol=1e-5)


@pytest.mark.parametrize("positions", ["rotary", "standard"])
def test_batches_that_fit_the_static_shape_run_padded_on_its_graph(tiny_model, positions):
    """Batches, plain or packed, that fit in ``static_shape`` run on the static-shape graph padded up to it
    and give the eager activations of their own cells (learned positions restart in padded rows too);
    a wider batch, and every batch without a static shape, gets the dynamic-shape graph."""
    model = _fresh_model(tiny_model.tokenizer, positions=positions)
    compiled = compiled_forward(model)
    plain, packed = _batches(model, TEXTS, max_len=16)
    small_plain, small_packed = _batches(model, TEXTS[2:7], max_len=12)
    static = tuple(plain.input_ids.shape)
    for batch in (plain, packed, small_plain, small_packed):
        _assert_eager(model, batch, static)
    assert _dynamic_shape_blocks(compiled) == []  # the static-shape graphs served them all, padded
    cells = plain.input_ids.numel()
    assert packed.input_ids.shape[0] < plain.input_ids.shape[0]
    assert compiled.padded_cells == sum(cells - b.input_ids.numel() for b in (packed, small_plain, small_packed))
    wide_plain, wide_packed = _batches(model, TEXTS, max_len=24)
    for batch in (wide_plain, wide_packed):
        _assert_eager(model, batch, static)
    assert _dynamic_shape_blocks(compiled) == [0, 1] and compiled.disabled is None
    assert _no_hooks_left(model)


def test_no_static_shape_or_attention_pattern_hooks_take_the_dynamic_shape_graph(tiny_model):
    model = _fresh_model(tiny_model.tokenizer)
    compiled = compiled_forward(model)
    plain, _ = _batches(model, TEXTS, max_len=16)
    small, _ = _batches(model, TEXTS[:3], max_len=8)
    _assert_eager(model, small, None)
    assert compiled.blocks and _dynamic_shape_blocks(compiled) == [0, 1]
    pattern = ["blocks.1.attn.hook_pattern"]  # (batch, head, query, key): padding would change its shape
    _assert_eager(model, small, tuple(plain.input_ids.shape), pattern)
    assert all(not static for _, static in compiled.blocks) and compiled.padded_cells == 0
    assert compiled.compiled_calls == 2 and compiled.disabled is None
