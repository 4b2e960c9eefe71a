"""The single-stage scripts on the tiny model, run one after another as a user would: each writes
what the next reads, their outputs agree with independent numpy references, and the demo run
afterwards on the same folder reuses every artifact instead of recomputing it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

pytestmark = pytest.mark.slow  # subprocesses (cold interpreters + imports)

ROOT = Path(__file__).parents[1]
SCRIPTS = ["extract_activations", "compute_whitening", "train_sae", "analyse", "steer"]


def _run(script: str, outputs: Path, model: str = "tiny_random") -> subprocess.CompletedProcess:
    env = {**os.environ, "SAE_CORE_OUTPUTS": str(outputs), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    return subprocess.run([sys.executable, "-m", f"scripts.{script}", model], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def _ok(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """Run every script once, in pipeline order; returns (output folder, {script: stdout})."""
    outputs = tmp_path_factory.mktemp("outputs")
    stdout = {script: _ok(_run(script, outputs)) for script in SCRIPTS}
    return outputs / "tiny_random", stdout


def test_every_script_opens_with_its_command():
    for script in [*SCRIPTS, "demo"]:
        doc = (ROOT / "scripts" / f"{script}.py").read_text().split('"""')[1]
        first_command = next(line for line in doc.splitlines() if line.startswith("    "))
        assert first_command.strip().startswith(f"python -m scripts.{script}"), script


def test_extract_then_whiten_match_numpy_on_the_stored_rows(stages):
    out, stdout = stages
    from sae_core.store import ActivationRun

    run = ActivationRun.open(out / "store", "main")
    assert run.hooks == ["blocks.1.hook_resid_post"] and str(run.path) in stdout["extract_activations"]
    x = run.activations("blocks.1.hook_resid_post")[:].double().numpy()
    assert x.shape[0] == len(run) > 0
    whitening = load_file(out / "whitening" / "blocks.1.hook_resid_post" / "whitening.safetensors")
    np.testing.assert_allclose(whitening["mean"], x.mean(axis=0), atol=1e-9)
    # the ZCA transform whitens the stored rows: covariance of z is the identity up to eps
    z = (x - whitening["mean"]) @ whitening["transform"]
    np.testing.assert_allclose(np.cov(z, rowvar=False), np.eye(x.shape[1]), atol=0.02)


def test_train_and_analyse_outputs_match_their_references(stages):
    out, stdout = stages
    hook = "blocks.1.hook_resid_post"
    sae_dir = out / "sae" / hook
    evaluation = json.loads((sae_dir / "eval.json").read_text())
    assert f"explained variance {evaluation['explained_variance']:.3f}" in stdout["train_sae"]
    W = load_file(sae_dir / "sae_weights.safetensors")["W_dec"].astype(np.float64)
    unit = W / np.linalg.norm(W, axis=1, keepdims=True)
    similarity = np.load(out / "analysis" / hook / "similarity_cosine.npy", mmap_mode="r")
    np.testing.assert_allclose(similarity, unit @ unit.T, atol=1e-5)
    # co-occurrence (Jaccard) from the CSR latents, recomputed densely
    from sae_core.latents import LatentCSR

    fired = (LatentCSR.load(out / "analysis" / hook / "latents").to_scipy().toarray() > 0).astype(np.float64)
    both = fired.T @ fired
    either = fired.sum(0)[:, None] + fired.sum(0)[None, :] - both
    jaccard = np.divide(both, either, out=np.zeros_like(both), where=either > 0)
    np.fill_diagonal(jaccard, 1.0)  # the documented convention, also for latents that never fire
    np.testing.assert_allclose(np.load(out / "analysis" / hook / "cooccurrence_jaccard.npy"), jaccard, atol=1e-5)
    assert "top tokens" in stdout["analyse"]


def test_steer_writes_the_comparison_and_the_index_links_every_stage(stages):
    out, stdout = stages
    record = json.loads((out / "steering.json").read_text())
    assert f"before: {record['before']!r}" in stdout["steer"] and record["prompt"] == "Hello"
    links = re.findall(r'href="([^"]+)"', (out / "index.html").read_text())
    assert all((out / link).exists() for link in links)
    for expected in ("steering", "similarity", "whitening_spectrum", "training_curves", "sae/", "store/"):
        assert any(expected in link for link in links), expected


def test_demo_after_the_scripts_reuses_their_artifacts(stages):
    out, _ = stages
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.suffix in (".safetensors", ".npy", ".npz")}
    assert stamps
    _ok(_run("demo", out.parent))
    assert stamps == {p: p.stat().st_mtime_ns for p in stamps}, "the demo recomputed a script's artifact"


def test_scripts_name_the_missing_stage(tmp_path):
    done = _run("analyse", tmp_path)
    assert done.returncode != 0 and "scripts.train_sae" in done.stderr
