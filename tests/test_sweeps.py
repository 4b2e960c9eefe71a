"""Sweeps: several SAEs per hook point trained from one forward pass (``TrainingConfig.sweep``).

The independent reference for a sweep unit is the same unit trained alone (its own run, its own
forward passes) with the same seed and data order: the sweep shares the forward, nothing else, so
every unit must end with bit-identical weights and the same training curve. Resume is checked
against an uninterrupted sweep, as for a single SAE (``test_training.test_resume_equals_uninterrupted``).
"""

from __future__ import annotations

import pytest
import torch
from sae_lens import SAE

from sae_core.config import ConfigError, TrainingConfig, build_flat
from sae_core.data import WindowedTextDataset
from sae_core.training import hook_widths, model_source, split_documents, train_saes
from sae_core.training import state as training_state

HOOK = "blocks.1.hook_resid_post"
SWEEP = ({"k": 2}, {"d_sae": 96, "lr": 3e-3},
         {"architecture": "matryoshka_batchtopk", "k": 4, "matryoshka_widths": (16, 32), "name": "matryoshka"})
NAMES = [f"{HOOK}/k2", f"{HOOK}/d_sae96_lr0.003", f"{HOOK}/matryoshka"]


def _cfg(**overrides) -> TrainingConfig:
    base = dict(hook_points=(HOOK,), d_sae=64, k=4, lr=1e-3, total_training_tokens=128 * 10, lr_decay_fraction=0.3,
                train_batch_size_tokens=128, shuffle_buffer_tokens=256, max_text_length=32, batch_tokens=256,
                held_out_documents=8, dtype="float32", checkpoint_every_tokens=256, log_every_steps=1,
                dead_window_tokens=256, sweep=SWEEP)
    return build_flat(TrainingConfig, "training", **{**base, **overrides})


def _source(model, texts, cfg):
    train_docs, _ = split_documents(len(texts), cfg.evaluation.held_out_documents, cfg.seed)
    dataset = WindowedTextDataset(texts, model.tokenizer, cfg.windows.max_text_length, cfg.seed, cfg.windows.prepend_bos)
    return model_source(model, dataset, cfg, train_docs)


def _weights(folder) -> dict[str, torch.Tensor]:
    return SAE.load_from_disk(str(folder)).state_dict()


def _assert_same_weights(a, b) -> None:
    a, b = _weights(a), _weights(b)
    assert sorted(a) == sorted(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def _counted(source, counter: list[int]):
    """``source`` with every chunk it streams (one model forward each) counted into ``counter``."""
    original = source.chunks

    def chunks(*args, **kwargs):
        for chunk in original(*args, **kwargs):
            counter.append(1)
            yield chunk

    source.chunks = chunks
    return source


def test_each_sweep_unit_equals_training_it_alone(tiny_model, corpus_texts, tmp_path):
    texts, cfg = corpus_texts[:64], _cfg(checkpoint_every_tokens=None)
    sweep_forwards: list[int] = []
    run = train_saes(cfg, _counted(_source(tiny_model, texts, cfg), sweep_forwards), hook_widths(tiny_model, [HOOK]),
                     tmp_path / "sweep")
    assert list(run.saes) == NAMES
    assert [run.saes[n].sae.cfg.d_sae for n in NAMES] == [64, 96, 64]
    _check_matryoshka_folder(tmp_path / "sweep" / NAMES[2])
    for index, unit in enumerate(cfg.units()):
        assert unit.name == NAMES[index] and not unit.config.sweep
        forwards: list[int] = []
        alone = train_saes(unit.config, _counted(_source(tiny_model, texts, unit.config), forwards),
                           hook_widths(tiny_model, [HOOK]), tmp_path / f"alone{index}")
        assert len(forwards) == len(sweep_forwards) > 0  # the sweep of three ran the forwards of one
        _assert_same_weights(tmp_path / "sweep" / unit.name, tmp_path / f"alone{index}" / HOOK)
        assert run.saes[unit.name].curve == alone.saes[HOOK].curve


def test_sweep_resume_equals_uninterrupted(tiny_model, corpus_texts, tmp_path, monkeypatch):
    texts, cfg = corpus_texts[:64], _cfg()
    widths = hook_widths(tiny_model, [HOOK])
    straight = train_saes(cfg, _source(tiny_model, texts, cfg), widths, tmp_path / "a")
    calls = {"n": 0}
    original = training_state.SAEState.step

    def interrupted(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3 * 7 + 2:  # step 8, second unit: after the checkpoint at step 6, mid-block
            raise KeyboardInterrupt("simulated interruption")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(training_state.SAEState, "step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_saes(cfg, _source(tiny_model, texts, cfg), widths, tmp_path / "b")
    assert not any((tmp_path / "b" / name).exists() for name in NAMES)
    calls["n"] = -1000
    resumed = train_saes(cfg, _source(tiny_model, texts, cfg), widths, tmp_path / "b")
    assert calls["n"] == -1000 + 3 * (10 - 6)  # every unit ran only the steps after the checkpoint
    for name in NAMES:
        _assert_same_weights(tmp_path / "a" / name, tmp_path / "b" / name)
        assert straight.saes[name].curve == resumed.saes[name].curve


def _check_matryoshka_folder(folder) -> None:
    """SAELens saves Matryoshka BatchTopK as JumpReLU (levels recorded); SAEManager encodes it as the
    JumpReLU formula on the saved weights does (numpy): relu(pre) where pre > threshold."""
    import json

    import numpy as np
    from safetensors.numpy import load_file

    from sae_core.saes import SAEManager

    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu" and cfg["apply_b_dec_to_input"]
    assert cfg["metadata"]["training_architecture_details"]["matryoshka_widths"] == [16, 32, 64]
    weights = load_file(str(folder / "sae_weights.safetensors"))
    x = np.random.default_rng(0).normal(size=(16, 32)).astype(np.float32) * 3
    pre = (x - weights["b_dec"]) @ weights["W_enc"] + weights["b_enc"]
    expected = np.where(pre > weights["threshold"], np.maximum(pre, 0), 0)
    manager = SAEManager()
    manager.load_from_disk(folder)
    with torch.no_grad():
        encoded = manager.encode(HOOK, torch.from_numpy(x)).numpy()
    assert (expected > 0).any()
    np.testing.assert_allclose(encoded, expected, rtol=1e-5, atol=1e-5)


def test_resume_refuses_another_sweep(tiny_model, corpus_texts, tmp_path, monkeypatch):
    texts, cfg = corpus_texts[:64], _cfg()
    calls = {"n": 0}
    original = training_state.SAEState.step

    def interrupted(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3 * 7:
            raise KeyboardInterrupt("simulated interruption")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(training_state.SAEState, "step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_saes(cfg, _source(tiny_model, texts, cfg), hook_widths(tiny_model, [HOOK]), tmp_path)
    other = _cfg(sweep=SWEEP[:2])
    with pytest.raises(ValueError, match="sweep"):
        train_saes(other, _source(tiny_model, texts, other), hook_widths(tiny_model, [HOOK]), tmp_path)


@pytest.mark.parametrize(("entry", "message"), [
    ({"kk": 8}, r"TRAINING.sweep\[0\]: unknown key 'kk'.*closest valid keys: k"),
    ({"lrr": 1e-3}, r"unknown key 'lrr'.*closest valid keys: lr"),
    ({"total_training_tokens": 512}, r"unknown key 'total_training_tokens'"),  # shared by the sweep: not per unit
    ({"k": "eight"}, r"TRAINING.sweep\[0\].k should be int"),
    ({"k": 128}, r"TRAINING.sweep\[0\].*k \(128\) must not exceed d_sae \(64\)"),
    ({"architecture": "matryoshka"}, r"TRAINING.sweep\[0\].architecture should be"),
    ({"name": "a/b"}, r"name 'a/b' should be a non-empty folder name"),
    ({"name": ".."}, r"name '..' should be a non-empty folder name"),
])
def test_bad_sweep_entries_are_refused_at_load(entry, message):
    from sae_core.models import load_run_config

    with pytest.raises(ConfigError, match=message):
        load_run_config("tiny_random", [f"training.sweep=[{entry!r}]"])


def test_duplicate_sweep_names_are_refused():
    with pytest.raises(ConfigError, match="the name 'k8' is used by 2 sweep entries"):
        _cfg(sweep=({"k": 8}, {"k": 8}))


def test_a_constant_file_sweep_reaches_the_pipeline(tiny_model, tmp_path, monkeypatch):
    """A sweep declared in a constant file: every unit trained, saved, evaluated, reported and loadable."""
    import types

    from sae_core import pipeline
    from sae_core.config import RunConfig
    from sae_core.models import load_model_constants

    base = load_model_constants("tiny_random")
    module = types.ModuleType("tiny_sweep")
    module.__dict__.update({k: getattr(base, k) for k in dir(base) if k.isupper()})
    module.TRAINING = {**base.TRAINING, "total_training_tokens": 512, "shuffle_buffer_tokens": 256,
                       "sweep": [{"k": 2}, {"k": 8, "name": "wide"}]}
    module.EVALUATION = {"held_out_documents": 4, "ce_windows": 4}
    run = RunConfig.from_constants(module)
    texts = [f"Document {i} talks about the weather, the sea and the hills." * 3 for i in range(24)]
    reports = pipeline.train_saes(tiny_model, texts, run, tmp_path)
    hook = run.hook_points[0]
    assert list(reports) == [f"{hook}/k2", f"{hook}/wide"]
    for name, report in reports.items():
        assert report.hook == hook and report.eval is not None and (report.folder / "eval.json").exists()
        assert (report.folder / pipeline.RUN_CONFIG_FILENAME).exists()
        manager = pipeline.load_saes(tiny_model, run, tmp_path, [name])
        assert manager[hook].sae.cfg.metadata.hook_name == hook
        torch.testing.assert_close(manager[hook].sae.W_dec, _weights(report.folder)["W_dec"])
    assert SAE.load_from_disk(str(tmp_path / "sae" / hook / "wide")).cfg.k == 8
    with pytest.raises(ValueError, match="one SAE per hook point"):
        pipeline.load_saes(tiny_model, run, tmp_path)
