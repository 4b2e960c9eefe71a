"""The whole pipeline on one model's constant file: collect -> whiten -> train -> evaluate -> analyse
-> steer (a measured dose-response) -> browser + plots, ending with a summary and an index.html
linking every figure and artifact.

    python -m scripts.demo [model_constants_name] [section.key=value ...]   # make demo: smollm2_135m_instruct

Everything is written under ``outputs/<model>/`` (``SAE_CORE_OUTPUTS`` moves ``outputs``), in the
same places as the single-stage scripts (``extract_activations``, ``compute_whitening``,
``train_sae``, ``analyse``, ``steer``), and every stage reuses what an earlier run already made.
"""

import logging
import sys
import time

from sae_core import pipeline
from sae_core.files import atomic_write_json, read_json
from sae_core.hooks import list_hook_points
from sae_core.sae_folders import read_split
from sae_core.steering import ModelSteering, Steer, SteeringComparison

logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
began = time.perf_counter()

stage_seconds: dict[str, float] = {}
mark = [began]


def corpus_line(record: dict | None, source: str, n_documents: int) -> str:
    """The corpus in one line: each part's share, package and licence (``run_config.json`` has the hashes)."""
    if record is None:
        return f"corpus: {source}, {n_documents:,} documents (a source of the user's)"
    parts = record.get("corpora", {source: record})
    tokens = f", {record['total_tokens'] / 1e6:.2f}M tokens" if "total_tokens" in record else ""
    return (f"corpus: {source}, {n_documents:,} documents{tokens}: " + "; ".join(
        f"{name}" + (f" {p['weight']:.0%}" if "weight" in p else "") + f" ({p['package']} {p['version']}, {p['licence']})"
        for name, p in parts.items()))


def lap(stage: str) -> None:
    """Record the wall time of the stage that just ended."""
    now = time.perf_counter()
    stage_seconds[stage] = round(now - mark[0], 1)
    mark[0] = now


run_config = pipeline.run_from_argv(sys.argv[1:])
out = pipeline.output_dir(run_config.name)
hooks = list(run_config.hook_points)
print(f"sae_core demo: {run_config.model_name}, hook points {hooks}, output in {out}")

model = pipeline.load_model_of(run_config)
print(f"{len(model.hook_dict)} hook points, e.g. {[h.name for h in list_hook_points(model, '*resid_post', seq_len=None)][:3]}")
texts = pipeline.load_texts_of(run_config)

corpus = corpus_line(pipeline.corpus_record(run_config), run_config.dataset.source, len(texts))
lap("load")
print(f"[1/7] {corpus}\n  collecting activations")
run = pipeline.collect_activations(model, run_config, texts, out)

lap("store")
print(f"[2/7] whitening statistics over {len(run):,} stored rows")
whiteners = pipeline.fit_whitening(run, run_config, out)

lap("whitening")
sae_rows, passes = run_config.training.total_training_tokens, run_config.training.buffer_passes
print(f"[3/7] training {run_config.sae.architecture} SAEs ({sae_rows:,} tokens"
      + (f": {-(-sae_rows // passes):,} forwarded, each buffer served {passes} times" if passes > 1 else "")
      + "; reused when already trained)")
trained = pipeline.train_saes(model, texts, run_config, out)
manager = pipeline.load_saes(model, run_config, out)
for hook, sae in trained.items():
    print(f"[4/7] {hook}: explained variance {sae.eval.explained_variance:.3f}, L0 {sae.eval.l0:.1f}, "
          f"CE-loss recovered {sae.eval.ce_recovered:.3f}")

lap("train + evaluate")
print("[5/7] analysing latents")
analyses = [pipeline.analyse(model, manager, texts, run_config, out, hook, browser=False) for hook in hooks]

lap("analyse")
print("[6/7] steering: dose-response of an interpretable latent")
first, knobs = analyses[0], run_config.steering
tried = {}  # latent -> dose-response records, for the browser
# interpretable latents ranked by output score (does the direction make the model write its tokens?), until one steers
candidates = pipeline.steering_latents(run_config, first, model.tokenizer, steering=ModelSteering(model, manager))
if candidates[0].output_score is not None:
    print("  screened by output score: " + ", ".join(f"{c.feature} ({c.output_score:+.4f})" for c in candidates))
for choice in candidates:
    sweep, chosen = pipeline.steering_dose(model, manager, run_config, first.hook, choice)
    tried[choice.feature] = [r.to_json() for r in sweep.records]
    if chosen is not None:
        break
    print(f"  latent {choice.feature}: no coefficient raised its concept score with perplexity within "
          f"{knobs.max_perplexity_ratio}x and distinct tokens above {knobs.min_distinct_ratio}x; trying the next")
after = chosen if chosen is not None else sweep.record_of(0.0)  # none raised the concept score: nothing steered
before_text, after_text = (sweep.generations[sweep.index_of(r.coefficient)].completions for r in (sweep.record_of(0.0), after))
records = [r.to_json() for r in sweep.records]
steering = (Steer(first.hook, choice.feature, after.coefficient),
            SteeringComparison(sweep.prompts, sweep.generations[0], sweep.generations[sweep.index_of(after.coefficient)]))

lap("steer")
print("[7/7] feature browser and figures")
for analysis in analyses:
    pipeline.feature_browser(model, manager, run_config, analysis,
                             steering=tried if analysis is first else None)
index = pipeline.write_figures(out, f"sae_core demo: {run_config.model_name}", analyses=analyses,
                               tokenizer=model.tokenizer, trained=list(trained.values()), whiteners=whiteners,
                               steering=steering, dose=(sweep, chosen, knobs))

lap("browser + figures")
result = trained[first.hook].eval
split = read_split(trained[first.hook].folder)
top_tokens = pipeline.top_tokens(first, model.tokenizer)
zero = sweep.record_of(0.0)
# "Dead" three ways, each with the tokens it counts: latents the eval's few held-out tokens never fire
# (rare latents look dead there), latents silent over the last dead window of training (SAELens's
# definition, the one AuxK acts on), and latents the analysis's held-out store never fires.
dead = {"eval": {"fraction": result.dead_fraction, "tokens": result.n_rows},
        "training": {"fraction": trained[first.hook].curve[-1]["dead_fraction"],
                     "window_tokens": run_config.training.dead_window_tokens},
        "analysis": {"fraction": float((first.density == 0).mean()), "tokens": first.csr.n_rows}}
summary = {
    "model": run_config.model_name, "corpus": corpus, "hook": first.hook, "stored_rows": len(run), "d_sae": int(first.W_dec.shape[0]),
    "explained_variance": result.explained_variance, "l0": result.l0, "dead_fraction": result.dead_fraction,
    "dead": dead,
    "ce_loss_recovered": result.ce_recovered, "kl": result.kl_spliced,
    "top_latents": {int(k): v for k, v in top_tokens.items()},
    "steering": {"latent": choice.feature, "density": choice.density, "mean_activation": choice.mean_activation,
                 "output_score": choice.output_score, "screen_multiple": knobs.screen_multiple,
                 "top_tokens": [model.tokenizer.decode([t]) for t in choice.top_token_ids],
                 "chosen_coefficient": None if chosen is None else chosen.coefficient,
                 "chosen_multiple": None if chosen is None else chosen.coefficient / choice.mean_activation,
                 "concept_score": {"before": zero.concept_score, "after": after.concept_score},
                 "top_token_probability": {"before": zero.top_token_probability, "after": after.top_token_probability},
                 "perplexity": {"before": zero.perplexity, "after": after.perplexity},
                 "distinct_fraction": {"before": zero.distinct_fraction, "after": after.distinct_fraction},
                 "limits": {"max_perplexity_ratio": knobs.max_perplexity_ratio,
                            "min_distinct_ratio": knobs.min_distinct_ratio},
                 "prompt": sweep.prompts[0], "before": before_text[0], "after": after_text[0],
                 "completions": [{"prompt": p, "before": b, "after": a}
                                 for p, b, a in zip(sweep.prompts, before_text, after_text, strict=True)],
                 "generation": knobs.generation_kwargs(), "dose_response": records},
    "seconds": round(time.perf_counter() - began, 1), "stage_seconds": stage_seconds,
    "analysis_windows": read_json(first.folder / pipeline.DOCUMENTS_FILENAME)["origin"],
    "split": {"method": split.method, "held_out": len(split.held_out), "seed": split.seed},
    "explained_variance_by_subset": {name: scores["explained_variance"] for name, scores in result.subsets.items()},
    "steering_latents_tried": list(tried),
}
atomic_write_json(out / "summary.json", summary)
print(f"\n{first.hook}: explained variance {result.explained_variance:.3f} | L0 {result.l0:.1f} | dead fraction "
      f"{result.dead_fraction:.3f} | CE-loss recovered {result.ce_recovered:.3f} | KL {result.kl_spliced:.4f}")
print(f"dead latents: {dead['training']['fraction']:.3f} silent over the last {dead['training']['window_tokens']:,} "
      f"training tokens, {dead['analysis']['fraction']:.3f} never firing on the {dead['analysis']['tokens']:,} analysed "
      f"held-out tokens, {dead['eval']['fraction']:.3f} on the {dead['eval']['tokens']:,} eval tokens")
print(corpus)
print(f"held-out rows scored: {result.n_rows:,} for reconstruction ({run_config.evaluation.eval_windows} windows drawn "
      f"as training draws them), {result.n_predictions:,} next-token predictions for CE / KL; split "
      f"{summary['split']['method']}, {summary['split']['held_out']} documents held out")
for subset, scores in result.subsets.items():
    print(f"  {subset}: explained variance {scores['explained_variance']:.3f} on {scores['n_rows']:,} rows")
print(f"analysed windows: {summary['analysis_windows']}")
for latent, tokens in top_tokens.items():
    print(f"latent {latent:5d} (density {first.density[latent]:.4f}): top tokens {tokens}")
print(f"steering latent {choice.feature} (density {choice.density:.4f}, top tokens {summary['steering']['top_tokens'][:5]}):")
for r in sweep.records:
    print(f"  coefficient {r.coefficient:7.1f}: concept score {r.concept_score:.3f}, top-token probability "
          f"{r.top_token_probability:.3f}, perplexity {r.perplexity:.1f}, distinct tokens {r.distinct_fraction:.2f}")
if chosen is None:
    print(f"  no coefficient raised the concept score with perplexity within {knobs.max_perplexity_ratio}x and distinct "
          f"tokens above {knobs.min_distinct_ratio}x of the unsteered text; nothing steered")
print(f"  chosen {after.coefficient:.1f}: concept score {zero.concept_score:.3f} -> {after.concept_score:.3f}, "
      f"perplexity {zero.perplexity:.1f} -> {after.perplexity:.1f}, distinct tokens {zero.distinct_fraction:.2f} -> "
      f"{after.distinct_fraction:.2f}")
for prompt, before, steered in zip(sweep.prompts, before_text, after_text, strict=True):
    print(f"  {prompt!r}: {before!r} -> {steered!r}")
print("stage wall times: " + ", ".join(f"{k} {v:.0f} s" for k, v in stage_seconds.items()))
print(f"feature browser: {first.paths['browser'].resolve()}")
print(f"done in {summary['seconds']:.0f} s; open {index.resolve()}")
