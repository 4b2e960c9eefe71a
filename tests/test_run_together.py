"""Documents run together (``windows_per_document="run_together"``) against SAELens's own contexts and a
plain forward pass of the same rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sae_lens.tokenization_and_batching import concat_and_batch_sequences

from sae_core.activations import batch_activations
from sae_core.config import KEEP_ALL_BUT_PAD, TokenPolicy
from sae_core.data import WindowedTextDataset, pad_collate, pad_id_of
from sae_core.training.sources import ModelActivationSource, TokenBudgetBatchSampler

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
WIDTH = 32


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _joined_texts(corpus_texts):
    """Short fortunes and a few long ones: documents split across rows and rows of several documents."""
    return list(corpus_texts[:50]) + ["\n".join(corpus_texts[50 + 10 * i:60 + 10 * i]) for i in range(3)]


def _rows(dataset, batches, pad):
    return [pad_collate([dataset[item] for item in batch], pad) for batch in batches]


@pytest.mark.parametrize("epoch", [0, 3])
def test_rows_are_the_contexts_saelens_makes_from_the_same_document_order(tiny_model, corpus_texts, epoch):
    """Every row equals the context SAELens's ``concat_and_batch_sequences`` makes (BOS first and between
    documents) from the documents in the epoch's seeded order; where SAELens puts a separator in a row's
    last cell, the row is one cell shorter (padded)."""
    tok, texts = tiny_model.tokenizer, _joined_texts(corpus_texts)
    dataset = WindowedTextDataset(texts, tok, WIDTH, seed=4, prepend_bos=True, windows_per_document="run_together")
    sampler = TokenBudgetBatchSampler(dataset, range(len(texts)), 256, 64)
    batches = _rows(dataset, sampler.batches(epoch), pad_id_of(tok))
    assert all(b.joined and b.input_ids.shape[0] <= 256 // WIDTH for b in batches)
    ours = [row[mask.bool()].tolist() for b in batches for row, mask in zip(b.input_ids, b.attention_mask, strict=True)]
    order = np.random.default_rng((4, epoch)).permutation(len(texts))
    stream = iter([torch.tensor(_ids(tok, texts[d])) for d in order])
    reference = [c.tolist() for c in concat_and_batch_sequences(stream, WIDTH, tok.bos_token_id, None, tok.bos_token_id)]
    assert len(ours) == len(reference) + 1  # the last, short row is kept (SAELens keeps only whole contexts)
    dangling = 0
    for row, context in zip(ours, reference):  # noqa: B905 - the extra last row is checked below
        assert row == context[:len(row)]
        if len(row) < WIDTH:
            assert len(row) == WIDTH - 1 and context[-1] == tok.bos_token_id
            dangling += 1
    assert dangling < len(reference) // 4
    assert 0 < len(ours[-1]) <= WIDTH and ours[-1][0] == tok.bos_token_id


def test_every_token_of_every_document_once_an_epoch_with_its_document_and_position(tiny_model, corpus_texts):
    tok, texts = tiny_model.tokenizer, _joined_texts(corpus_texts)
    dataset = WindowedTextDataset(texts, tok, WIDTH, prepend_bos=True, windows_per_document="run_together")
    seen = []
    for batch in _rows(dataset, TokenBudgetBatchSampler(dataset, range(len(texts)), 256, 64).batches(1), pad_id_of(tok)):
        cells = batch.attention_mask.bool()
        positions, docs, ids = batch.token_positions()[cells], batch.cell_doc_index()[cells], batch.input_ids[cells]
        for d, p, t in zip(docs.tolist(), positions.tolist(), ids.tolist(), strict=True):
            if p == -1:
                assert t == tok.bos_token_id
            else:
                seen.append((d, p, t))
    expected = [(d, p, t) for d, text in enumerate(texts) for p, t in enumerate(_ids(tok, text))]
    assert sorted(seen) == sorted(expected)  # each (document, position) exactly once, with its token


def test_joined_rows_attend_across_documents_like_a_plain_forward(tiny_model, corpus_texts):
    """The activations of a joined batch are those of a plain TransformerLens forward over the same rows
    (no mask between documents), which differ from each document's activations alone."""
    tok, texts = tiny_model.tokenizer, _joined_texts(corpus_texts)
    dataset = WindowedTextDataset(texts, tok, WIDTH, prepend_bos=True, windows_per_document="run_together")
    batch = _rows(dataset, TokenBudgetBatchSampler(dataset, range(len(texts)), 256, 64).batches(0)[:1], pad_id_of(tok))[0]
    acts = batch_activations(tiny_model, batch, HOOKS, TokenPolicy())
    _, cache = tiny_model.run_with_cache(batch.input_ids, names_filter=lambda n: n in HOOKS)
    keep = TokenPolicy().keep_mask(batch.input_ids, batch.attention_mask, tok)
    for hook in HOOKS:
        torch.testing.assert_close(acts.acts[hook], cache[hook][keep], rtol=1e-5, atol=1e-5)
    # a document that does not start its row: alone (after its own BOS) its activations differ
    starts = batch.cell_offsets() == 0
    row, col = next((r, c) for r, c in starts.nonzero().tolist() if c > 0)
    piece = int(batch.segment[row, col])
    length = int((batch.segment[row] == piece).sum())
    alone = tiny_model.run_with_cache(batch.input_ids[row:row + 1, col:col + length],
                                      names_filter=lambda n: n == HOOKS[0])[1][HOOKS[0]][0]
    joined = cache[HOOKS[0]][row, col:col + length]
    assert not torch.allclose(alone[1:], joined[1:], atol=1e-3)


def test_training_source_streams_the_joined_rows_and_refuses_mixed_batches(tiny_model, corpus_texts, monkeypatch):
    from test_packing import epoch_rows

    tok, texts = tiny_model.tokenizer, _joined_texts(corpus_texts)
    dataset = WindowedTextDataset(texts, tok, WIDTH, prepend_bos=True, windows_per_document="run_together")
    source = ModelActivationSource(tiny_model, dataset, HOOKS, TokenPolicy(), "float32", batch_tokens=256)
    (keys, _), _ = epoch_rows(source, monkeypatch)
    expected = sorted((d, p) for d, t in enumerate(texts) for p in range(len(_ids(tok, t))))
    assert [tuple(k) for k in keys.tolist()] == expected  # every token once, BOS rows dropped
    one = WindowedTextDataset(texts, tok, WIDTH, prepend_bos=True)
    piece = TokenBudgetBatchSampler(dataset, range(len(texts)), 256, 64).batches(0)[0][0]
    with pytest.raises(ValueError, match="run together"):
        pad_collate([dataset[piece], one[0]], pad_id_of(tok))


@pytest.mark.slow  # torch.compile from a cold cache
def test_compiled_joined_rows_equal_the_eager_ones(tiny_model, corpus_texts):
    from sae_core.activations import compiled_forward

    tok, texts = tiny_model.tokenizer, _joined_texts(corpus_texts)
    dataset = WindowedTextDataset(texts, tok, WIDTH, prepend_bos=True, windows_per_document="run_together")
    for batch in _rows(dataset, TokenBudgetBatchSampler(dataset, range(len(texts)), 256, 64).batches(0)[:2], pad_id_of(tok)):
        eager = batch_activations(tiny_model, batch, HOOKS, TokenPolicy())
        compiled = batch_activations(tiny_model, batch, HOOKS, TokenPolicy(), compile=True)
        for hook in HOOKS:
            torch.testing.assert_close(compiled.acts[hook], eager.acts[hook], rtol=1e-4, atol=1e-4)
    assert compiled_forward(tiny_model).compiled_calls > 0 and compiled_forward(tiny_model).disabled is None


@pytest.mark.slow  # SmolLM2 forwards
def test_smollm2_rows_run_together_are_saelens_activations_store_rows(smollm2, corpus_texts):
    """On SmolLM2, the first batch our training stream forwards over documents run together holds the
    contexts SAELens's own ``ActivationsStore`` makes from the same documents (its dataset shuffled with
    the seed, as its runner is given them; ours in epoch 0's order, the same permutation) and the
    activations its forward gives them."""
    import datasets
    from sae_lens import LanguageModelSAERunnerConfig, LoggingConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAEConfig
    from sae_lens.training.activations_store import ActivationsStore

    hook, context, rows, texts = "blocks.10.hook_resid_post", 128, 8, list(corpus_texts[:150])
    dataset = WindowedTextDataset(texts, smollm2.tokenizer, context, seed=3, prepend_bos=True,
                                  windows_per_document="run_together")
    source = ModelActivationSource(smollm2, dataset, [hook], TokenPolicy(), "float32", batch_tokens=rows * context)
    batch = next(iter(source.loader()))
    assert batch.joined and batch.input_ids.shape[0] == rows
    runner_cfg = LanguageModelSAERunnerConfig(
        sae=TopKTrainingSAEConfig(d_in=576, d_sae=1024, k=8), model_name="smollm2", hook_name=hook,
        dataset_path="unused", is_dataset_tokenized=False, streaming=False, context_size=context, prepend_bos=True,
        store_batch_size_prompts=rows, n_batches_in_buffer=2, training_tokens=rows * context, device="cpu",
        dtype="float32", logger=LoggingConfig(log_to_wandb=False), verbose=False)
    store = ActivationsStore.from_config(smollm2, runner_cfg,
                                         override_dataset=datasets.Dataset.from_dict({"text": texts}).shuffle(seed=3))
    contexts = torch.cat([store.get_batch_tokens(1) for _ in range(rows)])
    real = batch.attention_mask.bool()
    assert torch.equal(batch.input_ids[real], contexts[:, :batch.input_ids.shape[1]][real])
    theirs = store.get_activations(contexts).reshape(rows, context, -1)[:, :batch.input_ids.shape[1]]
    ours = batch_activations(smollm2, batch, [hook], KEEP_ALL_BUT_PAD)
    torch.testing.assert_close(ours.acts[hook], theirs[real], rtol=1e-4, atol=1e-4)


def test_joined_batches_are_the_same_from_a_worker_process(tiny_model, corpus_texts):
    from sae_core.config import LoaderConfig

    dataset = WindowedTextDataset(_joined_texts(corpus_texts), tiny_model.tokenizer, WIDTH, prepend_bos=True,
                                  windows_per_document="run_together")
    batches = {}
    for workers in (0, 1):
        source = ModelActivationSource(tiny_model, dataset, HOOKS, TokenPolicy(), "float32", batch_tokens=256,
                                       loader=LoaderConfig(num_dataloader_workers=workers))
        batches[workers] = list(source.loader())
    assert len(batches[0]) == len(batches[1]) > 10
    for a, b in zip(batches[0], batches[1], strict=True):
        assert a.joined and b.joined
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.segment, b.segment)
        assert torch.equal(a.doc_index, b.doc_index) and torch.equal(a.window_start, b.window_start)
