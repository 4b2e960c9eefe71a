"""``"auto"`` precision (sae_core.precision): the choice against the CPU's own flags, resolved once at
the edge and recorded as a dtype, the forward it selects, and the warning for a slow explicit choice."""

from __future__ import annotations

import logging
import platform
from pathlib import Path

import pytest
import torch

from sae_core import precision
from sae_core.activations import run_to_hooks
from sae_core.config import ConfigError, ForwardConfig, StoreConfig, TrainingConfig
from sae_core.models import load_run_config
from sae_core.precision import auto_dtype
from sae_core.store import ActivationRun, save

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture()
def fresh_log(monkeypatch):
    """Each (knob, value, device) is logged once a process; start each test with none logged."""
    monkeypatch.setattr(precision, "_WARNED", set())


def _native(monkeypatch, *names: str) -> None:
    monkeypatch.setattr(precision, "native_half_dtypes", lambda device: names)


def test_auto_follows_the_cpu_flags_the_kernel_reports():
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists() or platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("the reference is /proc/cpuinfo on x86")
    flags = set(next(line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")).split())
    expected = ("bfloat16" if flags & {"avx512_bf16", "amx_bf16"} else "float16" if "amx_fp16" in flags
                else "float32")
    assert auto_dtype("cpu") == expected
    assert auto_dtype("mps") == "float32"


def test_cuda_auto_follows_the_device_bf16_support(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    assert auto_dtype("cuda:0") == "float16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: not including_emulation)
    assert auto_dtype("cuda") == "bfloat16"


@pytest.mark.parametrize("native", [("bfloat16",), ()])
def test_run_config_resolves_auto_once_and_records_the_dtype(monkeypatch, fresh_log, native):
    _native(monkeypatch, *native)
    expected = native[0] if native else "float32"
    run = load_run_config("smollm2_135m_instruct")  # FORWARD = {"dtype": "auto"}; sae_dtype defaults to auto
    assert run.forward.dtype == run.store.forward.dtype == run.training.forward.dtype == expected
    assert run.optimizer.sae_dtype == run.training.optimizer.sae_dtype == expected
    record = run.to_json()
    assert record["forward"]["dtype"] == record["optimizer"]["sae_dtype"] == expected
    assert "auto" not in {unit.config.forward.dtype for unit in run.training.units()}


def test_explicit_half_precision_on_a_cpu_without_it_is_kept_with_a_warning(monkeypatch, fresh_log, caplog):
    _native(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="sae_core.precision"):
        run = load_run_config("smollm2_135m_instruct", ["forward.dtype=bfloat16"])
    assert run.forward.dtype == "bfloat16"
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "FORWARD['dtype']" in warned[0] and "'auto'" in warned[0]
    caplog.clear()
    _native(monkeypatch, "bfloat16")
    precision._WARNED.clear()
    with caplog.at_level(logging.WARNING, logger="sae_core.precision"):
        load_run_config("smollm2_135m_instruct", ["forward.dtype=bfloat16"])
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_directly_built_configs_resolve_auto_against_their_device(monkeypatch, fresh_log):
    _native(monkeypatch, "bfloat16")
    cfg = TrainingConfig(hook_points=(HOOK,), forward=ForwardConfig(dtype="auto"))
    assert cfg.forward.dtype == cfg.optimizer.sae_dtype == "bfloat16"
    _native(monkeypatch)
    assert TrainingConfig(hook_points=(HOOK,)).optimizer.sae_dtype == "float32"
    with pytest.raises(ConfigError, match="not a torch device.*'cuda'"):
        TrainingConfig(hook_points=(HOOK,), device="gpu0")


@pytest.mark.parametrize("native", [("bfloat16",), ()])
def test_auto_forward_equals_the_dtype_it_resolves_to(tiny_model, monkeypatch, native):
    _native(monkeypatch, *native)
    ids = torch.randint(0, tiny_model.cfg.d_vocab, (2, 12), generator=torch.Generator().manual_seed(0))
    auto = run_to_hooks(tiny_model, [HOOK], ids, "auto")[HOOK]
    assert torch.equal(auto, run_to_hooks(tiny_model, [HOOK], ids, native[0] if native else "float32")[HOOK])
    if native:  # the autocast really ran: bfloat16 rounding differs from float32
        assert not torch.equal(auto, run_to_hooks(tiny_model, [HOOK], ids, "float32")[HOOK])


def test_the_store_records_the_resolved_dtype(tiny_model, corpus_texts, monkeypatch, fresh_log, tmp_path):
    _native(monkeypatch)
    config = StoreConfig(forward=ForwardConfig(dtype="auto"))
    run = ActivationRun.open(tmp_path, save(tiny_model, HOOK, list(corpus_texts[:8]), tmp_path, config=config,
                                            batch_size=4, max_text_length=16, progress=False))
    assert run.meta["forward_dtype"] == "float32"
    assert run.meta["config"]["forward"]["dtype"] == "float32"


def test_a_resume_where_auto_would_choose_otherwise_is_refused(tiny_model, corpus_texts, monkeypatch, fresh_log,
                                                                 tmp_path):
    texts, knobs = list(corpus_texts[:8]), dict(dtype="auto", batch_size=4, max_text_length=16, shard_size=16,
                                                 progress=False)
    _native(monkeypatch)
    save(tiny_model, HOOK, texts, tmp_path, run_id="r", **knobs)
    _native(monkeypatch, "bfloat16")  # the same inputs on a machine with native bfloat16
    with pytest.raises(ValueError, match="forward_dtype"):
        save(tiny_model, HOOK, texts, tmp_path, run_id="r", **knobs)
