"""Shared fixtures: a tiny random HookedTransformer (unit tier) and SmolLM2 (integration tier).

Tests run offline: HF_HUB_OFFLINE and WANDB_MODE are set before anything imports the hub client.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json  # noqa: E402
import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--regenerate-golden", action="store_true",
                     help="rewrite the tests/golden/*.json files a test checks with this run's numbers "
                          "(their tolerances and notes are kept); then review and commit the diff")


@pytest.fixture()
def golden(request):
    """``golden(path, values, how)``: assert each value within the file's ``tolerances`` (absolute) of its
    ``values``, or, with ``--regenerate-golden``, write this run's values there (tolerances and notes kept)."""

    def check(path, values, how):
        record = json.loads(path.read_text()) if path.exists() else {}
        if request.config.getoption("--regenerate-golden"):
            record.update({"values": values, "measured": how, "torch": torch.__version__,
                           "threads": torch.get_num_threads()})
            record.setdefault("tolerances", {key: None for key in values})
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(record, indent=2) + "\n")
            return
        assert record, f"{path} is missing; create it with pytest --regenerate-golden"
        off = {key: (value, record["values"][key], record["tolerances"][key]) for key, value in values.items()
               if not math.isfinite(value) or abs(value - record["values"][key]) > record["tolerances"][key]}
        assert not off, f"outside the golden tolerances of {path.name} (got, golden, tolerance): {off}"

    return check


@pytest.fixture(autouse=True)
def _threads_unchanged():
    """Fail a test that leaves torch's thread count or ``OMP_NUM_THREADS`` changed (and put them back).

    Such a leak is silent and costly: every later test, and every subprocess they start (notebook
    kernels, scripts, the demo), would run on fewer threads.
    """
    before = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    yield
    after = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    if after != before:
        torch.set_num_threads(before[0])
        if before[1] is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = before[1]
        pytest.fail(f"this test left (torch threads, OMP_NUM_THREADS) at {after}, not {before}: restore them "
                    "(monkeypatch.setenv, or set the threads back in a fixture's teardown)")


@pytest.fixture(scope="session")
def tiny_model():
    """A 2-layer random model (d_model 32) with SmolLM2's tokenizer; treat it as read-only."""
    from sae_core.model_loading import load_model

    return load_model("tiny_random")


@pytest.fixture(scope="session")
def smollm2():
    """The default model, SmolLM2-135M-Instruct, float32 on CPU; treat it as read-only."""
    from sae_core.model_loading import load_model

    return load_model("smollm2_135m_instruct")


@pytest.fixture(scope="session")
def smollm2_hf():
    """The HF (transformers) SmolLM2 model the HookedTransformer was converted from: the reference."""
    from transformers import AutoModelForCausalLM

    from sae_core.default_model import smollm2_hf_folder

    model = AutoModelForCausalLM.from_pretrained(smollm2_hf_folder(), dtype=torch.float32)
    model.eval()
    return model


@pytest.fixture(scope="session")
def corpus_texts():
    """A small, fixed slice of the real default corpus (FreeBSD fortunes)."""
    from sae_core.corpora import fortunes_corpus

    return fortunes_corpus()[:300]
