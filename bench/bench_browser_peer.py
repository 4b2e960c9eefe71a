"""The peer comparison of ``bench.bench_browser``: SAEDashboard (in its own venv) versus the browser.

Same model (SmolLM2-135M, float32 weights and forward on both sides), hook
(``blocks.10.hook_resid_post``), SAE (an SAELens TopK SAE, k=32, d_sae 4,608, random weights with
unit decoder rows and ``rescale_acts_by_decoder_norm`` so SAEDashboard's ``fold_W_dec_norm`` is
allowed and a no-op), tokens (``N_PROMPTS`` windows of ``CONTEXT`` tokens of the default corpus,
BOS first), latents (the first ``N_FEATURES``; BOS / EOS / pad positions ignored on both sides) and
examples per latent (``EXAMPLES``: 20 top, 5 quantile groups of 5, 5 context tokens each side, the
Neuronpedia runner's counts; ours through :class:`~sae_core.browser.BrowserConfig`).

What each clock includes (model, SAE and tokens are loaded before it starts, on both sides):
- ours: one forward per ``PROMPTS_PER_FORWARD`` windows through the pipeline's forward
  (:func:`sae_core.activations.run_to_hooks`: plain hooks, stopped after block 10, no logits),
  SAE encode, CSR of those latents written to disk (``CSRBuilder``), then
  :func:`sae_core.browser.build_browser` (co-occurrence and neighbours computed, no memmap given).
- SAEDashboard: ``SaeVisRunner.run`` with the Neuronpedia runner's layout and batch sizes (128
  features per batch, 32 prompts per forward, one forward over all tokens per feature batch),
  timed inside its process (``bench/saedashboard_child.py``).
- re-run baseline (only where SAEDashboard cannot run): one forward over all tokens per batch of
  128 latents, keeping only their top examples: the floor of any per-feature-batch re-run tool.
Both wall and process CPU seconds are recorded (the machine is shared: CPU seconds move less with
the other sessions' load); ours and SAEDashboard are run alternately ``repeats`` times and each
ratio is the median of the per-pair ratios, with their range. Two sizes: ``N_FEATURES`` latents and
all ``D_SAE`` latents of the SAE (3 pairs each; SAEDashboard takes ~5 wall minutes per run there).

Equal top examples: per latent, the largest activation (relative 1e-3) and its token agree.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

HOOK = "blocks.10.hook_resid_post"
N_PROMPTS, CONTEXT, N_FEATURES, D_SAE = 64, 128, 512, 4608
FEATURES_PER_BATCH, PROMPTS_PER_FORWARD = 128, 32
EXAMPLES = {"top": 20, "n_quantiles": 5, "per_quantile": 5, "context": 5}
REPO = Path(__file__).resolve().parent.parent


def make_inputs(model: Any, folder: Path) -> tuple[Any, torch.Tensor]:
    """The SAE (saved in SAELens format) and the token windows (saved as a tensor)."""
    from sae_lens import TopKSAE, TopKSAEConfig

    from sae_core.models import load_run_config
    from sae_core.pipeline import load_texts_of

    torch.manual_seed(0)
    sae = TopKSAE(TopKSAEConfig(d_in=model.cfg.d_model, d_sae=D_SAE, k=32, dtype="float32", device="cpu",
                                rescale_acts_by_decoder_norm=True))
    with torch.no_grad():
        sae.W_dec.copy_(torch.nn.functional.normalize(torch.randn_like(sae.W_dec), dim=1))
        sae.W_enc.copy_(sae.W_dec.T * 2.0)
    sae.save_model(folder / "sae")
    texts = load_texts_of(load_run_config("smollm2_135m_instruct"))
    ids = model.tokenizer("\n".join(texts[:3000]))["input_ids"][: N_PROMPTS * (CONTEXT - 1)]
    body = torch.tensor(ids, dtype=torch.long).reshape(N_PROMPTS, CONTEXT - 1)
    tokens = torch.cat([torch.full((N_PROMPTS, 1), model.tokenizer.bos_token_id), body], dim=1)
    torch.save(tokens, folder / "tokens.pt")
    return sae, tokens


def ignored(model: Any, tokens: torch.Tensor) -> torch.Tensor:
    special = [t for t in (model.tokenizer.bos_token_id, model.tokenizer.eos_token_id,
                           model.tokenizer.pad_token_id) if t is not None]
    return torch.isin(tokens, torch.tensor(special))


def clock() -> tuple[float, float]:
    """Wall and process CPU time, in seconds."""
    return time.perf_counter(), time.process_time()


def run_ours(model: Any, sae: Any, tokens: torch.Tensor, folder: Path, n_features: int) -> dict[str, Any]:
    from sae_core.activations import run_to_hooks
    from sae_core.browser import BrowserConfig, build_browser, chunk_file, read_data
    from sae_core.latents import CSRBuilder

    config = BrowserConfig(top_k_examples=EXAMPLES["top"], n_quantiles=EXAMPLES["n_quantiles"],
                           examples_per_quantile=EXAMPLES["per_quantile"], context_window=EXAMPLES["context"])
    start = clock()
    mask = ignored(model, tokens)
    with torch.inference_mode(), CSRBuilder(n_features, workdir=folder) as builder:
        for first in range(0, N_PROMPTS, PROMPTS_PER_FORWARD):
            batch = tokens[first:first + PROMPTS_PER_FORWARD]
            acts = run_to_hooks(model, [HOOK], batch, "float32")[HOOK]
            z = sae.encode(acts.reshape(-1, model.cfg.d_model))[:, :n_features]
            z[mask[first:first + PROMPTS_PER_FORWARD].reshape(-1)] = 0
            doc = torch.arange(first, first + batch.shape[0]).repeat_interleave(CONTEXT)
            builder.add(z, batch.reshape(-1), doc, torch.arange(CONTEXT).repeat(batch.shape[0]))
        csr = builder.finish(folder / f"csr_{n_features}", overwrite=True)
    encoded = clock()
    out = folder / f"browser_{n_features}"
    build_browser(out, csr, sae.W_dec[:n_features], model.W_U, model.tokenizer, config=config, progress=False)
    done = clock()
    top = {}
    for chunk in range(-(-n_features // config.chunk_latents)):
        for record in read_data(out / chunk_file(chunk)):
            ex = record["top"][0] if record["top"] else None
            top[record["id"]] = None if ex is None else [ex["value"], ex["tokens"][ex["focus"]]]
    shapes = {len(record["top"]) for record in read_data(out / chunk_file(0))}
    return {"encode_seconds": round(encoded[0] - start[0], 2), "build_seconds": round(done[0] - encoded[0], 2),
            "seconds": round(done[0] - start[0], 2), "encode_cpu_seconds": round(encoded[1] - start[1], 2),
            "build_cpu_seconds": round(done[1] - encoded[1], 2), "cpu_seconds": round(done[1] - start[1], 2),
            "top_group_sizes": sorted(shapes), "top": top}


def rerun_baseline(model: Any, sae: Any, tokens: torch.Tensor, n_features: int, k: int = EXAMPLES["top"]) -> float:
    """Seconds for one forward per batch of latents, each keeping only that batch's top-k examples."""
    from sae_core.activations import run_to_hooks

    mask = ignored(model, tokens).reshape(-1)
    start = time.perf_counter()
    with torch.inference_mode():
        for first in range(0, n_features, FEATURES_PER_BATCH):
            parts = []
            for p in range(0, N_PROMPTS, PROMPTS_PER_FORWARD):
                acts = run_to_hooks(model, [HOOK], tokens[p:p + PROMPTS_PER_FORWARD], "float32")[HOOK]
                parts.append(sae.encode(acts.reshape(-1, model.cfg.d_model))[:, first:first + FEATURES_PER_BATCH])
            acts = torch.cat(parts)
            acts[mask] = 0
            acts.topk(k, dim=0)
    return time.perf_counter() - start


def agreement(ours: dict, theirs: dict) -> dict[str, Any]:
    """Latents whose top example agrees: same largest value (relative 1e-3) and token, or dead on both sides."""
    same = 0
    for feature, mine in ours.items():
        other = theirs.get(str(feature))
        other = None if other is None or other[0] <= 0 else other  # SAEDashboard shows a dead latent at 0
        if mine is None or other is None:
            same += mine is None and other is None
        else:
            same += abs(mine[0] - other[0]) <= 1e-3 * abs(other[0]) and mine[1] == other[1]
    return {"latents_compared": len(ours), "equal_top_example": same}


def run_saedashboard(sd_python: str, spec: Path) -> dict[str, Any]:
    """One SAEDashboard run in its own venv: its JSON line, or ``{"error": ...}``."""
    if not Path(sd_python).exists():
        return {"error": f"{sd_python} does not exist: no SAEDashboard virtualenv"}
    done = subprocess.run([sd_python, str(REPO / "bench" / "saedashboard_child.py"), str(spec)],
                          capture_output=True, text=True, check=False, cwd=spec.parent)
    if done.returncode != 0:
        return {"error": done.stderr[-3000:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def median_pair_ratio(theirs: list[dict], ours: list[dict], key: str) -> float:
    return round(statistics.median(t[key] / o[key] for t, o in zip(theirs, ours, strict=True)), 2)


def pair_ratio_spread(theirs: list[dict], ours: list[dict], key: str) -> dict[str, float]:
    """Median, min and max of the per-pair ratios (each pair: one run of each side, back to back)."""
    ratios = [t[key] / o[key] for t, o in zip(theirs, ours, strict=True)]
    return {"median": round(statistics.median(ratios), 2), "min": round(min(ratios), 2), "max": round(max(ratios), 2),
            "pairs": len(ratios)}


def summary(runs: list[dict]) -> dict[str, Any]:
    keys = [k for k in runs[0] if k.endswith("seconds")]
    return {**{k: round(statistics.median(r[k] for r in runs), 2) for k in keys},
            "repeats": {k: [r[k] for r in runs] for k in keys}}


def peer_case(scratch: Path, sd_python: str, n_features: int = N_FEATURES, repeats: int = 3) -> dict[str, Any]:
    from bench.common import load_smollm2
    from sae_core.default_model import smollm2_hf_folder

    folder = scratch / "peer"
    folder.mkdir(parents=True, exist_ok=True)
    model = load_smollm2("float32")
    sae, tokens = make_inputs(model, folder)
    record: dict[str, Any] = {"n_prompts": N_PROMPTS, "context": CONTEXT, "n_features": n_features, "d_sae": D_SAE,
                              "hook": HOOK, "dtype": "float32", "examples_per_latent": EXAMPLES,
                              "features_per_batch": FEATURES_PER_BATCH, "prompts_per_forward": PROMPTS_PER_FORWARD,
                              "clock": "starts with model, SAE and tokens loaded (both sides); ours: forward + SAE "
                                       "encode + CSR written + build_browser; SAEDashboard: SaeVisRunner.run "
                                       "(one forward over all tokens per 128 features)",
                              "load_average_before": list(os.getloadavg())}
    spec = {"hf_folder": str(smollm2_hf_folder()), "sae_folder": str(folder / "sae"), "tokens": str(folder / "tokens.pt"),
            "hook": HOOK, "n_features": n_features, "features_per_batch": FEATURES_PER_BATCH,
            "prompts_per_forward": PROMPTS_PER_FORWARD, "examples": EXAMPLES}
    (folder / "spec.json").write_text(json.dumps(spec))
    ours, theirs = [], []
    for _ in range(repeats):  # alternated, so both sides see the same spread of machine load
        ours.append(run_ours(model, sae, tokens, folder, n_features))
        theirs.append(run_saedashboard(sd_python, folder / "spec.json"))
        if "error" in theirs[-1]:
            break
    record["ours"] = {**summary([{k: v for k, v in o.items() if k.endswith("seconds")} for o in ours]),
                      "top_group_sizes": [min(ours[0]["top_group_sizes"]), max(ours[0]["top_group_sizes"])]}
    if "error" in theirs[-1]:
        record["saedashboard"] = theirs[-1]
        record["rerun_baseline_seconds"] = round(rerun_baseline(model, sae, tokens, n_features), 2)
        record["peer"] = "rerun_baseline"
        record["ratio"] = round(record["rerun_baseline_seconds"] / record["ours"]["seconds"], 2)
        return record
    record["saedashboard"] = {**summary([{k: v for k, v in t.items() if k.endswith("seconds")} for t in theirs]),
                              "top_group_sizes": theirs[0]["top_group_sizes"],
                              **agreement(ours[-1]["top"], theirs[-1]["top"])}
    record["peer"] = "saedashboard"
    record["ratio"] = median_pair_ratio(theirs, ours, "seconds")
    record["ratio_cpu"] = median_pair_ratio(theirs, ours, "cpu_seconds")
    record["ratio_spread"] = pair_ratio_spread(theirs, ours, "seconds")
    record["ratio_cpu_spread"] = pair_ratio_spread(theirs, ours, "cpu_seconds")
    record["ratio_build_only"] = round(record["saedashboard"]["seconds"] / record["ours"]["build_seconds"], 2)
    record["load_average_after"] = list(os.getloadavg())
    return record
