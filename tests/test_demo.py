"""The README's main job, end to end on the tiny model: every stage writes its artifact, the summary
agrees with the files on disk, and a second run reuses everything."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # subprocesses (cold interpreters + imports)

ROOT = Path(__file__).parents[1]


def _run_demo(out: Path) -> str:
    env = {**os.environ, "SAE_CORE_OUTPUTS": str(out), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    done = subprocess.run([sys.executable, "-m", "scripts.demo", "tiny_random"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_demo_runs_end_to_end_and_reuses_its_outputs(tmp_path):
    stdout = _run_demo(tmp_path)
    out = tmp_path / "tiny_random"
    summary = json.loads((out / "summary.json").read_text())
    sae_dir = out / "sae" / summary["hook"]
    evaluation = json.loads((sae_dir / "eval.json").read_text())
    assert summary["explained_variance"] == evaluation["explained_variance"]
    assert summary["ce_loss_recovered"] == evaluation["ce_recovered"]
    run_config = json.loads((sae_dir / "run_config.json").read_text())
    part = run_config["corpus"] if "package" in run_config["corpus"] else next(iter(run_config["corpus"]["corpora"].values()))
    assert summary["corpus"] in stdout and f"({part['package']} {part['version']}, {part['licence']})" in summary["corpus"]
    split = json.loads((sae_dir / "split.json").read_text())
    assert summary["split"] == {"method": "length_stratified", "held_out": len(split["held_out"]), "seed": split["seed"]}
    assert summary["explained_variance_by_subset"] == {k: v["explained_variance"] for k, v in evaluation["subsets"].items()}
    assert sum(v["n_rows"] for v in evaluation["subsets"].values()) == evaluation["n_rows"]
    # dead latents three ways, each against the file it is read from (CSR columns counted with numpy)
    dead = summary["dead"]
    assert dead["eval"] == {"fraction": evaluation["dead_fraction"], "tokens": evaluation["n_rows"]}
    assert dead["training"]["fraction"] == json.loads((sae_dir / "training_curve.json").read_text())[-1]["dead_fraction"]
    csr_dir = out / "analysis" / summary["hook"] / "latents"
    columns = np.bincount(np.load(csr_dir / "indices.npy"), minlength=summary["d_sae"])
    assert dead["analysis"] == {"fraction": float((columns == 0).mean()),
                                "tokens": len(np.load(csr_dir / "indptr.npy")) - 1}
    # the similarity memmap is the decoder's cosine similarity, recomputed here with numpy
    from safetensors.numpy import load_file

    W = load_file(sae_dir / "sae_weights.safetensors")["W_dec"].astype(np.float64)
    unit = W / np.linalg.norm(W, axis=1, keepdims=True)
    sim = np.load(out / "analysis" / summary["hook"] / "similarity_cosine.npy", mmap_mode="r")
    np.testing.assert_allclose(sim, unit @ unit.T, atol=1e-5)
    # every link of index.html exists
    links = re.findall(r'href="([^"]+)"', (out / "index.html").read_text())
    assert len(links) >= 8 and all((out / link).exists() for link in links)
    # the steered latent came from the output-score screen, and the summary keeps its score as printed
    screened = dict(re.findall(r"(\d+) \(([+-][\d.]+)\)", next(line for line in stdout.splitlines()
                                                               if "screened by output score" in line)))
    steering = summary["steering"]
    assert f"{steering['output_score']:+.4f}" == screened[str(steering["latent"])]
    assert list(screened)[:len(summary["steering_latents_tried"])] == [str(f) for f in summary["steering_latents_tried"]]
    index_line = stdout.strip().splitlines()[-1]
    assert index_line.endswith("index.html") and str(out) in index_line

    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.suffix in (".safetensors", ".npy")}
    _run_demo(tmp_path)
    assert stamps == {p: p.stat().st_mtime_ns for p in stamps}, "a second run recomputed an artifact"
