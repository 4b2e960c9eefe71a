"""Three SAEs on three hook points from one forward pass: sae_core against SAELens's ``MultiSAETrainingRunner``.

    python -m bench.bench_three_hooks --quick                          # smoke run: 8,192 tokens, 1 warm repeat
    python -m bench.bench_three_hooks --tokens 65536 --repeats 3       # what bench/results holds (~25 min here)

Same work on every row: SmolLM2-135M-Instruct (float32 weights), one TopK SAE (k=32, d_sae 4608)
on each of ``blocks.4/10/16.hook_resid_post``, bfloat16 forward and SAE steps (SAELens
``autocast_lm`` / ``autocast``), batch 4096, context 128 with BOS, special tokens excluded, the
fortunes' training documents, lr 4e-4, constant schedule, the same dead window and budget
(``bench.bench_training.base_config``; ``bench.common.saelens_training_kwargs`` passes the shared
settings and refuses any the peer cannot mirror). Rows, interleaved in every repeat:

* ``ours``: one ``train_saes`` call on the three hooks, set up as the run config does it
  (compiled forward, packed windows, window batches prefetched): one forward to block 16 per
  batch, three SAE steps.
* ``saelens_multi``: ``MultiSAETrainingRunner`` as it ships, the three SAEs named by hook
  (``hook_names`` a mapping), one forward per batch as well; ``saelens_multi_compiled``: the same
  with ``compile_llm`` (its runner does not support ``compile_sae``), compiled inside the timed call.
* Equal start: SAELens gets our three initial SAEs (``override_saes``, built by
  ``build_training_sae`` with our seed), each ``b_dec`` at the mean of one batch of its hook's rows,
  computed on SAELens's clock; its dataset is shuffled.

Repeat 0 is *cold* (each compiled row compiles inside its timed call); the ``--repeats`` after it
are *warm*. Ratios are per warm repeat, reported as median with min-max; compile seconds are the
cold call minus the warm time, and the ratios at 1,048,576 tokens with the compile counted once are
projected from them (labelled ``projected``). Rates are the whole call on both sides.
Target: ours >= 1.3x ``MultiSAETrainingRunner``. Results: ``bench/results/three_hooks.json``
(``--quick``: ``three_hooks_quick.json``).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Any

from bench.bench_training import MULTI_HOOKS, base_config
from bench.bench_training_speed import FULL_TOKENS, equal_start_saes, ours_config, run_ours
from bench.common import load_smollm2, spread, write_result
from sae_core.config import to_json, with_overrides

PRECISION = "bfloat16"


def run_saelens_multi(model: Any, texts: list[str], documents: list[int], cfg: Any, compiled: bool) -> dict[str, Any]:
    """``MultiSAETrainingRunner`` on ``cfg.hook_points`` from our initial SAEs: tokens/s of set-up + ``run()``."""
    import datasets
    from sae_lens import MultiSAETrainingRunner, MultiSAETrainingRunnerConfig

    from bench.common import saelens_training_kwargs, topk_training_config

    hooks = list(cfg.hook_points)
    runner_cfg = MultiSAETrainingRunnerConfig(
        saes={hook: topk_training_config(cfg.sae, model.cfg.d_model) for hook in hooks},
        hook_names={hook: hook for hook in hooks}, autocast=True, autocast_lm=True, compile_llm=compiled,
        **{**saelens_training_kwargs(cfg), "model_name": model.cfg.model_name})
    dataset = datasets.Dataset.from_dict({"text": [texts[i] for i in documents]}).shuffle(seed=cfg.seed)
    start = time.perf_counter()
    saes = equal_start_saes(model, texts, documents, cfg)  # on SAELens's clock
    try:
        runner = MultiSAETrainingRunner(runner_cfg, override_model=model, override_dataset=dataset, override_saes=saes)
        runner.run()
    finally:
        model.__dict__.pop("run_with_cache", None)  # compile_llm rebinds it on the shared model
    seconds = time.perf_counter() - start
    return {"tokens_per_s": cfg.total_steps * cfg.train_batch_size_tokens / seconds, "call_seconds": seconds}


def summarise(cold: dict[str, Any], warm: list[dict[str, Any]], tokens: int) -> dict[str, Any]:
    """Warm ratios (median, min-max), compile seconds from the cold run, 1M-token projections."""
    rates = {row: spread([r[row]["tokens_per_s"] for r in warm]) for row in warm[0]}
    compile_seconds = {row: max(0.0, cold[row]["call_seconds"] - tokens / rates[row]["median"])
                       for row in ("ours", "saelens_multi_compiled")}

    def at(row: str, budget: int) -> float:  # tokens/s of a run of ``budget`` tokens, the compile counted once
        return budget / (budget / rates[row]["median"] + compile_seconds.get(row, 0.0))

    out: dict[str, Any] = {"rates_warm": rates, "rates_cold": {row: cold[row]["tokens_per_s"] for row in cold},
                           "compile_seconds_estimate": compile_seconds}
    for peer in ("saelens_multi", "saelens_multi_compiled"):
        out[f"ours_vs_{peer}_warm"] = spread([r["ours"]["tokens_per_s"] / r[peer]["tokens_per_s"] for r in warm])
        out[f"ours_vs_{peer}_cold_at_{tokens}"] = cold["ours"]["tokens_per_s"] / cold[peer]["tokens_per_s"]
        out[f"ours_vs_{peer}_projected_at_{FULL_TOKENS}"] = at("ours", FULL_TOKENS) / at(peer, FULL_TOKENS)
    out["ours_profile_share"] = {k: spread([r["ours"]["profile"]["share"][k] for r in warm])["median"]
                                 for k in warm[0]["ours"]["profile"]["share"]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="8,192 tokens, one warm repeat (bench/results/three_hooks_quick.json)")
    parser.add_argument("--tokens", type=int, default=65_536, help="tokens per training run (each SAE)")
    parser.add_argument("--repeats", type=int, default=3, help="warm interleaved repeats of every row (after a cold one)")
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.repeats = 8192, 1
    if args.tokens <= 0 or args.repeats <= 0:
        raise SystemExit(f"--tokens ({args.tokens}) and --repeats ({args.repeats}) must be positive")
    logging.basicConfig(level=logging.WARNING)
    from sae_core.corpora import fortunes_corpus
    from sae_core.training import split_documents

    began = time.perf_counter()
    model, texts = load_smollm2("float32"), fortunes_corpus()
    base = with_overrides(base_config(args.tokens), "bench", hook_points=MULTI_HOOKS)
    cfg = ours_config(base, PRECISION, args.tokens)
    documents, _ = split_documents(len(texts), base.evaluation.held_out_documents, base.seed)
    repeats: list[dict[str, Any]] = []
    for repeat in range(args.repeats + 1):  # repeat 0 compiles from scratch (both sides); the others are warm
        rows = {"ours": run_ours(model, texts, documents, cfg)}
        for compiled in (False, True):
            rows["saelens_multi" + ("_compiled" if compiled else "")] = run_saelens_multi(model, texts, documents, cfg,
                                                                                          compiled)
        for name, row in rows.items():
            print(f"{'cold' if repeat == 0 else f'warm {repeat}/{args.repeats}'} {name}: "
                  f"{row['tokens_per_s']:,.0f} tokens/s", flush=True)
        repeats.append(rows)
    summary = summarise(repeats[0], repeats[1:], args.tokens)
    record = {"tokens_per_run": args.tokens, "warm_repeats": args.repeats, "quick": args.quick, "hooks": list(MULTI_HOOKS),
              "precision": PRECISION, "command": " ".join(sys.argv), "config": to_json(cfg),
              "cold": repeats[0], "warm": repeats[1:], "summary": summary,
              "targets": {"ours_ge_1.3x_multi_sae_runner": summary["ours_vs_saelens_multi_warm"]["median"] >= 1.3},
              "wall_seconds": time.perf_counter() - began}
    path = write_result("three_hooks_quick" if args.quick else "three_hooks", record)
    for key, value in summary.items():
        print(key, {k: (round(v, 3) if isinstance(v, float) else v) for k, v in value.items() if k != "values"}
              if isinstance(value, dict) and "median" in value else value)
    print(f"wrote {path} in {record['wall_seconds']:.0f} s")


if __name__ == "__main__":
    main()
