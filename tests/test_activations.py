"""Activation collection at hook points (sae_core.activations) against TransformerLens's own cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sae_core.activations import (
    ActivationCapture,
    batch_activations,
    forward_context,
    iter_activation_batches,
    run_to_hooks,
    select_positions,
)
from sae_core.config import KEEP_ALL_BUT_PAD, LoaderConfig, TokenPolicy
from sae_core.data import WindowedTextDataset, pad_collate, pad_id_of
from sae_core.loader import make_dataloader

HOOKS = ["blocks.0.hook_resid_post", "blocks.0.attn.hook_z", "blocks.1.hook_resid_post"]
TEXTS = ["The cat sat on the mat and looked at the dog.", "Hi", "Sparse features are monosemantic, sometimes.",
         "One two three four five six seven eight nine ten eleven twelve"]


def _batch(model, texts=TEXTS, max_len=32, prepend_bos=True):
    dataset = WindowedTextDataset(texts, model.tokenizer, max_len, prepend_bos=prepend_bos)
    return pad_collate([dataset[i] for i in range(len(texts))], pad_id_of(model.tokenizer))


def _reference(model, input_ids, hooks):
    """Each document run alone (no padding) through run_with_cache: the independent reference."""
    out = {h: [] for h in hooks}
    with torch.no_grad():
        for row in input_ids:
            _, cache = model.run_with_cache(row[None], names_filter=lambda n: n in hooks)
            for h in hooks:
                out[h].append(cache[h][0])
    return out


def test_run_to_hooks_equals_run_with_cache(tiny_model):
    ids = torch.randint(0, 1000, (3, 12))
    got = run_to_hooks(tiny_model, HOOKS, ids)
    with torch.no_grad():
        _, cache = tiny_model.run_with_cache(ids, names_filter=lambda n: n in HOOKS)
    for h in HOOKS:
        torch.testing.assert_close(got[h], cache[h], rtol=0, atol=1e-6)
    assert not tiny_model.hook_dict["blocks.1.hook_resid_post"].fwd_hooks  # hooks removed


def test_batch_activations_keeps_exactly_the_policy_rows(tiny_model):
    tok = tiny_model.tokenizer
    batch = _batch(tiny_model)
    lengths = batch.attention_mask.sum(1).tolist()
    reference = _reference(tiny_model, [batch.input_ids[r, :n] for r, n in enumerate(lengths)],
                           ["blocks.1.hook_resid_post"])["blocks.1.hook_resid_post"]
    special = set(tok.all_special_ids) | {tok.bos_token_id, tok.eos_token_id}
    for policy in (TokenPolicy(), KEEP_ALL_BUT_PAD):
        got = batch_activations(tiny_model, batch, ["blocks.1.hook_resid_post"], policy)
        rows, ids, docs, pos = [], [], [], []
        for r, n in enumerate(lengths):
            for p in range(n):
                token = int(batch.input_ids[r, p])
                if policy.exclude_bos and token in special:
                    continue
                rows.append(reference[r][p])
                ids.append(token)
                docs.append(int(batch.doc_index[r]))
                pos.append(-1 if p == 0 else int(batch.window_start[r]) + p - 1)  # BOS prepended: -1
        torch.testing.assert_close(got.acts["blocks.1.hook_resid_post"], torch.stack(rows), rtol=1e-5, atol=1e-5)
        assert got.token_ids.tolist() == ids and got.doc_index.tolist() == docs and got.position.tolist() == pos
        assert got.n_tokens_seen == sum(lengths)
    assert tok.bos_token_id not in batch_activations(tiny_model, batch, HOOKS[:1]).token_ids.tolist()
    assert batch.input_ids[0, 0] == tok.bos_token_id


def test_token_policy_ids_and_record(tiny_model):
    tok = tiny_model.tokenizer
    policy = TokenPolicy(exclude_eos=False, exclude_special=False, exclude_token_ids=(7,))
    assert policy.excluded_ids(tok) == sorted({tok.bos_token_id, 7})
    record = policy.to_json(tok)
    assert record["exclude_pad"] is True and record["excluded_ids"] == policy.excluded_ids(tok)
    assert KEEP_ALL_BUT_PAD.excluded_ids(tok) == []


def test_select_positions_against_numpy():
    keep = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(select_positions(keep, "all"), keep)
    last = np.zeros((3, 4), dtype=bool)
    for r, row in enumerate(keep.numpy()):
        if row.any():
            last[r, np.nonzero(row)[0][-1]] = True
    assert np.array_equal(select_positions(keep, "last").numpy(), last)
    listed = np.zeros((3, 4), dtype=bool)
    listed[:, [0, 3]] = True
    assert np.array_equal(select_positions(keep, [0, -1, 99]).numpy(), listed & keep.numpy())
    with pytest.raises(ValueError, match="positions"):
        select_positions(keep, "first")


def test_bfloat16_forward_is_close_to_float32(tiny_model):
    batch = _batch(tiny_model)
    full = batch_activations(tiny_model, batch, HOOKS[-1:], forward_dtype="float32").acts[HOOKS[-1]]
    low = batch_activations(tiny_model, batch, HOOKS[-1:], forward_dtype="bfloat16").acts[HOOKS[-1]]
    assert low.shape == full.shape and not torch.equal(low.float(), full)
    rel = (low.float() - full).norm() / full.norm()
    assert rel < 0.05
    assert isinstance(forward_context("cpu", "float32"), type(forward_context("cpu", torch.float32)))


def test_non_finite_activations_stop_naming_hook_and_batch(tiny_model):
    batch = _batch(tiny_model)

    def poison(tensor, hook):
        return tensor * float("nan")

    with tiny_model.hooks(fwd_hooks=[("blocks.0.hook_resid_mid", poison)]):
        with pytest.raises(FloatingPointError, match=r"blocks\.1\.hook_resid_post in batch 7"):
            batch_activations(tiny_model, batch, HOOKS[-1:], batch_number=7)
    assert not tiny_model.hook_dict["blocks.0.hook_resid_mid"].fwd_hooks


def test_unknown_hook_lists_the_closest_names(tiny_model):
    with pytest.raises(KeyError, match="blocks.1.hook_resid_post"):
        run_to_hooks(tiny_model, ["blocks.1.hook_resid_pots"], torch.zeros((1, 3), dtype=torch.long))


def test_iter_activation_batches_covers_every_kept_token(tiny_model):
    texts = TEXTS * 3
    dataset = WindowedTextDataset(texts, tiny_model.tokenizer, 16)
    loader = make_dataloader(dataset, LoaderConfig(batch_size=4))
    batches = list(iter_activation_batches(tiny_model, loader, HOOKS[:1], KEEP_ALL_BUT_PAD))
    pairs = sorted((d, p) for b in batches for d, p in zip(b.doc_index.tolist(), b.position.tolist(), strict=True))
    expected = sorted((i, p) for i in range(len(texts)) for p in range(len(dataset[i].input_ids)))
    assert pairs == expected
    skipped = list(iter_activation_batches(tiny_model, loader, HOOKS[:1], KEEP_ALL_BUT_PAD, start_batch=1))
    assert len(skipped) == len(batches) - 1
    assert torch.equal(skipped[0].token_ids, batches[1].token_ids)


def test_activation_capture_in_a_manual_loop(tiny_model):
    hook = "blocks.1.hook_resid_post"
    batch = _batch(tiny_model, prepend_bos=False)
    lengths = batch.attention_mask.sum(1).tolist()
    reference = _reference(tiny_model, [batch.input_ids[r, :n] for r, n in enumerate(lengths)], [hook])[hook]
    with ActivationCapture(hook).register(tiny_model) as capture:
        capture.set_batch(batch.input_ids, batch.attention_mask)
        with torch.no_grad():
            tiny_model(batch.input_ids, return_type=None)
            tiny_model(batch.input_ids, return_type=None)
        got = capture.get_captured()
        expected = torch.cat([reference[r][:n] for r, n in enumerate(lengths)])
        torch.testing.assert_close(got, torch.cat([expected, expected]), rtol=1e-5, atol=1e-5)
        capture.clear_captured()
        assert capture.get_captured().numel() == 0
        with torch.no_grad(), pytest.raises(ValueError, match="set_batch"):
            tiny_model(batch.input_ids[:1, :3], return_type=None)  # a stale mask is never applied
    assert not tiny_model.hook_dict[hook].fwd_hooks
    with pytest.raises(KeyError, match="closest"):
        ActivationCapture("blocks.1.hook_resid_postt").register(tiny_model)
