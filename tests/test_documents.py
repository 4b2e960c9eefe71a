"""The design documents' entry points (sae_core.documents) against the modules they wrap and
against independent references: TransformerLens's run_with_cache, a forward hook on the HookPoint,
the store written by save() directly, random.Random, the whitening files read with safetensors / torch."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sae_core.documents import (
    ActivationCache,
    ActivationCollector,
    HuggingFaceDataset,
    ModelWithHooks,
    TextDataset,
    list_layers,
    whitening_parameters,
)
from sae_core.store import ActivationRun, save
from sae_core.whitening import IncrementalWhitener
from sae_core.whitening.statistics import WHITENER_KEYS

SMALL = dict(max_text_length=24, shard_size=64)


@pytest.fixture(scope="module")
def texts(corpus_texts):
    return list(corpus_texts[:24])


@pytest.fixture(scope="module")
def tokens(tiny_model, texts):
    return tiny_model.to_tokens(texts[:3], prepend_bos=True)[:, :12]  # (3, 12), no pads


def _cache(model, tokens, names):
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    return cache


def test_list_layers_filters_by_pattern_as_the_document_does(tiny_model):
    everything = list_layers(tiny_model)
    assert everything == list(tiny_model.hook_dict)
    assert list_layers(tiny_model, "attn") == [name for name in everything if "attn" in name]
    assert list_layers(tiny_model, "*resid_post") == [f"blocks.{i}.hook_resid_post" for i in range(2)]
    assert ModelWithHooks(tiny_model).list_layers("mlp") == [name for name in everything if "mlp" in name]


def test_model_with_hooks_layers_are_hook_points(tiny_model, tokens):
    wrapper = ModelWithHooks(tiny_model)
    assert wrapper.num_layers() == 2 and wrapper.tokenizer is tiny_model.tokenizer
    assert wrapper.get_layer(-1) is tiny_model.hook_dict["blocks.1.hook_resid_post"]
    seen = {}
    handle = wrapper.get_layer(0).register_forward_hook(lambda module, inputs, output: seen.update(out=output))
    try:  # the document's register_forward_hook on the layer works on the HookPoint
        with torch.no_grad():
            tiny_model(tokens)
    finally:
        handle.remove()
    torch.testing.assert_close(seen["out"], _cache(tiny_model, tokens, {"blocks.0.hook_resid_post"})[
        "blocks.0.hook_resid_post"], rtol=0, atol=0)
    with pytest.raises(IndexError, match="out of range"):
        wrapper.get_layer(2)
    with pytest.raises(KeyError, match="closest valid names"):
        wrapper.get_layer("blocks.0.hook_resid_pots")


def test_collector_positions_equal_run_with_cache(tiny_model, tokens):
    names = {"blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "blocks.0.hook_attn_out"}
    cache = _cache(tiny_model, tokens, names)
    collector = ActivationCollector(tiny_model)
    every = collector.collect(tokens, [0, -1, "blocks.0.hook_attn_out"])
    assert list(every) == [0, -1, "blocks.0.hook_attn_out"]
    for layer, name in ((0, "blocks.0.hook_resid_post"), (-1, "blocks.1.hook_resid_post"),
                        ("blocks.0.hook_attn_out", "blocks.0.hook_attn_out")):
        torch.testing.assert_close(every[layer], cache[name], rtol=1e-5, atol=1e-5)
    last = collector.collect(tokens, [1], positions="last")
    torch.testing.assert_close(last[1], cache["blocks.1.hook_resid_post"][:, -1], rtol=1e-5, atol=1e-5)
    listed = collector.collect(tokens, [1], positions=[5, 0, -1])
    torch.testing.assert_close(listed[1], cache["blocks.1.hook_resid_post"][:, [0, 5, 11]], rtol=1e-5, atol=1e-5)
    assert collector.activations is listed and list(listed) == [1] and list(every) == [0, -1, "blocks.0.hook_attn_out"]
    assert not any(h.fwd_hooks for h in tiny_model.hook_dict.values())


def test_collector_last_with_an_attention_mask_is_the_last_real_token(tiny_model, tokens):
    lengths = [12, 7, 3]
    mask = (torch.arange(12)[None, :] < torch.tensor(lengths)[:, None]).long()
    padded = tokens.masked_fill(mask == 0, 0)
    cache = _cache(tiny_model, padded, {"blocks.1.hook_resid_post"})["blocks.1.hook_resid_post"]
    last = ActivationCollector(ModelWithHooks(tiny_model)).collect(padded, [1], "last", attention_mask=mask)[1]
    torch.testing.assert_close(last, cache[torch.arange(3), torch.tensor(lengths) - 1], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="tokens per row"):
        ActivationCollector(tiny_model).collect(padded, [1], [5], attention_mask=mask)


def test_activation_cache_is_one_store_run(tiny_model, texts, tmp_path):
    cache = ActivationCache(tmp_path / "cache")
    run_id = cache.process_dataset(ModelWithHooks(tiny_model), texts, [0, -1], batch_size=4, run_id="doc", **SMALL)
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    direct = ActivationRun.open(tmp_path / "direct",
                                save(tiny_model, hooks, texts, tmp_path / "direct", run_id="doc", batch_size=4,
                                     progress=False, **SMALL))
    ours = cache.run()
    assert run_id == "doc" and ours.hooks == hooks and ours.path == tmp_path / "cache" / "activations" / "doc"
    for key in ("sample_count", "batch_count", "row_count", "token_count"):
        assert ours.meta[key] == direct.meta[key], key
    assert len(ours.shards) == len(direct.shards) > 1
    for layer, hook in ((0, hooks[0]), (-1, hooks[1]), (hooks[1], hooks[1])):
        torch.testing.assert_close(cache.activations(layer)[:], direct.activations(hook)[:], rtol=0, atol=0)
    torch.testing.assert_close(ours.token_ids(), direct.token_ids(), rtol=0, atol=0)
    with pytest.raises(KeyError, match="pass the hook name"):
        cache.activations(5)


def test_text_dataset_random_sample_and_meta_counts(tiny_model, texts, tmp_path):
    dataset = TextDataset(texts)
    assert isinstance(dataset, list) and list(dataset) == texts
    sample = dataset.random_sample(10, seed=42)
    expected = [texts[i] for i in sorted(random.Random(42).sample(range(len(texts)), 10))]
    assert isinstance(sample, TextDataset) and list(sample) == expected
    assert list(dataset.random_sample(10, seed=42)) == expected and list(dataset.random_sample(10, seed=1)) != expected
    assert list(dataset.random_sample(100, seed=0)) == texts
    with pytest.raises(TypeError, match="not a str"):
        TextDataset(["a text", 3])
    run = ActivationRun.open(tmp_path, save(tiny_model, 1, sample, tmp_path, sample_limit=8, batch_size=3,
                                            progress=False, **SMALL))
    assert run.meta["sample_count"] == 8 and run.meta["batch_count"] == math.ceil(8 / 3)  # 000's verification


def test_text_dataset_from_a_local_huggingface_folder(tmp_path):
    import pandas as pd

    folder = tmp_path / "hf_dataset"
    folder.mkdir()
    rows = [f"document number {i}" for i in range(7)]
    pd.DataFrame({"body": rows, "id": range(7)}).to_parquet(folder / "train.parquet")
    assert list(TextDataset.from_huggingface(str(folder), split="train", text_field="body")) == rows
    assert list(HuggingFaceDataset(name=str(folder), split="train", text_field="body", sample_limit=3)) == rows[:3]
    with pytest.raises(KeyError, match="not a column"):
        HuggingFaceDataset(str(folder), text_field="text")


def test_whitening_parameters_under_the_document_names(tmp_path):
    stats = IncrementalWhitener(6)
    stats.update(torch.from_numpy(np.random.default_rng(0).normal(size=(200, 6))) @ torch.randn(6, 6, dtype=torch.float64))
    whitener = stats.to_whitener("zca", 1e-4)
    whitener.save(tmp_path)
    pt = whitener.save_torch(tmp_path / "whitening.pt")
    stored, record = load_file(str(tmp_path / "whitening.safetensors")), torch.load(pt, weights_only=True)
    for source in (tmp_path, pt):
        params = whitening_parameters(source)
        assert list(params) == list(WHITENER_KEYS) and params["n_samples"] == 200 == record["n_samples"]
        for key in ("mean", "transform", "reverse_transform"):
            torch.testing.assert_close(params[key], stored[key].double(), rtol=0, atol=0)
            torch.testing.assert_close(params[key], record[key].double(), rtol=0, atol=0)
