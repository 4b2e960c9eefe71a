"""SAE quality with the data format taken out: ours trained on SAELens's own contexts, against SAELens.

    python -m bench.quality_same_contexts --quick      # smoke run: 8,192 tokens, two seeds
    python -m bench.quality_same_contexts              # 65,536 tokens, three seeds (~16 min here)

``bench_lr_quality`` compares the two sides end to end, each on its own data format: ours trains on
its windows (one document each), SAELens on its contexts (documents run together). Each side then
scores higher in the format it trained on. This bench takes the format out, twice: our trainer on
SAELens's own rows, and our whole pipeline on documents run together as SAELens runs them.

* ``ours_on_saelens_contexts``: our trainer (``train_from_activations``) on the rows SAELens's
  ``ActivationsStore`` makes from the same training documents in the order its runner reads them
  (the dataset shuffled with the run's seed; the same runner config: bf16 forward, context 128,
  special tokens dropped): the first ``--tokens`` rows, one pass, shuffled by our block shuffler.
* ``ours_run_together``: our pipeline end to end (``train_saes`` from the model, as ``bench_lr_quality``
  runs ours) with ``windows_per_document="run_together"``: the training documents, in our seeded
  order, run together into 128-token contexts with BOS first and between documents, as SAELens's
  ``ActivationsStore`` makes them (the row layout is tested against its ``concat_and_batch_sequences``).
  The same documents, format and order as SAELens: epoch 0 takes the documents in the permutation
  ``datasets.Dataset.shuffle(seed)`` draws (``np.random.default_rng(seed)``; ours draws from
  ``(seed, epoch)``, the same stream at epoch 0), so these are the rows of the side above, forwarded
  by our pipeline; the record says, per seed, whether the two SAEs came out bitwise the same.
* ``saelens``: ``LanguageModelSAETrainingRunner`` as in ``bench_lr_quality`` (from our initial SAE,
  ``b_dec`` at the mean of one batch of our windows; its dataset shuffled with the same seed).

Same work otherwise (``bench.bench_training.base_config``): TopK k=32, d_sae 4608, batch 4096,
constant schedule at ``--lr`` (8e-3, both sides' best in ``bench_lr_quality``), bf16 SAE step, the
same initial weights (seeded), the same dead window and budget. What still differs, named in the
table: the rows are the same contexts but not the same draw (SAELens mixes a larger buffer of
contexts and trains on part of it; ours trains on the first rows in its own shuffle), and our
``b_dec`` starts at the mean of the first batch of those rows, SAELens's at the mean of a batch of
our windows. Each seed (0, 1, ...) sets the initial SAE, the shuffle of the documents and of the
rows. Scores as in ``bench_lr_quality``: held-out EV in both formats (the same 512 held-out
documents) and CE-loss recovered on the first ``--ce-documents``. Results:
``bench/results/quality_same_contexts.json`` (``--quick``: ``..._quick.json``).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.bench_lr_quality import PRECISION, TOKENS, ce_scores, saelens_format_rows
from bench.bench_training import HOOK, base_config, model_source, run_ours
from bench.bench_training_speed import train_saelens
from bench.common import load_smollm2, spread, write_result
from bench.lr_sweep import held_out_scores, stream_rows
from sae_core.config import to_json, with_overrides

LR = 8e-3
SIDES = ("ours_on_saelens_contexts", "ours_run_together", "saelens")
OURS = SIDES[:2]
METRICS = ("explained_variance", "saelens_format_explained_variance", "ce_recovered")


def summarise(repeats: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Each side's median and min-max over the seeds; ours within the peer's noise or better (our median at
    least the peer's lowest seed), as ``bench_lr_quality`` judges it."""
    flat = {side: [{"explained_variance": r["explained_variance"], "ce_recovered": r["ce_recovered"],
                    "saelens_format_explained_variance": r["saelens_format"]["explained_variance"]} for r in runs]
            for side, runs in repeats.items()}
    out: dict[str, Any] = {side: {m: spread([r[m] for r in runs]) for m in METRICS} for side, runs in flat.items()}
    out["within_noise_or_better"] = {side: {m: out[side][m]["median"] >= out["saelens"][m]["min"] for m in METRICS}
                                     for side in OURS}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="8,192 tokens, two seeds (quality_same_contexts_quick.json)")
    parser.add_argument("--tokens", type=int, default=TOKENS, help="tokens per training run")
    parser.add_argument("--lr", type=float, default=LR, help="learning rate of both sides")
    parser.add_argument("--repeats", type=int, default=3, help="seeds (0, 1, ...)")
    parser.add_argument("--ce-documents", type=int, default=128, help="held-out documents of the CE-loss evaluation")
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.repeats = 8192, 2
    if args.tokens <= 0 or args.lr <= 0 or args.repeats <= 0 or args.ce_documents <= 0:
        raise SystemExit(f"--tokens ({args.tokens}), --lr ({args.lr}), --repeats ({args.repeats}) and --ce-documents "
                         f"({args.ce_documents}) must be positive")
    logging.basicConfig(level=logging.WARNING)
    from sae_core.corpora import fortunes_corpus
    from sae_core.training import (
        HeldOutEvaluator,
        split_documents,
        to_inference_sae,
        train_from_activations,
    )

    began = time.perf_counter()
    model, texts, base = load_smollm2("float32"), fortunes_corpus(), base_config(args.tokens)
    documents, held_out = split_documents(len(texts), base.evaluation.held_out_documents, base.seed)
    rows = stream_rows(model_source(model, texts, held_out, base), HOOK, None)  # one window per held-out document
    run_together = saelens_format_rows(model, texts, held_out, base)
    evaluator = HeldOutEvaluator(model, texts, held_out[:args.ce_documents],
                                 with_overrides(base, "bench", dtype="float32", eval_windows=args.ce_documents,
                                                ce_windows=args.ce_documents))

    def score(sae: Any, seconds: float) -> dict[str, Any]:
        return {**held_out_scores(sae, rows), "saelens_format": held_out_scores(sae, run_together), "seconds": seconds,
                **ce_scores(evaluator(HOOK, sae))}

    repeats: dict[str, list[dict[str, Any]]] = {side: [] for side in SIDES}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.repeats):
            cfg = with_overrides(base, "bench", dtype=PRECISION, sae_dtype=PRECISION, lr=args.lr, seed=base.seed + seed)
            start = time.perf_counter()
            contexts = saelens_format_rows(model, texts, documents, cfg, shuffle_seed=cfg.seed, limit=args.tokens)
            run = train_from_activations(lambda contexts=contexts: [contexts], cfg, Path(tmp) / f"ours{seed}", resume=False)
            ours = run.saes[HOOK].sae
            repeats[SIDES[0]].append({"seed": seed, **score(ours, time.perf_counter() - start)})
            start = time.perf_counter()
            joined = with_overrides(cfg, "bench", windows_per_document="run_together")
            run, _, _ = run_ours(model, texts, documents, joined, Path(tmp) / f"joined{seed}")
            weights = zip(ours.state_dict().values(), run.saes[HOOK].sae.state_dict().values(), strict=True)
            repeats["ours_run_together"].append({"seed": seed, **score(run.saes[HOOK].sae, time.perf_counter() - start),
                                                 "same_weights_as_ours_on_saelens_contexts": all(
                                                     torch.equal(a, b) for a, b in weights)})
            trained, seconds = train_saelens(model, texts, documents, cfg, PRECISION, compiled=False)
            repeats["saelens"].append({"seed": seed, **score(to_inference_sae(trained), seconds)})
            print(f"seed {seed}: " + "; ".join(f"{side} {repeats[side][-1]}" for side in SIDES), flush=True)
    record = {"tokens_per_run": args.tokens, "quick": args.quick, "hook": HOOK, "precision": PRECISION, "lr": args.lr,
              "held_out_documents": len(held_out), "held_out_rows": int(rows.shape[0]),
              "saelens_format_rows": int(run_together.shape[0]), "ce_documents": min(args.ce_documents, len(held_out)),
              "command": " ".join(sys.argv), "config": to_json(with_overrides(base, "bench", dtype=PRECISION,
                                                                            sae_dtype=PRECISION, lr=args.lr)),
              "repeats": repeats, "summary": summarise(repeats), "wall_seconds": time.perf_counter() - began}
    path = write_result("quality_same_contexts_quick" if args.quick else "quality_same_contexts", record)
    print(f"summary: {record['summary']}\nwrote {path} in {record['wall_seconds']:.0f} s")


if __name__ == "__main__":
    main()
