"""SAE quality at each side's best learning rate: sae_core and SAELens from the same start on the same work.

    python -m bench.bench_lr_quality --quick                      # smoke run: 8,192 tokens, two rates, two seeds
    python -m bench.bench_lr_quality                              # 65,536 tokens a run (~45 min here)

Work (``bench.bench_training.base_config``, the settings ``bench.bench_training_speed`` times):
SmolLM2-135M-Instruct (float32 weights), ``blocks.10.hook_resid_post``, TopK k=32, d_sae 4608,
bfloat16 forward and SAE step (SAELens ``autocast_lm`` / ``autocast``), batch 4096, context 128 with
BOS, special tokens excluded, the fortunes' training documents, constant schedule, the same dead
window and budget. For each learning rate of ``--lrs`` (seed 0):

* ``ours``: ``train_saes`` from the model (eager: the compile changes speed, not the result);
* ``saelens``: ``LanguageModelSAETrainingRunner`` from our initial SAE (``override_sae``, ``b_dec`` at
  the mean of one batch), its dataset shuffled.

The default grid doubles from 4e-3 to 1.6e-2: a first run over 1e-3 .. 8e-3 put both sides' best at
its top (8e-3) and each halving below it lower on both (EV 0.65 / 0.64 at 4e-3, 0.54 / 0.54 at 2e-3,
0.37 / 0.36 at 1e-3), so the grid moved up one step. At each side's best rate, ``--repeats`` seeds
(0, 1, ...) each train both sides again from a new equal start (the seed sets our initial SAE, which
SAELens gets too, the window draw and shuffle on ours and the dataset shuffle on SAELens's); the
split of documents stays that of seed 0, so every SAE is scored on the same held-out documents.

Then, at SAELens's best rate, ``saelens_normalized``: SAELens as its docs suggest,
``normalize_activations="expected_average_only_in"``, from its own initial SAE (``b_dec`` at zero:
the scaled space has no mean start to share), its norm estimated from
``--norm-batches`` batches (its default, 1,000 batches of 4,096 rows, would forward 4M tokens).

Every SAE is scored on the held-out documents in both context formats, each forwarded once and kept:

* ours (``explained_variance`` ...): one window of each held-out document, as our trainer draws them;
* SAELens's (``saelens_format``): the held-out documents run together into 128-token contexts by
  SAELens's own ``ActivationsStore`` (BOS first and between documents), as its runner trains.

Scores: explained variance (1 - FVU, against the mean of those rows), L0 and the latents that never
fire there; special tokens are excluded in both. "Best" is the rate with the highest explained
variance in our format. Every SAE of the seed repeats, and the normalised one, is also run through
``HeldOutEvaluator`` (CE-loss recovered, KL; float32 forward, our format) on the first
``--ce-documents`` held-out documents. Results: ``bench/results/lr_quality.json`` (``--quick``:
``lr_quality_quick.json``); ``summary`` gives each side's median and min-max over the seeds.
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

from bench.bench_training import HOOK, base_config, model_source, run_ours
from bench.bench_training_speed import saelens_runner_config, train_saelens
from bench.common import load_smollm2, spread, write_result
from bench.lr_sweep import held_out_scores, stream_rows
from sae_core.config import to_json, with_overrides

LRS = (4e-3, 8e-3, 1.6e-2)
TOKENS = 65_536
PRECISION = "bfloat16"
SIDES = ("ours", "saelens")
METRICS = ("explained_variance", "saelens_format_explained_variance", "ce_recovered")
"""What the seed repeats summarise: EV in our format, EV in SAELens's, CE-loss recovered (our format)."""


def saelens_format_rows(model: Any, texts: list[str], documents: list[int], cfg: Any, shuffle_seed: int | None = None,
                        limit: int | None = None) -> torch.Tensor:
    """``documents`` as SAELens's runner would train on them: run together into contexts by its
    ``ActivationsStore`` (same runner config), forwarded by it, special tokens dropped; every full context,
    or (``limit``) the first ``limit`` rows. ``shuffle_seed``: the documents in the order SAELens's
    runner reads them in ``train_saelens`` (its dataset shuffled with that seed)."""
    import datasets
    from sae_lens.training.activations_store import ActivationsStore

    runner_cfg = saelens_runner_config(model, cfg, PRECISION, compiled=False)
    dataset = datasets.Dataset.from_dict({"text": [texts[i] for i in documents]})
    dataset = dataset.shuffle(seed=shuffle_seed) if shuffle_seed is not None else dataset
    store = ActivationsStore.from_config(model, runner_cfg, override_dataset=dataset)
    rows, done, total = [], False, 0
    while not done and (limit is None or total < limit):
        contexts = []
        try:
            while len(contexts) < store.store_batch_size_prompts:
                contexts.append(store.get_batch_tokens(1, raise_at_epoch_end=True))
        except StopIteration:  # the last, partial context is dropped, as SAELens drops it
            done = True
        if contexts:
            tokens = torch.cat(contexts)[:, slice(*store.seqpos_slice)]  # as its get_raw_llm_batch slices them
            activations = store.get_activations(torch.cat(contexts)).reshape(-1, store.d_in)
            token_ids = tokens.reshape(-1)
            keep = torch.ones_like(token_ids, dtype=torch.bool) if store.exclude_special_tokens is None else \
                ~torch.isin(token_ids, store.exclude_special_tokens)
            rows.append(activations[keep].float())
            total += rows[-1].shape[0]
    if limit is not None and total < limit:
        raise SystemExit(f"the documents give {total:,} rows in SAELens's contexts, fewer than the {limit:,} asked for")
    return torch.cat(rows)[:limit]


def ce_scores(result: Any) -> dict[str, float]:
    return {"ce_recovered": result.ce_recovered, "kl": result.kl_spliced, "eval_explained_variance": result.explained_variance}


def summarise(repeats: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Each side's median and min-max over the seeds, and whether ours is within the peer's noise or better
    (our median at least the peer's lowest seed)."""
    flat = {side: [{"explained_variance": r["explained_variance"], "ce_recovered": r["ce_recovered"],
                    "saelens_format_explained_variance": r["saelens_format"]["explained_variance"]} for r in runs]
            for side, runs in repeats.items()}
    out: dict[str, Any] = {side: {m: spread([r[m] for r in runs]) for m in METRICS} for side, runs in flat.items()}
    out["within_noise_or_better"] = {m: out["ours"][m]["median"] >= out["saelens"][m]["min"] for m in METRICS}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="8,192 tokens, two rates, two seeds (lr_quality_quick.json)")
    parser.add_argument("--tokens", type=int, default=TOKENS, help="tokens per training run")
    parser.add_argument("--lrs", default=",".join(f"{lr:g}" for lr in LRS), help="comma-separated learning rates")
    parser.add_argument("--repeats", type=int, default=3, help="seeds at each side's best rate (seed 0 included)")
    parser.add_argument("--norm-batches", type=int, default=8,
                        help="batches SAELens estimates its normalisation from (its default: 1000)")
    parser.add_argument("--ce-documents", type=int, default=128, help="held-out documents of the CE-loss evaluation")
    args = parser.parse_args()
    lrs = [float(v) for v in args.lrs.split(",")]
    if args.quick:
        args.tokens, lrs, args.repeats = 8192, lrs[:2], 2
    if (args.tokens <= 0 or not lrs or min(lrs) <= 0 or args.repeats <= 0 or args.norm_batches <= 0
            or args.ce_documents <= 0):
        raise SystemExit(f"--tokens ({args.tokens}), every --lrs ({lrs}), --repeats ({args.repeats}), --norm-batches "
                         f"({args.norm_batches}) and --ce-documents ({args.ce_documents}) must be positive")
    logging.basicConfig(level=logging.WARNING)
    from sae_core.corpora import fortunes_corpus
    from sae_core.training import HeldOutEvaluator, split_documents, to_inference_sae

    began = time.perf_counter()
    model, texts, base = load_smollm2("float32"), fortunes_corpus(), base_config(args.tokens)
    documents, held_out = split_documents(len(texts), base.evaluation.held_out_documents, base.seed)
    rows = stream_rows(model_source(model, texts, held_out, base), HOOK, None)  # one window per held-out document
    run_together = saelens_format_rows(model, texts, held_out, base)
    evaluator = HeldOutEvaluator(model, texts, held_out[:args.ce_documents],  # every window scored for CE too
                                 with_overrides(base, "bench", dtype="float32", eval_windows=args.ce_documents,
                                                ce_windows=args.ce_documents))

    def score(sae: Any, seconds: float) -> dict[str, Any]:
        return {**held_out_scores(sae, rows), "saelens_format": held_out_scores(sae, run_together), "seconds": seconds}

    def train(side: str, cfg: Any, where: Path) -> tuple[Any, dict[str, Any]]:
        start = time.perf_counter()
        if side == "ours":
            run, _, _ = run_ours(model, texts, documents, cfg, where)
            sae, seconds = run.saes[HOOK].sae, time.perf_counter() - start
        else:
            trained, seconds = train_saelens(model, texts, documents, cfg, PRECISION, compiled=False)
            sae = to_inference_sae(trained)
        return sae, score(sae, seconds)

    def config(lr: float, seed: int) -> Any:
        return with_overrides(base, "bench", dtype=PRECISION, sae_dtype=PRECISION, lr=lr, seed=base.seed + seed)

    results: dict[str, dict[str, Any]] = {side: {} for side in SIDES}
    repeats: dict[str, list[dict[str, Any]]] = {side: [] for side in SIDES}
    with tempfile.TemporaryDirectory() as tmp:
        trained_saes: dict[str, dict[str, Any]] = {side: {} for side in SIDES}
        for lr in lrs:
            for side in SIDES:
                trained_saes[side][f"{lr:g}"], results[side][f"{lr:g}"] = train(side, config(lr, 0), Path(tmp) / f"{side}{lr:g}")
            print(f"lr {lr:g}: " + "; ".join(f"{side} {results[side][f'{lr:g}']}" for side in SIDES), flush=True)
        best = {side: max(scored, key=lambda lr: scored[lr]["explained_variance"]) for side, scored in results.items()}
        for side, lr in best.items():  # CE-loss recovered and KL for each side's best, then its other seeds
            results[side][lr].update(ce_scores(evaluator(HOOK, trained_saes[side][lr])))
            repeats[side].append({"seed": 0, **results[side][lr]})
        for seed in range(1, args.repeats):
            for side in SIDES:  # interleaved: ours then SAELens, seed by seed
                sae, scored = train(side, config(float(best[side]), seed), Path(tmp) / f"{side}_seed{seed}")
                repeats[side].append({"seed": seed, **scored, **ce_scores(evaluator(HOOK, sae))})
                print(f"seed {seed} {side} at lr {best[side]}: {repeats[side][-1]}", flush=True)
    cfg = config(float(best["saelens"]), 0)
    sae, seconds = train_saelens(model, texts, documents, cfg, PRECISION, compiled=False, equal_start=False,
                                 sae_kwargs={"normalize_activations": "expected_average_only_in"},
                                 n_batches_for_norm_estimate=args.norm_batches)
    sae = to_inference_sae(sae)
    normalized = {"lr": best["saelens"], "norm_batches": args.norm_batches, **score(sae, seconds),
                  **ce_scores(evaluator(HOOK, sae))}
    print(f"saelens normalized at lr {best['saelens']}: {normalized}", flush=True)
    record = {"tokens_per_run": args.tokens, "quick": args.quick, "hook": HOOK, "precision": PRECISION, "lrs": lrs,
              "held_out_documents": len(held_out), "held_out_rows": int(rows.shape[0]),
              "saelens_format_rows": int(run_together.shape[0]),
              "ce_documents": min(args.ce_documents, len(held_out)), "command": " ".join(sys.argv),
              "config": to_json(with_overrides(base, "bench", dtype=PRECISION, sae_dtype=PRECISION)),
              "results": results, "best_lr": best, "repeats": repeats, "summary": summarise(repeats),
              "saelens_normalized": normalized, "wall_seconds": time.perf_counter() - began}
    path = write_result("lr_quality_quick" if args.quick else "lr_quality", record)
    print(f"best: {best}\nsummary: {record['summary']}\nwrote {path} in {record['wall_seconds']:.0f} s")


if __name__ == "__main__":
    main()
