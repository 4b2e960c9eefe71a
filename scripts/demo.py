"""The whole pipeline on one model's constant file: collect -> whiten -> train -> evaluate -> analyse
-> plot -> steer, ending with a summary and an index.html linking every figure and artifact.

    python -m scripts.demo [model_constants_name]      # default: smollm2_135m_instruct (make demo)

Everything is written under ``outputs/<model>/`` (``SAE_CORE_OUTPUTS`` moves ``outputs``). Every
stage reuses what an earlier run already made: the activation run resumes, the whitening, SAE,
CSR and memmaps are read back instead of recomputed.
"""

import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from sae_core import plots
from sae_core._io import atomic_write_json
from sae_core.activations import TokenPolicy, iter_activation_batches
from sae_core.data import (
    LoaderConfig,
    TextSourceConfig,
    WindowedTextDataset,
    load_texts,
    make_dataloader,
)
from sae_core.evaluation import read_curve, read_eval
from sae_core.hooks import list_hook_points
from sae_core.latents import LatentCSR, encode_to_csr, latent_density, top_activating_examples
from sae_core.model_loading import load_model
from sae_core.models import DEFAULT_MODEL, load_model_constants
from sae_core.saes import SAEManager
from sae_core.similarity import (
    compute_feature_cooccurrence,
    compute_feature_similarity,
    similarity_blocks,
    top_k_neighbours,
)
from sae_core.steering import ModelSteering, Steer
from sae_core.store import ActivationRun, StoreConfig, save
from sae_core.training import TrainingConfig, split_documents, train_from_model
from sae_core.whitening import WHITENING_FILENAME, Whitener, statistics_from_run

logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
began = time.perf_counter()

name = sys.argv[1] if len(sys.argv) > 1 else DEFAULT_MODEL
constants = load_model_constants(name)
out = Path(os.environ.get("SAE_CORE_OUTPUTS", "outputs")) / Path(name).stem
hook = constants.HOOK_POINTS[0]
analysis = constants.ANALYSIS
print(f"sae_core demo: {constants.MODEL_NAME}, hook {hook}, output in {out}")

model = load_model(constants)
print(f"{len(model.hook_dict)} hook points, e.g. {[h.name for h in list_hook_points(model, '*resid_post', seq_len=None)][:3]}")
texts = load_texts(TextSourceConfig(**constants.DATASET))
print(f"[1/7] {len(texts):,} documents; collecting activations")

# 1. Activations into the store (a finished run is reused, an interrupted one resumes).
extraction = StoreConfig(**constants.EXTRACTION)
run_id = save(model, hook, texts, out / "store", run_id="demo", config=extraction)
run = ActivationRun.open(out / "store", run_id)

# 2. Whitening statistics from the stored run (no model needed).
print(f"[2/7] whitening statistics over {len(run):,} stored rows")
whitening_dir = out / "whitening"
if not (whitening_dir / WHITENING_FILENAME).exists():
    statistics = statistics_from_run(run.path, hook)
    statistics.to_whitener(method=constants.WHITENING["method"], eps=constants.WHITENING["eps"], hook=hook).save(whitening_dir)
whitener = Whitener.load(whitening_dir)

# 3-4. Train the SAE on streaming windows and evaluate it on held-out documents.
training = TrainingConfig(**{"hook_points": (hook,), **constants.TRAINING})
sae_dir = out / "sae" / hook
if not (sae_dir / "eval.json").exists():
    print(f"[3/7] training a {training.architecture} SAE on {training.total_training_tokens:,} tokens")
    train_from_model(model, texts, training, out / "sae")
else:
    print("[3/7] reusing the trained SAE")
result, curve = read_eval(sae_dir), read_curve(sae_dir)
manager = SAEManager(model)
manager.load_from_disk(sae_dir, hook)
print(f"[4/7] evaluated: explained variance {result.explained_variance:.3f}, L0 {result.l0:.1f}, "
      f"CE-loss recovered {result.ce_recovered:.3f}")

# 5. Analysis: CSR latents over held-out documents, top examples, similarity and co-occurrence memmaps.
print("[5/7] analysing latents")
analysis_dir = out / "analysis"
csr_dir = analysis_dir / "latents"
if not (csr_dir / "meta.json").exists():
    _, held_out = split_documents(len(texts), min(analysis["n_eval_documents"], len(texts) // 2), training.seed)
    dataset = WindowedTextDataset(texts, model.tokenizer, training.max_text_length, training.seed, training.prepend_bos)
    loader = make_dataloader(dataset, LoaderConfig(batch_size=extraction.batch_size), sorted(held_out))
    batches = iter_activation_batches(model, loader, [hook], TokenPolicy(), training.forward_dtype)
    encode_to_csr(model, lambda x: manager.encode(hook, x), batches, hook, csr_dir, overwrite=True)
csr = LatentCSR.load(csr_dir)
density = latent_density(csr)
W_dec = manager[hook].sae.W_dec.detach().float().cpu().numpy()
chunk = analysis["chunk_size"]
similarity_path = analysis_dir / f"similarity_{analysis['similarity_metric']}.npy"
if not similarity_path.exists():
    compute_feature_similarity(W_dec, analysis["similarity_metric"], chunk, out=analysis_dir)
cooccurrence_path = analysis_dir / f"cooccurrence_{analysis['cooccurrence_metric']}.npy"
if not cooccurrence_path.exists():
    compute_feature_cooccurrence(csr, analysis["cooccurrence_metric"], chunk, out=analysis_dir)
if not (analysis_dir / "decoder_neighbours_indices.npy").exists():
    top_k_neighbours(similarity_blocks(W_dec, "cosine", chunk), k=8, out=analysis_dir, name="decoder_neighbours")

# Latents to show: the most active among those that fire on 0.1%-10% of tokens.
mean_max = np.asarray(csr.to_scipy().max(axis=0).todense()).ravel()
candidates = np.flatnonzero((density > 1e-3) & (density < 0.1))
shown = candidates[np.argsort(-mean_max[candidates])][:5].tolist()
examples = top_activating_examples(csr, shown, k=analysis["top_k_examples"], context_window=analysis["context_window"])

# 6. Steering: add the most active shown latent's decoder direction, scaled to the activation norm.
print("[6/7] steering")
steer_cfg = constants.STEERING
norm = float(run.activations(hook)[: min(len(run), 4096)].float().norm(dim=-1).mean())
feature = shown[0] if shown else 0
steer = Steer(hook, feature, steer_cfg["coefficient"] * norm)
comparison = ModelSteering(model, manager).compare([steer_cfg["prompt"]], [steer], max_new_tokens=steer_cfg["max_new_tokens"])

# 7. Figures and the index.
print("[7/7] figures")
figures = out / "figures"
tokenizer = model.tokenizer
top_tokens = {latent: [tokenizer.decode([ex.context_token_ids[ex.focus]]) for ex in examples[latent][:5]] for latent in shown}
example_html = "".join(plots.top_examples_html(
    [{"tokens": ex.context_token_ids, "values": [ex.value if i == ex.focus else 0.0 for i in range(len(ex.context_token_ids))],
      "focus": ex.focus} for ex in examples[latent]], tokenizer, latent) for latent in shown)
(figures).mkdir(parents=True, exist_ok=True)
entries = [
    plots.IndexEntry("Decoder similarity", str(plots.save_figure(plots.feature_similarity_heatmap(
        similarity_path, max_features=128, neighbourhood_of=feature), figures / "similarity.html").relative_to(out))),
    plots.IndexEntry("Co-occurrence", str(plots.save_figure(plots.cooccurrence_heatmap(
        cooccurrence_path, metric_name=analysis["cooccurrence_metric"], max_features=128, neighbourhood_of=feature),
        figures / "cooccurrence.html").relative_to(out))),
    plots.IndexEntry("Latent density", str(plots.save_figure(plots.latent_density_histogram(density),
                                                             figures / "density.html").relative_to(out))),
    plots.IndexEntry("Training curves", str(plots.save_figure(plots.training_curves(curve),
                                                              figures / "training_curves.html").relative_to(out))),
    plots.IndexEntry("Whitening spectrum", str(plots.save_figure(plots.whitening_spectrum(
        whitener.eigenvalues.cpu().numpy(), eps=whitener.eps), figures / "whitening_spectrum.html").relative_to(out))),
    plots.IndexEntry("Steering", str(plots.save_figure(plots.steering_comparison(
        comparison.before.completions, comparison.after.completions, comparison.prompts,
        title=f"add latent {feature} x {steer.coefficient:.0f}"), figures / "steering.html").relative_to(out))),
]
(figures / "top_examples.html").write_text(f"<html><body>{example_html}</body></html>", encoding="utf-8")
entries += [plots.IndexEntry("Top-activating examples", "figures/top_examples.html"),
            plots.IndexEntry("SAE (SAELens format) + eval.json", str(sae_dir.relative_to(out))),
            plots.IndexEntry("Activation run", str(run.path.relative_to(out))),
            plots.IndexEntry("CSR latents", str(csr_dir.relative_to(out))),
            plots.IndexEntry("Similarity memmap", str(similarity_path.relative_to(out))),
            plots.IndexEntry("Co-occurrence memmap", str(cooccurrence_path.relative_to(out)))]
index = plots.index_html(entries, out / "index.html", title=f"sae_core demo: {constants.MODEL_NAME}")

summary = {
    "model": constants.MODEL_NAME, "hook": hook, "stored_rows": len(run), "d_sae": int(W_dec.shape[0]),
    "explained_variance": result.explained_variance, "l0": result.l0, "dead_fraction": result.dead_fraction,
    "ce_loss_recovered": result.ce_recovered, "kl": result.kl_spliced,
    "top_latents": {int(k): v for k, v in top_tokens.items()},
    "steering": {"latent": feature, "coefficient": steer.coefficient, "before": comparison.before.completions[0],
                 "after": comparison.after.completions[0]},
    "seconds": round(time.perf_counter() - began, 1),
}
atomic_write_json(out / "summary.json", summary)
torch.set_printoptions(precision=3)
print(f"\nexplained variance {result.explained_variance:.3f} | L0 {result.l0:.1f} | dead fraction "
      f"{result.dead_fraction:.3f} | CE-loss recovered {result.ce_recovered:.3f} | KL {result.kl_spliced:.4f}")
for latent, tokens in top_tokens.items():
    print(f"latent {latent:5d} (density {density[latent]:.4f}): top tokens {tokens}")
print(f"steering latent {feature}: {comparison.before.completions[0]!r} -> {comparison.after.completions[0]!r}")
print(f"done in {summary['seconds']:.0f} s; open {index.resolve()}")
