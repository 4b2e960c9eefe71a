"""A finished stage is reused only with the settings that made it (``sae_core.reuse``)."""

from __future__ import annotations

import json
import logging

import pytest
from _tiny_pipeline import run_with, texts

from sae_core import pipeline
from sae_core.reuse import RUN_CONFIG_FILENAME, StaleOutputError


@pytest.fixture(scope="module")
def trained(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("reuse")
    run = run_with()
    pipeline.train_saes(tiny_model, texts(), run, out)
    return out, run


def test_a_trained_sae_is_reused_with_its_settings_and_refused_with_others(tiny_model, trained):
    out, run = trained
    folder = out / "sae" / run.hook_points[0]
    made = (folder / "eval.json").stat().st_mtime_ns
    pipeline.train_saes(tiny_model, texts(), run, out)  # the same settings: reused
    pipeline.train_saes(tiny_model, texts(), run_with("training.log_every_steps=7", "forward.compile=True"), out)
    assert (folder / "eval.json").stat().st_mtime_ns == made  # how often it logs or whether it compiles: reused
    with pytest.raises(StaleOutputError) as error:
        pipeline.train_saes(tiny_model, texts(), run_with("optimizer.lr=0.002", "sae.k=2"), out)
    message = str(error.value)
    assert str(folder) in message and "optimizer.lr: 0.001 -> 0.002" in message and "sae.k: 4 -> 2" in message
    assert "Delete that folder" in message and "SAE_CORE_OUTPUTS" in message
    assert (folder / "eval.json").stat().st_mtime_ns == made  # nothing overwritten


def test_the_analysis_is_refused_for_other_windows_and_its_browser_rebuilt_for_other_knobs(tiny_model, trained):
    out, run = trained
    manager = pipeline.load_saes(tiny_model, run, out)
    hook = run.hook_points[0]
    first = pipeline.analyse(tiny_model, manager, texts(), run, out, hook)
    assert first.fresh
    meta, browser = first.paths["csr"] / "meta.json", first.paths["browser"]
    encoded, built = meta.stat().st_mtime_ns, browser.stat().st_mtime_ns
    again = pipeline.analyse(tiny_model, manager, texts(), run, out, hook)
    assert not again.fresh and browser.stat().st_mtime_ns == built  # all reused
    shown = pipeline.analyse(tiny_model, manager, texts(), run_with("analysis.top_k_examples=2"), out, hook)
    assert meta.stat().st_mtime_ns == encoded and browser.stat().st_mtime_ns != built  # CSR kept, browser rebuilt
    assert all(len(examples) <= 2 for examples in shown.examples.values())
    with pytest.raises(StaleOutputError, match="analysis.n_windows: 12 -> 20"):
        pipeline.analyse(tiny_model, manager, texts(), run_with("analysis.n_windows=20"), out, hook)
    with pytest.raises(StaleOutputError, match="sae.k: 4 -> 2"):  # the SAE it encoded with is not this run's
        pipeline.analyse(tiny_model, manager, texts(), run_with("sae.k=2"), out, hook)
    meta.unlink()  # an encode interrupted before its meta.json: unfinished, so redone with the new settings
    redone = pipeline.analyse(tiny_model, manager, texts(), run_with("analysis.n_windows=20"), out, hook)
    assert redone.fresh and meta.exists() and browser.stat().st_mtime_ns != built
    record = json.loads((first.folder / pipeline.DOCUMENTS_FILENAME).read_text())
    written = json.loads((first.folder / RUN_CONFIG_FILENAME).read_text())
    assert written["analysis"]["n_windows"] == 20 and record["windows"] == min(20, record["windows_available"])


def test_whitening_is_refused_for_other_settings_and_a_folder_without_record_is_reused_with_a_warning(
        tiny_model, tmp_path, caplog):
    run = run_with()
    stored = pipeline.collect_activations(tiny_model, run, texts(), tmp_path)
    pipeline.fit_whitening(stored, run, tmp_path)
    with pytest.raises(StaleOutputError, match="whitening.eps: 0.0001 -> 0.01"):
        pipeline.fit_whitening(stored, run_with("whitening.eps=0.01"), tmp_path)
    (tmp_path / "whitening" / run.hook_points[0] / RUN_CONFIG_FILENAME).unlink()
    with caplog.at_level(logging.WARNING, logger="sae_core.reuse"):
        pipeline.fit_whitening(stored, run_with("whitening.eps=0.01"), tmp_path)
    assert "settings that made it are unknown" in caplog.text
