"""SAE quality at each side's best learning rate: sae_core and SAELens from the same start on the same work.

    python -m bench.bench_lr_quality --quick                      # smoke run: 8,192 tokens, two rates
    python -m bench.bench_lr_quality                              # 65,536 tokens a run (~25 min here)

Work (``bench.bench_training.base_config``, the settings ``bench.bench_training_speed`` times):
SmolLM2-135M-Instruct (float32 weights), ``blocks.10.hook_resid_post``, TopK k=32, d_sae 4608,
bfloat16 forward and SAE step (SAELens ``autocast_lm`` / ``autocast``), batch 4096, context 128 with
BOS, special tokens excluded, the fortunes' training documents, constant schedule, the same dead
window and budget. For each learning rate of ``--lrs``:

* ``ours``: ``train_saes`` from the model (eager: the compile changes speed, not the result);
* ``saelens``: ``LanguageModelSAETrainingRunner`` from our initial SAE (``override_sae``, ``b_dec`` at
  the mean of one batch), its dataset shuffled.

Then, at SAELens's best rate, ``saelens_normalized``: SAELens as its docs suggest,
``normalize_activations="expected_average_only_in"``, from its own initial SAE (``b_dec`` at zero:
the scaled space has no mean start to share), its norm estimated from
``--norm-batches`` batches (its default, 1,000 batches of 4,096 rows, would forward 4M tokens).

Every SAE is scored on the same held-out rows (one window of each held-out document, forwarded
once and kept): explained variance (1 - FVU, against the mean), L0 and the latents that never fire
there. "Best" is the rate with the highest of that explained variance. Each side's best SAE and the
normalised one are also run through ``HeldOutEvaluator`` (CE-loss recovered, KL; float32 forward)
on the first ``--ce-documents`` held-out documents: 4 full forwards a batch make it the slow part.
Results: ``bench/results/lr_quality.json`` (``--quick``: ``lr_quality_quick.json``).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.bench_training import HOOK, base_config, model_source, run_ours
from bench.bench_training_speed import train_saelens
from bench.common import load_smollm2, write_result
from bench.lr_sweep import held_out_scores, stream_rows
from sae_core.config import to_json, with_overrides

LRS = (1e-3, 2e-3, 4e-3, 8e-3)
TOKENS = 65_536
PRECISION = "bfloat16"


def ce_scores(result: Any) -> dict[str, float]:
    return {"ce_recovered": result.ce_recovered, "kl": result.kl_spliced, "eval_explained_variance": result.explained_variance}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="8,192 tokens, two rates (lr_quality_quick.json)")
    parser.add_argument("--tokens", type=int, default=TOKENS, help="tokens per training run")
    parser.add_argument("--lrs", default=",".join(f"{lr:g}" for lr in LRS), help="comma-separated learning rates")
    parser.add_argument("--norm-batches", type=int, default=8,
                        help="batches SAELens estimates its normalisation from (its default: 1000)")
    parser.add_argument("--ce-documents", type=int, default=128, help="held-out documents of the CE-loss evaluation")
    args = parser.parse_args()
    lrs = [float(v) for v in args.lrs.split(",")]
    if args.quick:
        args.tokens, lrs = 8192, lrs[:2]
    if args.tokens <= 0 or not lrs or min(lrs) <= 0 or args.norm_batches <= 0 or args.ce_documents <= 0:
        raise SystemExit(f"--tokens ({args.tokens}), every --lrs ({lrs}), --norm-batches ({args.norm_batches}) and "
                         f"--ce-documents ({args.ce_documents}) must be positive")
    logging.basicConfig(level=logging.WARNING)
    from sae_core.corpora import fortunes_corpus
    from sae_core.training import HeldOutEvaluator, split_documents, to_inference_sae

    began = time.perf_counter()
    model, texts, base = load_smollm2("float32"), fortunes_corpus(), base_config(args.tokens)
    documents, held_out = split_documents(len(texts), base.evaluation.held_out_documents, base.seed)
    rows = stream_rows(model_source(model, texts, held_out, base), HOOK, None)  # one window per held-out document
    evaluator = HeldOutEvaluator(model, texts, held_out[:args.ce_documents], with_overrides(base, "bench", dtype="float32"))
    results: dict[str, dict[str, Any]] = {"ours": {}, "saelens": {}}
    trained_saes: dict[str, dict[str, Any]] = {"ours": {}, "saelens": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for lr in lrs:
            cfg = with_overrides(base, "bench", dtype=PRECISION, sae_dtype=PRECISION, lr=lr)
            start = time.perf_counter()
            run, _, _ = run_ours(model, texts, documents, cfg, Path(tmp) / f"lr{lr:g}")
            trained_saes["ours"][f"{lr:g}"] = run.saes[HOOK].sae
            results["ours"][f"{lr:g}"] = {**held_out_scores(run.saes[HOOK].sae, rows),
                                          "seconds": time.perf_counter() - start}
            sae, seconds = train_saelens(model, texts, documents, cfg, PRECISION, compiled=False)
            trained_saes["saelens"][f"{lr:g}"] = to_inference_sae(sae)
            results["saelens"][f"{lr:g}"] = {**held_out_scores(trained_saes["saelens"][f"{lr:g}"], rows), "seconds": seconds}
            print(f"lr {lr:g}: ours {results['ours'][f'{lr:g}']}\n        saelens {results['saelens'][f'{lr:g}']}",
                  flush=True)
    best = {side: max(scored, key=lambda lr: scored[lr]["explained_variance"]) for side, scored in results.items()}
    for side, lr in best.items():  # CE-loss recovered and KL for each side's best
        results[side][lr].update(ce_scores(evaluator(HOOK, trained_saes[side][lr])))
    cfg = with_overrides(base, "bench", dtype=PRECISION, sae_dtype=PRECISION, lr=float(best["saelens"]))
    sae, seconds = train_saelens(model, texts, documents, cfg, PRECISION, compiled=False, equal_start=False,
                                 sae_kwargs={"normalize_activations": "expected_average_only_in"},
                                 n_batches_for_norm_estimate=args.norm_batches)
    sae = to_inference_sae(sae)
    normalized = {"lr": best["saelens"], "norm_batches": args.norm_batches, **held_out_scores(sae, rows),
                  "seconds": seconds, **ce_scores(evaluator(HOOK, sae))}
    print(f"saelens normalized at lr {best['saelens']}: {normalized}", flush=True)
    record = {"tokens_per_run": args.tokens, "quick": args.quick, "hook": HOOK, "precision": PRECISION, "lrs": lrs,
              "held_out_documents": len(held_out), "held_out_rows": int(rows.shape[0]),
              "ce_documents": min(args.ce_documents, len(held_out)), "command": " ".join(sys.argv),
              "config": to_json(with_overrides(base, "bench", dtype=PRECISION, sae_dtype=PRECISION)),
              "results": results, "best_lr": best, "saelens_normalized": normalized,
              "wall_seconds": time.perf_counter() - began}
    path = write_result("lr_quality_quick" if args.quick else "lr_quality", record)
    print(f"best: {best}\nwrote {path} in {record['wall_seconds']:.0f} s")


if __name__ == "__main__":
    main()
