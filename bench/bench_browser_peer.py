"""The peer comparison of ``bench.bench_browser``: SAEDashboard (in its own venv) versus the browser.

Same model (SmolLM2-135M, float32), hook (``blocks.10.hook_resid_post``), SAE (an SAELens TopK SAE,
k=32, d_sae 4,608, random weights with unit decoder rows and ``rescale_acts_by_decoder_norm`` so
SAEDashboard's ``fold_W_dec_norm`` is allowed and a no-op), tokens (``N_PROMPTS`` windows of
``CONTEXT`` tokens of the default corpus, BOS first) and latents (the first ``N_FEATURES``; BOS / EOS / pad positions ignored on both sides).

- ours: one forward over the tokens, encode, CSR of those latents (``CSRBuilder``), then
  :func:`sae_core.browser.build_browser` (co-occurrence and neighbours computed, no memmap given).
- SAEDashboard: ``SaeVisRunner`` with the Neuronpedia runner's batch sizes (128 features, 32
  prompts per forward), timed inside its process (model loading excluded on both sides).
- re-run baseline: one forward over all tokens per batch of 128 latents, keeping only their top
  examples: the floor of any per-feature-batch re-run tool, always measured.

Equal top examples: per latent, the largest activation (relative 1e-3) and its token agree.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

HOOK, LAYER = "blocks.10.hook_resid_post", 10
N_PROMPTS, CONTEXT, N_FEATURES, D_SAE = 64, 128, 512, 4608
FEATURES_PER_BATCH, PROMPTS_PER_FORWARD = 128, 32
REPO = Path(__file__).resolve().parent.parent


def make_inputs(model: Any, folder: Path) -> tuple[Any, torch.Tensor]:
    """The SAE (saved in SAELens format) and the token windows (saved as a tensor)."""
    from sae_lens import TopKSAE, TopKSAEConfig

    from sae_core.models import load_model_constants
    from sae_core.pipeline import load_texts_of

    torch.manual_seed(0)
    sae = TopKSAE(TopKSAEConfig(d_in=model.cfg.d_model, d_sae=D_SAE, k=32, dtype="float32", device="cpu",
                                rescale_acts_by_decoder_norm=True))
    with torch.no_grad():
        sae.W_dec.copy_(torch.nn.functional.normalize(torch.randn_like(sae.W_dec), dim=1))
        sae.W_enc.copy_(sae.W_dec.T * 2.0)
    sae.save_model(folder / "sae")
    texts = load_texts_of(load_model_constants("smollm2_135m_instruct"))
    ids = model.tokenizer("\n".join(texts[:3000]))["input_ids"][: N_PROMPTS * (CONTEXT - 1)]
    body = torch.tensor(ids, dtype=torch.long).reshape(N_PROMPTS, CONTEXT - 1)
    tokens = torch.cat([torch.full((N_PROMPTS, 1), model.tokenizer.bos_token_id), body], dim=1)
    torch.save(tokens, folder / "tokens.pt")
    return sae, tokens


def ignored(model: Any, tokens: torch.Tensor) -> torch.Tensor:
    special = [t for t in (model.tokenizer.bos_token_id, model.tokenizer.eos_token_id,
                           model.tokenizer.pad_token_id) if t is not None]
    return torch.isin(tokens, torch.tensor(special))


def run_ours(model: Any, sae: Any, tokens: torch.Tensor, folder: Path, n_features: int) -> dict[str, Any]:
    from sae_core.browser import build_browser, chunk_file, read_data
    from sae_core.latents import CSRBuilder

    start = time.perf_counter()
    mask = ignored(model, tokens)
    with torch.no_grad(), CSRBuilder(n_features, workdir=folder) as builder:
        for first in range(0, N_PROMPTS, PROMPTS_PER_FORWARD):
            batch = tokens[first:first + PROMPTS_PER_FORWARD]
            _, cache = model.run_with_cache(batch, names_filter=HOOK, stop_at_layer=LAYER + 1)
            z = sae.encode(cache[HOOK].reshape(-1, model.cfg.d_model))[:, :n_features]
            z[mask[first:first + PROMPTS_PER_FORWARD].reshape(-1)] = 0
            doc = torch.arange(first, first + batch.shape[0]).repeat_interleave(CONTEXT)
            builder.add(z, batch.reshape(-1), doc, torch.arange(CONTEXT).repeat(batch.shape[0]))
        csr = builder.finish(folder / f"csr_{n_features}", overwrite=True)
    encoded = time.perf_counter()
    out = folder / f"browser_{n_features}"
    build_browser(out, csr, sae.W_dec[:n_features], model.W_U, model.tokenizer, progress=False)
    done = time.perf_counter()
    top = {}
    for chunk in range(-(-n_features // 512)):
        for record in read_data(out / chunk_file(chunk)):
            ex = record["top"][0] if record["top"] else None
            top[record["id"]] = None if ex is None else [ex["value"], ex["tokens"][ex["focus"]]]
    return {"encode_seconds": round(encoded - start, 2), "build_seconds": round(done - encoded, 2),
            "seconds": round(done - start, 2), "top": top}


def rerun_baseline(model: Any, sae: Any, tokens: torch.Tensor, n_features: int, k: int = 10) -> float:
    """Seconds for one forward per batch of latents, each keeping only that batch's top-k examples."""
    mask = ignored(model, tokens).reshape(-1)
    start = time.perf_counter()
    with torch.no_grad():
        for first in range(0, n_features, FEATURES_PER_BATCH):
            parts = []
            for p in range(0, N_PROMPTS, PROMPTS_PER_FORWARD):
                _, cache = model.run_with_cache(tokens[p:p + PROMPTS_PER_FORWARD], names_filter=HOOK,
                                                stop_at_layer=LAYER + 1)
                parts.append(sae.encode(cache[HOOK].reshape(-1, model.cfg.d_model))[:, first:first + FEATURES_PER_BATCH])
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


def peer_case(scratch: Path, sd_python: str) -> dict[str, Any]:
    from bench.common import load_smollm2
    from sae_core.default_model import smollm2_hf_folder

    folder = scratch / "peer"
    folder.mkdir(parents=True, exist_ok=True)
    model = load_smollm2("float32")
    sae, tokens = make_inputs(model, folder)
    record: dict[str, Any] = {"n_prompts": N_PROMPTS, "context": CONTEXT, "n_features": N_FEATURES, "d_sae": D_SAE,
                              "hook": HOOK}
    ours = run_ours(model, sae, tokens, folder, N_FEATURES)
    record["ours"] = {k: v for k, v in ours.items() if k != "top"}
    full = run_ours(model, sae, tokens, folder, D_SAE)
    record["ours_all_4608_latents"] = {k: v for k, v in full.items() if k != "top"}
    record["rerun_baseline_seconds"] = round(rerun_baseline(model, sae, tokens, N_FEATURES), 2)
    spec = {"hf_folder": str(smollm2_hf_folder()), "sae_folder": str(folder / "sae"), "tokens": str(folder / "tokens.pt"),
            "hook": HOOK, "n_features": N_FEATURES, "features_per_batch": FEATURES_PER_BATCH,
            "prompts_per_forward": PROMPTS_PER_FORWARD}
    (folder / "spec.json").write_text(json.dumps(spec))
    if not Path(sd_python).exists():
        record["saedashboard"] = {"error": f"{sd_python} does not exist: no SAEDashboard virtualenv"}
    else:
        done = subprocess.run([sd_python, str(REPO / "bench" / "saedashboard_child.py"), str(folder / "spec.json")],
                              capture_output=True, text=True, check=False, cwd=folder)
        if done.returncode != 0:
            record["saedashboard"] = {"error": done.stderr[-3000:]}
        else:
            theirs = json.loads(done.stdout.strip().splitlines()[-1])
            record["saedashboard"] = {"seconds": theirs["seconds"], **agreement(ours["top"], theirs["top"])}
    peer = record["saedashboard"].get("seconds")
    record["peer"] = "saedashboard" if peer else "rerun_baseline"
    record["ratio"] = round((peer or record["rerun_baseline_seconds"]) / ours["seconds"], 2)
    record["ratio_rerun_baseline"] = round(record["rerun_baseline_seconds"] / ours["seconds"], 2)
    record["ratio_build_only"] = round((peer or record["rerun_baseline_seconds"]) / ours["build_seconds"], 2)
    return record
