"""``FORWARD["compile"]`` reaches every stage that runs the model's plain forward (held-out
reconstruction rows, the analysis encode, whitening from the model), each against the same stage
run eagerly: the same results up to float rounding, and the compiled forward really called."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest
import torch
from _tiny_pipeline import run_with as tiny_run
from _tiny_pipeline import texts

from sae_core import pipeline
from sae_core.activations import compiled_forward
from sae_core.config import ForwardConfig
from sae_core.latents import LatentCSR
from sae_core.training import HeldOutEvaluator
from sae_core.whitening.extraction import ActivationExtractor, ExtractionConfig


def run_with(*overrides: str):
    return tiny_run("loader.pack_windows=True", *overrides)


@pytest.fixture(scope="module")
def trained(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("compiled-stages")
    pipeline.train_saes(tiny_model, texts(), run_with(), out)
    return out


def _calls(model) -> int:
    compiled = compiled_forward(model)
    assert compiled.disabled is None, compiled.disabled
    return compiled.compiled_calls


def test_held_out_reconstruction_rows_follow_forward_compile(tiny_model, trained):
    run = run_with()
    hook = run.hook_points[0]
    sae = pipeline.load_saes(tiny_model, run, trained)[hook].sae
    held_out = list(range(30, 40))
    results = {}
    for compile in (False, True):
        cfg = run_with(f"forward.compile={compile}", "evaluation.ce_windows=3").training  # the rest: reconstruction
        before = _calls(tiny_model)
        results[compile] = HeldOutEvaluator(tiny_model, texts(), held_out, cfg)(hook, sae)
        assert (_calls(tiny_model) > before) == compile  # the CE forwards (under splicing hooks) stay eager
    eager, compiled = results[False], results[True]
    assert compiled.n_rows == eager.n_rows > 0 and compiled.n_batches == eager.n_batches > 1
    for field in ("explained_variance", "mse", "l0", "ce_recovered"):
        assert getattr(compiled, field) == pytest.approx(getattr(eager, field), rel=1e-4, abs=1e-6), field


def test_the_analysis_encode_follows_forward_compile(tiny_model, trained, tmp_path):
    hook = run_with().hook_points[0]
    csrs = {}
    for compile in (False, True):
        out = tmp_path / f"compile-{compile}"
        shutil.copytree(trained / "sae", out / "sae")
        run = run_with(f"forward.compile={compile}")
        before = _calls(tiny_model)
        analysis = pipeline.analyse(tiny_model, pipeline.load_saes(tiny_model, run, out), texts(), run, out, hook,
                                    browser=False)
        assert (_calls(tiny_model) > before) == compile
        csrs[compile] = LatentCSR.load(analysis.paths["csr"])
    eager, compiled = csrs[False], csrs[True]
    for name in ("token_ids", "doc_index", "position", "indptr", "indices"):
        assert np.array_equal(getattr(compiled, name), getattr(eager, name)), name
    np.testing.assert_allclose(compiled.data, eager.data, rtol=1e-4, atol=1e-5)


def test_whitening_from_the_model_follows_forward_compile(tiny_model, tmp_path):
    statistics = {}
    for compile in (False, True):
        config = ExtractionConfig.document(tiny_model, tmp_path / f"compile-{compile}", hook_point="blocks.1.hook_resid_post",
                                           batch_size=4, max_length=16, chunk_size=100, eps=1e-4, checkpoint_batches=2)
        config = dataclasses.replace(config, forward=ForwardConfig(compile=compile))
        before = _calls(tiny_model)
        statistics[compile] = ActivationExtractor(config, texts()).compute_whitening_statistics().statistics
        assert (_calls(tiny_model) > before) == compile
    eager, compiled = statistics[False], statistics[True]
    assert compiled.n == eager.n > 0
    torch.testing.assert_close(compiled.mean, eager.mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled.m2, eager.m2, rtol=1e-4, atol=1e-4)
