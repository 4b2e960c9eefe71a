"""Packed batches (several windows per row, kept apart by the attention mask) against unpacked ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from sae_core.activations import batch_activations, run_to_hooks
from sae_core.config import KEEP_ALL_BUT_PAD, LoaderConfig, TokenPolicy
from sae_core.data import RowPacker, WindowedTextDataset, pad_collate, pad_id_of
from sae_core.loader import document_progress, loader_documents, make_dataloader
from sae_core.store import ActivationRun, save

TEXTS = ["The cat sat on the mat and looked at the dog for a long while.", "Hi", "Sparse features.",
         "One two three four five six seven eight nine ten eleven twelve thirteen", "A", "Yes, no, maybe.",
         "Short", "The quick brown fox jumps over the lazy dog, twice and then once more."]
HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]


@pytest.fixture(scope="module")
def standard_model(tiny_model):
    """A tiny GPT-2-like model: learned absolute position embeddings, LayerNorm, GELU."""
    cfg = HookedTransformerConfig(n_layers=2, d_model=32, d_head=8, n_heads=4, d_mlp=64, n_ctx=128, act_fn="gelu",
                                  normalization_type="LN", positional_embedding_type="standard",
                                  d_vocab=len(tiny_model.tokenizer), seed=1)
    model = HookedTransformer(cfg, tokenizer=tiny_model.tokenizer)
    model.eval()
    return model


def _windows(model, texts=TEXTS, max_len=16, prepend_bos=True):
    dataset = WindowedTextDataset(texts, model.tokenizer, max_len, prepend_bos=prepend_bos)
    return [dataset[i] for i in range(len(texts))]


def _by_cell(acts):
    """{(document, position): row} of an ActivationBatch's first hook, and the token ids the same way."""
    return {(int(d), int(p)): i for i, (d, p) in enumerate(zip(acts.doc_index, acts.position, strict=True))}


def test_row_packer_fills_rows_longest_first():
    rng = np.random.default_rng(0)
    for _ in range(50):
        lengths = sorted(rng.integers(1, 40, size=int(rng.integers(1, 60))).tolist(), reverse=True)
        packer = RowPacker(lengths[0])
        for i, n in enumerate(lengths):
            packer.add(i, n)
        placed = sorted(i for row in packer.rows for i in row)
        assert placed == list(range(len(lengths)))  # every window exactly once
        assert all(sum(lengths[i] for i in row) <= lengths[0] for row in packer.rows)
        # a new row opens only when the window fits no existing row
        for r, row in enumerate(packer.rows[1:], start=1):
            first = lengths[row[0]]
            filled_before = [sum(lengths[i] for i in earlier if i < row[0]) for earlier in packer.rows[:r]]
            assert all(lengths[0] - used < first for used in filled_before)
    packer = RowPacker(10)
    for i, n in enumerate([10] + [2] * 20):
        packer.add(i, n)
    assert len(packer.rows) == 5  # 50 tokens in rows of 10: no cell wasted
    with pytest.raises(ValueError, match="does not fit"):
        packer.add(99, 11)


@pytest.mark.parametrize("prepend_bos", [True, False])
def test_packed_collate_maps_every_cell_back_to_its_window(tiny_model, prepend_bos):
    pad = pad_id_of(tiny_model.tokenizer)
    items = _windows(tiny_model, prepend_bos=prepend_bos)
    plain, packed = pad_collate(items, pad), pad_collate(items, pad, pack=True)
    assert packed.input_ids.shape[0] < plain.input_ids.shape[0]  # short windows shared rows
    assert packed.input_ids.shape[1] == plain.input_ids.shape[1]
    assert torch.equal(packed.doc_index, plain.doc_index) and torch.equal(packed.window_lengths(), plain.window_lengths())

    def cells(batch):
        real = batch.attention_mask.bool()
        return sorted(zip(batch.cell_doc_index()[real].tolist(), batch.token_positions()[real].tolist(),
                          batch.input_ids[real].tolist(), strict=True))

    assert cells(packed) == cells(plain)
    # independent walk over the packed rows: each window contiguous, offsets counting from its first cell
    for r in range(packed.input_ids.shape[0]):
        seen: dict[int, int] = {}
        for p, w in enumerate(packed.segment[r].tolist()):
            if w < 0:
                assert packed.attention_mask[r, p] == 0
                continue
            seen.setdefault(w, p)
            assert packed.cell_offsets()[r, p] == p - seen[w]
            assert packed.input_ids[r, p] == items[w].input_ids[p - seen[w]]


@pytest.mark.parametrize("model_name", ["tiny_model", "standard_model"])
def test_packed_activations_equal_unpacked(request, model_name):
    model = request.getfixturevalue(model_name)
    pad = pad_id_of(model.tokenizer)
    items = _windows(model)
    plain, packed = pad_collate(items, pad), pad_collate(items, pad, pack=True)
    for policy in (TokenPolicy(), KEEP_ALL_BUT_PAD):
        for positions in ("all", "last", [0, 2, -1]):
            want = batch_activations(model, plain, HOOKS, policy, positions=positions)
            got = batch_activations(model, packed, HOOKS, policy, positions=positions)
            want_rows, got_rows = _by_cell(want), _by_cell(got)
            assert set(got_rows) == set(want_rows), (policy, positions)
            order = [got_rows[key] for key in want_rows]
            assert torch.equal(got.token_ids[order], want.token_ids)
            for hook in HOOKS:
                torch.testing.assert_close(got.acts[hook][order], want.acts[hook], rtol=0, atol=2e-5)
    assert all(not model.hook_dict[name].fwd_hooks for name in model.hook_dict)  # every hook removed


def test_packing_without_the_mask_would_leak_between_windows(tiny_model, standard_model):
    """The check above can fail: the same packed rows forwarded without the mask hooks differ."""
    for model in (tiny_model, standard_model):
        packed = pad_collate(_windows(model), pad_id_of(model.tokenizer), pack=True)
        masked = run_to_hooks(model, HOOKS[-1:], packed.input_ids, batch=packed)[HOOKS[-1]]
        leaky = run_to_hooks(model, HOOKS[-1:], packed.input_ids)[HOOKS[-1]]
        later = (packed.cell_offsets() < torch.arange(packed.input_ids.shape[1])) & packed.attention_mask.bool()
        assert later.any()
        assert (masked[later] - leaky[later]).abs().amax() > 1e-3


def test_packing_refuses_models_it_cannot_keep_apart(standard_model):
    packed = pad_collate(_windows(standard_model), pad_id_of(standard_model.tokenizer), pack=True)
    cfg = standard_model.cfg
    old = cfg.positional_embedding_type
    cfg.positional_embedding_type = "relative_positional_bias"
    try:
        with pytest.raises(NotImplementedError, match="pack_windows=False"):
            run_to_hooks(standard_model, HOOKS, packed.input_ids, batch=packed)
    finally:
        cfg.positional_embedding_type = old
    assert not any(standard_model.hook_dict[name].fwd_hooks for name in standard_model.hook_dict)


def test_token_budget_counts_packed_rows(tiny_model, corpus_texts):
    dataset = WindowedTextDataset(corpus_texts[:200], tiny_model.tokenizer, 64)
    budget = 16 * 64
    lengths = dataset.window_lengths(range(len(dataset)))
    stats = {}
    for pack in (False, True):
        cells, docs = 0, []
        for batch in make_dataloader(dataset, LoaderConfig(batch_size=16, batch_tokens=budget, pack_windows=pack)):
            assert batch.input_ids.numel() <= budget or batch.n_windows == 1
            cells += batch.input_ids.numel()
            docs += batch.doc_index.tolist()
            assert batch.window_lengths().tolist() == [lengths[d] for d in batch.doc_index.tolist()]
        assert sorted(docs) == [i for i, n in enumerate(lengths) if n]  # every document once
        stats[pack] = cells
    real = sum(lengths)
    assert stats[True] < stats[False]
    assert real / stats[True] > 0.97  # padding nearly gone


def test_save_packed_equals_save_unpacked(tiny_model, corpus_texts, tmp_path):
    docs = list(corpus_texts[:60])
    common = dict(max_text_length=64, batch_size=8, batch_tokens=8 * 64, shard_size=300, progress=False,
                  prepend_bos=False)
    runs = {pack: ActivationRun.open(tmp_path / str(pack), save(tiny_model, HOOKS, docs, tmp_path / str(pack),
                                                                pack_windows=pack, **common))
            for pack in (False, True)}
    tables = {}
    for pack, run in runs.items():
        order = np.lexsort((run.position().numpy(), run.doc_index().numpy()))
        tables[pack] = (run.doc_index()[order], run.position()[order], run.token_ids()[order],
                        {h: run.activations(h)[order] for h in HOOKS})
    for a, b in zip(tables[False][:3], tables[True][:3], strict=True):
        assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))
    for h in HOOKS:
        torch.testing.assert_close(torch.as_tensor(tables[True][3][h]), torch.as_tensor(tables[False][3][h]),
                                   rtol=0, atol=2e-5)
    for key in ("sample_count", "token_count"):
        assert runs[True].meta[key] == runs[False].meta[key]
    assert runs[True].meta["batch_count"] < runs[False].meta["batch_count"]
    assert runs[True].meta["config"]["loader"]["pack_windows"] is True
    with pytest.raises(ValueError, match="cannot resume"):  # a run keeps its layout
        save(tiny_model, HOOKS, docs, tmp_path / "True", run_id=runs[True].run_id, pack_windows=False, **common)
    with pytest.raises(ValueError, match="NPZ chunks"):
        save(tiny_model, HOOKS, docs, tmp_path, shard_format="npz", pack_windows=True, **common)


def epoch_rows(source, monkeypatch):
    """{(document, position): {hook: row}} of one epoch of a training source's chunks, and its padded token
    cells: a spy on the source's ``batch_activations`` labels every row it yields."""
    from sae_core.training import sources

    labelled, cells, real = [], [0], sources.batch_activations

    def spy(model, batch, *args, **kwargs):
        acts = real(model, batch, *args, **kwargs)
        labelled.append(acts)
        cells[0] += batch.input_ids.numel()
        return acts

    monkeypatch.setattr(sources, "batch_activations", spy)
    stream = source.chunks(0)
    for _ in range(len(source.sampler.batches(0))):
        chunk, _ = next(stream)
        assert all(chunk[h] is labelled[-1].acts[h] for h in source.hooks)  # yielded as computed
    stream.close()
    monkeypatch.undo()
    keys = torch.cat([torch.stack([a.doc_index, a.position], 1) for a in labelled]).numpy()
    rows = torch.cat([torch.cat([a.acts[h] for h in source.hooks], 1) for a in labelled]).double().numpy()
    # in (document, position) order; a cell of two overlapping (proportional) windows has two rows
    order = np.lexsort((rows.sum(1), keys[:, 1], keys[:, 0]))
    return (keys[order], rows[order]), cells[0]


def assert_same_rows(rows, reference, atol=1e-5):
    np.testing.assert_array_equal(rows[0], reference[0])
    np.testing.assert_allclose(rows[1], reference[1], rtol=1e-5, atol=atol)


@pytest.mark.parametrize("windows_per_document", ["one", "proportional"])
def test_packed_training_source_streams_the_unpacked_rows_with_less_padding(tiny_model, corpus_texts, monkeypatch,
                                                                           windows_per_document):
    """Packing regroups the windows into rows; an epoch holds the same windows with the same activations."""
    from sae_core.training.sources import ModelActivationSource

    texts = sorted(corpus_texts, key=len)[:40] + list(corpus_texts[:20])  # short ones to pack, long ones
    dataset = WindowedTextDataset(texts, tiny_model.tokenizer, 32, prepend_bos=True,
                                  windows_per_document=windows_per_document)
    streams = {}
    for pack in (False, True):
        source = ModelActivationSource(tiny_model, dataset, HOOKS, TokenPolicy(), "float32", batch_tokens=256,
                                       loader=LoaderConfig(pack_windows=pack))
        streams[pack] = epoch_rows(source, monkeypatch)
    (packed, packed_cells), (plain, plain_cells) = streams[True], streams[False]
    assert len(plain[0]) > 500 and len(np.unique(plain[0][:, 0])) == 60
    assert_same_rows(packed, plain)
    if windows_per_document == "one":  # here mostly short fortunes: packing removes padding
        assert packed_cells < plain_cells


def test_negative_positions_count_from_each_windows_end(tiny_model):
    items = _windows(tiny_model, prepend_bos=False)
    pad = pad_id_of(tiny_model.tokenizer)
    want = sorted((w.doc_index, w.window_start + w.input_ids.numel() - offset)
                  for w in items for offset in (1, 2) if w.input_ids.numel() >= offset)
    for pack in (False, True):
        got = batch_activations(tiny_model, pad_collate(items, pad, pack=pack), HOOKS[:1], KEEP_ALL_BUT_PAD,
                                positions=[-1, -2])
        assert sorted(_by_cell(got)) == want


def test_packed_batches_are_the_same_from_worker_processes(tiny_model, corpus_texts):
    dataset = WindowedTextDataset(corpus_texts[:80], tiny_model.tokenizer, 64)
    batches = {}
    for workers in (0, 1):
        cfg = LoaderConfig(batch_size=8, batch_tokens=8 * 64, pack_windows=True, num_dataloader_workers=workers)
        batches[workers] = list(make_dataloader(dataset, cfg))
    assert len(batches[0]) == len(batches[1])
    for a, b in zip(batches[0], batches[1], strict=True):
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.segment, b.segment)
        assert torch.equal(a.doc_index, b.doc_index)


@pytest.mark.slow  # torch.compile from a cold cache
def test_compiled_packed_training_source_streams_the_eager_unpacked_rows(tiny_model, corpus_texts, monkeypatch):
    """What training runs with FORWARD compile and LOADER pack_windows: the eager unpacked stream's rows."""
    from sae_core.activations import compiled_forward
    from sae_core.training.sources import ModelActivationSource

    texts = sorted(corpus_texts, key=len)[:40] + list(corpus_texts[:20])
    dataset = WindowedTextDataset(texts, tiny_model.tokenizer, 32, prepend_bos=True)
    streams, compiled = {}, compiled_forward(tiny_model)
    calls, static_calls = compiled.compiled_calls, compiled.static_calls
    for fast in (False, True):
        source = ModelActivationSource(tiny_model, dataset, HOOKS, TokenPolicy(), "float32", batch_tokens=256,
                                       loader=LoaderConfig(pack_windows=fast), compile=fast)
        streams[fast] = epoch_rows(source, monkeypatch)[0]
    assert source.static_shape == (256 // 32, 32)  # every packed batch fits: all on the static-shape graph
    assert compiled.compiled_calls - calls == compiled.static_calls - static_calls > 0 and compiled.disabled is None
    assert_same_rows(streams[True], streams[False], atol=1e-4)


@pytest.mark.parametrize("loader_cfg", [LoaderConfig(batch_size=8), LoaderConfig(batch_tokens=256, pack_windows=True)])
def test_document_progress_knows_its_total_without_measuring_windows(tiny_model, corpus_texts, loader_cfg, monkeypatch):
    """The bar's total is the documents read (known before any window is measured, even with a token
    budget); on a resume its start is the documents of the skipped batches, counted from the batches."""
    dataset = WindowedTextDataset(corpus_texts[:60], tiny_model.tokenizer, 32, prepend_bos=True)
    documents = list(range(3, 60, 2))
    full = list(make_dataloader(dataset, loader_cfg, documents))
    seen = [len(set(b.doc_index.tolist())) + b.n_empty for b in full]
    assert sum(seen) == len(documents)
    from _bars import recording_bar

    bars = []
    monkeypatch.setattr("sae_core.loader.tqdm", recording_bar(bars))
    measured = []
    original = WindowedTextDataset.window_lengths
    monkeypatch.setattr(WindowedTextDataset, "window_lengths", lambda self, idx: measured.append(len(idx)) or original(self, idx))
    loader = make_dataloader(dataset, loader_cfg, documents)
    assert loader_documents(loader) == (len(documents), 0) and measured == []
    assert len(list(document_progress(loader, "test"))) == len(full)
    assert bars[-1].total == bars[-1].n == len(documents)
    resumed = make_dataloader(dataset, loader_cfg, documents, start_batch=2)
    list(document_progress(resumed, "test", start_batch=2))
    assert bars[-1].total == bars[-1].n == len(documents) and bars[-1].n - sum(seen[2:]) == sum(seen[:2])
