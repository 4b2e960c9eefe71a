"""One validated RunConfig per constant file: misspelt keys and wrong types fail at load naming the
fix, overrides are type-checked and reach every stage, each knob has one owner, and the device of
``MODEL_LOAD_CONFIG`` is what every stage is given."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest

from sae_core.config import (
    ConfigError,
    ConfigTypeError,
    RunConfig,
    StoreConfig,
    TrainingConfig,
    build_flat,
    with_overrides,
)
from sae_core.config.base import describe, field_types
from sae_core.config.run import SECTIONS
from sae_core.models import known_models, load_model_constants, load_run_config
from sae_core.precision import auto_dtype
from sae_core.whitening import ExtractionConfig

TINY = Path(load_model_constants("tiny_random").__file__).read_text()


def _file(tmp_path: Path, extra: str, name: str = "mine") -> str:
    path = tmp_path / f"{name}.py"
    path.write_text(TINY + "\n" + extra + "\n")
    return str(path)


def _scalar_field(cls: type) -> tuple[str, typing.Any]:
    """A field of ``cls`` that holds a plain value (not a nested config), and its annotation."""
    for name, kind in field_types(cls).items():
        if not dataclasses.is_dataclass(kind) and name not in ("hook_points", "extra", "texts", "paths"):
            return name, kind
    raise AssertionError(cls)


def _misspelt(key: str) -> str:
    return key[:-1] if len(key) > 3 else key + "x"


@pytest.mark.parametrize("section", list(SECTIONS))
def test_misspelt_key_names_section_key_and_closest(section, tmp_path):
    field_name, cls = SECTIONS[section]
    key, _ = _scalar_field(cls)
    bad = _misspelt(key)
    with pytest.raises(ConfigError) as error:
        load_model_constants(_file(tmp_path, f"{section} = {{{bad!r}: 1}}"))
    message = str(error.value)
    assert section in message and repr(bad) in message and key in message, message


@pytest.mark.parametrize("section", list(SECTIONS))
def test_wrong_type_names_field_and_expected_type(section, tmp_path):
    _, cls = SECTIONS[section]
    key, kind = _scalar_field(cls)
    with pytest.raises(ConfigTypeError) as error:
        load_model_constants(_file(tmp_path, f"{section} = {{{key!r}: [1]}}"))
    message = str(error.value)
    assert f"{section}.{key} should be {describe(kind)}, got [1] (list)" in message, message


def test_literal_choices_and_ranges_are_checked(tmp_path):
    with pytest.raises(ConfigTypeError, match=r"SAE.architecture should be 'topk' \| 'batchtopk'"):
        load_model_constants(_file(tmp_path, 'SAE = {"architecture": "topkk"}'))
    with pytest.raises(ConfigError, match="k .* must not exceed d_sae"):
        load_model_constants(_file(tmp_path, 'SAE = {"d_sae": 8, "k": 16}'))
    with pytest.raises(ConfigError, match="lr must be finite"):
        load_model_constants(_file(tmp_path, 'OPTIMIZER = {"lr": float("inf")}'))
    with pytest.raises(ConfigError, match="train_batch_size_tokens must be positive"):
        load_model_constants(_file(tmp_path, 'TRAINING = {"train_batch_size_tokens": 0}'))
    with pytest.raises(ConfigError, match=r"min_distinct_ratio must lie in \[0, 1\]"):
        load_model_constants(_file(tmp_path, 'STEERING = {"min_distinct_ratio": 1.5}'))


def test_unknown_section_names_the_closest(tmp_path):
    with pytest.raises(ConfigError, match="unknown section TRAINNG; closest valid keys: TRAINING"):
        load_model_constants(_file(tmp_path, "TRAINNG = {}"))
    with pytest.raises(ConfigError, match="EXTRACTION was split into WINDOWS, LOADER, FORWARD and STORE"):
        load_model_constants(_file(tmp_path, "EXTRACTION = {}"))


@pytest.mark.parametrize("name", known_models())
def test_every_constant_file_builds_and_shares_its_sections(name):
    run = load_run_config(name)
    assert run.store.windows is run.windows and run.training.windows is run.windows
    assert run.training.sae is run.sae and run.training.optimizer is run.optimizer
    assert run.store.loader is run.loader and run.training.forward is run.forward
    assert run.training.device == run.device == run.model_load.get("device", "cpu")


def test_default_model_changes_only_what_it_states():
    """The default model's fixes: one BOS policy everywhere, the measured learning rate."""
    run = load_run_config("smollm2_135m_instruct")
    assert run.windows.prepend_bos is True and run.optimizer.lr == 4e-3
    # FORWARD["dtype"] = "auto": resolved at load to this machine's choice (tests/test_precision.py checks it)
    assert run.forward.dtype == auto_dtype("cpu") and run.sae.d_sae == 4608
    assert (run.training.total_training_tokens, run.training.buffer_passes, run.training.train_batch_size_tokens,
            run.training.shuffle_buffer_tokens, run.optimizer.lr_scheduler) == (600_000, 2, 1024, 262_144, "cosineannealing")


def test_overrides_are_routed_to_the_owner_and_type_checked():
    run = load_run_config("tiny_random", ["training.lr=4e-3", "training.k=8", "windows.max_text_length=16",
                                          "store.shard_size=128", "forward.dtype=bfloat16", "steering.feature=0"])
    assert run.optimizer.lr == run.training.optimizer.lr == 4e-3
    assert run.sae.k == run.training.sae.k == 8
    assert run.store.windows.max_text_length == run.training.windows.max_text_length == 16
    assert run.store.shard_size == 128 and run.training.forward.dtype == "bfloat16"
    assert run.steering.feature == 0  # latent 0 is a latent, not "none"
    assert run.to_json()["overrides"][0] == "training.lr=4e-3"
    with pytest.raises(ConfigTypeError, match="should be int"):
        load_run_config("tiny_random", ["training.k=abc"])
    with pytest.raises(ConfigError, match="closest valid keys: lr"):
        load_run_config("tiny_random", ["optimizer.lrr=1"])
    with pytest.raises(ConfigError, match="section.key=value"):
        load_run_config("tiny_random", ["lr"])
    for old, new in (("analysis.n_documents=6", "'n_windows'"), ("evaluation.eval_documents=6", "'eval_windows'")):
        with pytest.raises(ConfigError, match=f"unknown key '{old.split('.')[1].split('=')[0]}'; it was replaced by {new}"):
            load_run_config("tiny_random", [old])
    with pytest.raises(ConfigError, match="unknown section 'trainig'"):
        load_run_config("tiny_random", ["trainig.lr=1e-3"])


def test_effective_config_round_trips_through_json():
    run = load_run_config("tiny_random", ["sae.k=2"])
    record = run.to_json()
    assert record["sae"]["k"] == 2 and "windows" not in record["training"]  # shared sections appear once
    assert record["windows"]["policy"]["exclude_bos"] is True


@pytest.mark.parametrize("cls", [StoreConfig, TrainingConfig, ExtractionConfig])
def test_every_knob_has_one_owner_in_each_stage_config(cls):
    """Flat names route unambiguously: no leaf name is defined by two sections of one stage config."""
    owners: dict[str, list[str]] = {}

    def walk(kind: type, prefix: str) -> None:
        for name, annotation in field_types(kind).items():
            nested = annotation if dataclasses.is_dataclass(annotation) else None
            if nested is not None and name != "policy":
                walk(nested, f"{prefix}{name}.")
            else:
                owners.setdefault(name, []).append(prefix + name)

    walk(cls, "")
    assert {k: v for k, v in owners.items() if len(v) > 1} == {}


def test_flat_construction_and_overrides_check_types():
    cfg = build_flat(TrainingConfig, "training", hook_points=("h",), k=4, lr=1e-3, max_text_length=32, d_sae=64)
    assert (cfg.sae.k, cfg.optimizer.lr, cfg.windows.max_text_length) == (4, 1e-3, 32)
    store = with_overrides(StoreConfig(), "save", prepend_bos=False, batch_size=3, compile=True)
    assert (store.windows.prepend_bos, store.loader.batch_size, store.forward.compile) == (False, 3, True)
    with pytest.raises(ConfigTypeError, match="save.forward.compile should be bool"):
        with_overrides(StoreConfig(), "save", compile="yes")
    with pytest.raises(ConfigError, match="NPZ chunks keep one window per row"):
        with_overrides(StoreConfig(), "save", shard_format="npz", pack_windows=True)


def test_device_of_model_load_config_reaches_every_stage_config(tmp_path):
    """A GPU constant file on this CPU machine: every stage's config resolves to its device."""
    source = _file(tmp_path, 'MODEL_LOAD_CONFIG = {"device": "cuda:1", "dtype": "bfloat16"}', "gpu")
    run = RunConfig.from_constants(load_model_constants(source))
    assert run.device == "cuda:1" and run.training.device == "cuda:1"
    assert ExtractionConfig.from_run_config(run, tmp_path).device == "cuda:1"
    assert run.to_json()["device"] == "cuda:1"
    with pytest.raises(ConfigError, match="is not a torch device"):
        load_model_constants(_file(tmp_path, 'MODEL_LOAD_CONFIG = {"device": "gpu0"}', "bad_device"))


def test_device_is_passed_to_every_stage_at_run_time(tiny_model, tmp_path, monkeypatch):
    """The pipeline hands the run's device to the SAE loader, the whitening and training (not a default)."""
    from sae_core import pipeline
    from sae_core.saes import SAEManager
    from sae_core.whitening import Whitener

    run = load_run_config("tiny_random", ["training.total_training_tokens=512", "training.train_batch_size_tokens=256",
                                          "training.shuffle_buffer_tokens=256", "evaluation.held_out_documents=4"])
    seen: dict[str, list[str]] = {"sae": [], "whitener": [], "training": []}
    original_load, original_whitener = SAEManager.load_from_disk, Whitener.load

    def record_load(self, folder, hook=None, *, device=None, dtype=None):
        seen["sae"].append(str(device))
        return original_load(self, folder, hook, device=device, dtype=dtype)

    def record_whitener(path, expected_d=None, device="unset"):
        seen["whitener"].append(str(device))
        return original_whitener(path, expected_d, device=device)

    monkeypatch.setattr(SAEManager, "load_from_disk", record_load)
    monkeypatch.setattr(Whitener, "load", staticmethod(record_whitener))
    texts = [f"Document {i} talks about the weather, the sea and the hills." * 3 for i in range(24)]
    stored = pipeline.collect_activations(tiny_model, run, texts, tmp_path)
    pipeline.fit_whitening(stored, run, tmp_path)
    reports = pipeline.train_saes(tiny_model, texts, run, tmp_path)
    manager = pipeline.load_saes(tiny_model, run, tmp_path)
    seen["training"] = [str(manager[h].sae.device) for h in reports]
    assert seen["sae"] == [run.device] and seen["whitener"] == [run.device] and seen["training"] == [run.device]
    for folder in (stored.path, tmp_path / "whitening" / run.hook_points[0], tmp_path / "sae" / run.hook_points[0]):
        written = (folder / pipeline.RUN_CONFIG_FILENAME).read_text()
        assert '"device": "cpu"' in written and '"total_training_tokens": 512' in written


def test_one_held_out_split_per_run_reaches_the_analysis(tiny_model, tmp_path):
    """Training saves its split; the analysis encodes only held-out documents, and refuses an SAE
    without a split unless told to analyse other documents (then it records that)."""
    import json

    import numpy as np

    from sae_core import pipeline
    from sae_core.sae_folders import SPLIT_FILENAME, read_split

    run = load_run_config("tiny_random", ["training.total_training_tokens=512", "training.train_batch_size_tokens=256",
                                          "training.shuffle_buffer_tokens=256", "evaluation.held_out_documents=10",
                                          "analysis.n_windows=6"])
    texts = [f"Text number {i}: " + " ".join(f"word{(i * 7 + j) % 50}" for j in range(12 + i % 9)) for i in range(40)]
    hook = run.hook_points[0]
    pipeline.train_saes(tiny_model, texts, run, tmp_path)
    split = read_split(tmp_path / "sae" / hook)
    assert set(split.train).isdisjoint(split.held_out) and len(split.held_out) == 10
    assert sorted(split.train + split.held_out) == list(range(40))
    manager = pipeline.load_saes(tiny_model, run, tmp_path)
    analysis = pipeline.analyse(tiny_model, manager, texts, run, tmp_path, hook)
    used = json.loads((analysis.folder / pipeline.DOCUMENTS_FILENAME).read_text())
    assert used["documents"] == split.held_out and used["windows"] == 6
    assert len(used["documents_drawn"]) == 6 and set(used["documents_drawn"]) <= set(split.held_out)
    assert used["origin"].startswith("held out: the 10 documents of") and "6 of the 10 windows" in used["origin"]
    assert set(np.unique(analysis.csr.doc_index).tolist()) <= set(used["documents_drawn"])  # no training document
    # the analysis also writes the Neuronpedia export: one feature per latent, density from the CSR
    batches = sorted((analysis.paths["browser"].parent / "neuronpedia").glob("batch-*.json"))
    features = [f for b in batches for f in json.loads(b.read_text())["features"]]
    header = json.loads(batches[0].read_text())
    assert header["model_id"] == run.model_name and header["layer"] == 1 and header["sae_id_suffix"] == hook
    fires = np.bincount(analysis.csr.indices, minlength=analysis.csr.n_features) / analysis.csr.n_rows
    assert sorted(f["feature_index"] for f in features) == list(range(analysis.csr.n_features))
    for f in features:
        assert f["frac_nonzero"] == pytest.approx(fires[f["feature_index"]], rel=1e-4, abs=1e-7)

    with pytest.raises(ValueError, match="another corpus"):
        pipeline.analysis_documents(run, texts[:-1], tmp_path / "sae" / hook)
    (tmp_path / "sae" / hook / SPLIT_FILENAME).unlink()
    with pytest.raises(FileNotFoundError, match="ANALYSIS\\['documents'\\] = 'other'"):
        pipeline.analysis_documents(run, texts, tmp_path / "sae" / hook)
    other = load_run_config("tiny_random", ["analysis.documents=other", "analysis.n_windows=6"])
    documents, origin = pipeline.analysis_documents(other, texts, tmp_path / "sae" / hook)
    assert len(documents) == 6 and origin.startswith("other")
