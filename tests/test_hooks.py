"""Hook points: listing with shapes, layer mapping, errors naming the closest valid names."""

from __future__ import annotations

import pytest
import torch

from sae_core.hooks import (
    layer_hooks,
    list_hook_points,
    resolve_hook,
    stop_layer_for,
    validate_hook,
)


def test_list_hook_points_shapes_match_cache(tiny_model):
    infos = list_hook_points(tiny_model, seq_len=5)
    assert [i.name for i in infos] == list(tiny_model.hook_dict)
    _, cache = tiny_model.run_with_cache(torch.zeros((1, 5), dtype=torch.long))
    for info in infos:
        if info.name in cache:
            assert info.shape == tuple(cache[info.name].shape), info.name


def test_pattern_filters(tiny_model):
    names = [i.name for i in list_hook_points(tiny_model, "*hook_resid_post", seq_len=None)]
    assert names == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    regex = [i.name for i in list_hook_points(tiny_model, r"^blocks\.1\.hook_(mlp|attn)_out$", seq_len=None)]
    assert regex == ["blocks.1.hook_attn_out", "blocks.1.hook_mlp_out"]


def test_layer_mapping_negative_counts_from_end(tiny_model):
    assert layer_hooks(tiny_model, -1)["resid_post"] == "blocks.1.hook_resid_post"
    assert layer_hooks(tiny_model, 0)["mlp_out"] == "blocks.0.hook_mlp_out"
    assert resolve_hook(tiny_model, -2, "attn_out") == "blocks.0.hook_attn_out"


def test_out_of_range_layer(tiny_model):
    with pytest.raises(IndexError, match="0..1"):
        layer_hooks(tiny_model, 2)


def test_unknown_hook_lists_closest(tiny_model):
    with pytest.raises(KeyError, match="blocks.1.hook_resid_post"):
        validate_hook(tiny_model, "blocks.1.hook_resid_pots")


def test_stop_layer_runs_every_hook(tiny_model):
    assert stop_layer_for(["blocks.0.hook_resid_post"], 2) == 1
    assert stop_layer_for(["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"], 2) is None
    assert stop_layer_for(["ln_final.hook_normalized"], 2) is None
    assert stop_layer_for(["hook_embed"], 2) == 0
