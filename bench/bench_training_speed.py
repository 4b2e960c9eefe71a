"""Training at the speed of the forward pass: our end-to-end rate against the serial limit and SAELens.

    python -m bench.bench_training_speed --tokens 8192 --repeats 1 --precisions bfloat16   # smoke run
    python -m bench.bench_training_speed --tokens 16384 --repeats 3 --precisions bfloat16  # what bench/results holds
    python -m bench.bench_training_speed                                  # 1,048,576 tokens a run, both precisions

Same work on every row: SmolLM2-135M-Instruct (float32 weights), ``blocks.10.hook_resid_post``,
TopK k=32, d_sae 4608, batch 4096, context 128 with BOS, the fortunes' training documents, lr 4e-4
(the constants of ``sae_core/models/smollm2_135m_instruct.py``). Rows, in each repeat, interleaved:

* ``ours_<precision>``: ``train_saes`` as the run config sets it up: compiled forward
  (``ForwardConfig.compile``) on packed windows (``LoaderConfig.pack_windows``), window batches
  prefetched in a thread; forward and SAE step in ``precision``. Its profile (forward / data /
  step / other) is kept.
* ``serial_limit_bfloat16``: right after ``ours_bfloat16``, on the same rows: the compiled forward
  alone over the training stream (already compiled; its own seconds, as the source times them,
  without the wait for the next window batch) and our SAE step alone,
  ``1 / (1/forward + 1/step)`` -- what a loop that never waits for data and does nothing else reaches.
* ``saelens_<precision>``: ``LanguageModelSAETrainingRunner`` as it ships (bf16: ``autocast_lm``,
  ``autocast``), and ``saelens_<precision>_compiled`` with ``compile_llm`` / ``compile_sae``
  (the compile inside the timed run). Equal start: SAELens gets our initial
  SAE (``override_sae``, built by ``build_training_sae`` with our seed), its ``b_dec`` set to the
  mean of one batch of rows, that mean computed on SAELens's clock. Its dataset is shuffled.
* ``ours_<precision>_run_together`` (``--run-together``): ``ours_<precision>`` on documents run
  together (``TRAINING['windows_per_document'] = "run_together"``): the contexts SAELens's
  ``ActivationsStore`` makes, in the order its runner reads them, so both sides forward the same rows.
  Written to ``training_speed_<precisions>_run_together.json``.

Repeat 0 is *cold*: each compiled row compiles for the first time in the process, inside its
timed call (inductor's on-disk cache may be warm from earlier processes, for both sides alike;
nothing is reset between rows, since ``torch._dynamo.reset`` would drop the other side's graphs). The ``--repeats`` after it are *warm*, interleaved row by row; ratios are taken per
warm repeat and reported as median with min-max. Each compiled row's compile time is estimated as
its cold call minus its warm time for the same tokens, and the ratios at 1,048,576 tokens with
the compile counted once are projected from the warm rates and those compile times (labelled
``projected``), so a short run can still answer "compile counted at >= 1M tokens". Rates are the
whole call on both sides (our ``train_saes``, SAELens's runner set-up and ``run``); the fraction of
the serial limit uses our loop's rate (the steps only), as the limit has no set-up either.
Results: ``bench/results/training_speed_<precisions>.json``.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.bench_training import HOOK, STEP_REPEATS, base_config, model_source
from bench.common import load_smollm2, spread, write_result
from sae_core.config import to_json, with_overrides

FULL_TOKENS = 1_048_576


def ours_config(base: Any, precision: str, tokens: int) -> Any:
    return with_overrides(base, "bench", dtype=precision, sae_dtype=precision, total_training_tokens=tokens,
                          compile=True, pack_windows=True)


def run_ours(model: Any, texts: list[str], documents: list[int], cfg: Any) -> dict[str, Any]:
    from sae_core.activations import compiled_forward
    from sae_core.training import hook_widths, train_saes

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        run = train_saes(cfg, model_source(model, texts, documents, cfg), hook_widths(model, cfg.hook_points),
                         Path(tmp), resume=False)
        seconds = time.perf_counter() - start
    compiled = compiled_forward(model)
    # tokens_per_s: the whole call, as SAELens's row counts runner set-up and run; loop: the steps only
    return {"tokens_per_s": run.tokens / seconds, "loop_tokens_per_s": run.tokens_per_second,
            "call_seconds": seconds, "profile": run.profile,
            "compiled_calls": compiled.compiled_calls, "compile_fallback": compiled.disabled,
            "static_shape_calls": compiled.static_calls, "padded_cells": compiled.padded_cells,
            "dynamic_shape_graph_used": any(not static for _, static in compiled.blocks)}


def serial_limit(model: Any, texts: list[str], documents: list[int], cfg: Any) -> dict[str, float]:
    """Compiled forward alone over the training stream, then our step alone on those rows (no data wait)."""
    from sae_core.training import build_training_sae
    from sae_core.training.state import SAEState

    source = model_source(model, texts, documents, cfg)
    stream = source.chunks(0)
    next(stream)  # the forward is compiled already (the run before); this warms the shapes' guards
    rows, chunks = 0, []
    start, forward_seconds = time.perf_counter(), source.profile.seconds["forward"]
    while rows < cfg.total_training_tokens:
        chunk, _ = next(stream)
        chunks.append(chunk[HOOK])
        rows += chunk[HOOK].shape[0]
    # the forward's own seconds (the source times it apart from waiting for the next window batch)
    forward = rows / (source.profile.seconds["forward"] - forward_seconds)
    forward_with_data = rows / (time.perf_counter() - start)
    stream.close()
    x, batch = torch.cat(chunks), cfg.train_batch_size_tokens
    batches = [x[i * batch:(i + 1) * batch] for i in range(min(STEP_REPEATS + 1, x.shape[0] // batch))]
    state = SAEState(HOOK, build_training_sae(cfg, x.shape[1], HOOK, cfg.seed), cfg)
    state.step(batches[0], 0, log=False)  # warm-up
    start = time.perf_counter()
    for i, b in enumerate(batches[1:], 1):
        state.step(b, i, log=False)
    step = (len(batches) - 1) * batch / (time.perf_counter() - start)
    return {"forward_tokens_per_s": forward, "forward_with_data_wait_tokens_per_s": forward_with_data,
            "step_tokens_per_s": step,
            "tokens_per_s": 1 / (1 / forward + 1 / step), "rows_measured": rows}


def equal_start_saes(model: Any, texts: list[str], documents: list[int], cfg: Any) -> dict[str, Any]:
    """Our initial SAE of each hook of ``cfg``, its ``b_dec`` at the mean of one batch of that hook's
    rows (the start our trainer takes)."""
    from sae_core.training import build_training_sae

    cfg = with_overrides(cfg, "bench", compile=False)
    hooks, batch = list(cfg.hook_points), cfg.train_batch_size_tokens
    rows, chunks = 0, {hook: [] for hook in hooks}
    for chunk, _ in model_source(model, texts, documents, cfg).chunks(0):
        for hook in hooks:
            chunks[hook].append(chunk[hook])
        rows += chunk[hooks[0]].shape[0]
        if rows >= batch:
            break
    saes = {hook: build_training_sae(cfg, model.cfg.d_model, hook, cfg.seed) for hook in hooks}
    with torch.no_grad():
        for hook, sae in saes.items():
            sae.b_dec.copy_(torch.cat(chunks[hook])[:batch].float().mean(0))
    return saes


def equal_start_sae(model: Any, texts: list[str], documents: list[int], cfg: Any) -> Any:
    """:func:`equal_start_saes` of ``HOOK`` alone."""
    return equal_start_saes(model, texts, documents, with_overrides(cfg, "bench", hook_points=[HOOK]))[HOOK]


def saelens_runner_config(model: Any, cfg: Any, precision: str, compiled: bool,
                          sae_kwargs: dict[str, Any] | None = None, **runner_kwargs: Any) -> Any:
    """``LanguageModelSAERunnerConfig`` of ``cfg``'s work on ``HOOK`` (``bench.common.saelens_training_kwargs``):
    bf16 through its ``autocast`` / ``autocast_lm``; ``sae_kwargs`` / ``runner_kwargs`` override its fields."""
    from sae_lens import LanguageModelSAERunnerConfig

    from bench.common import saelens_training_kwargs, topk_training_config

    autocast = precision == "bfloat16"
    return LanguageModelSAERunnerConfig(
        sae=topk_training_config(cfg.sae, model.cfg.d_model, **(sae_kwargs or {})), hook_name=HOOK, is_dataset_tokenized=False,
        autocast=autocast, autocast_lm=autocast, compile_llm=compiled, compile_sae=compiled, verbose=False,
        **{**saelens_training_kwargs(cfg), "model_name": model.cfg.model_name, **runner_kwargs})


def train_saelens(model: Any, texts: list[str], documents: list[int], cfg: Any, precision: str, compiled: bool,
                  equal_start: bool = True, sae_kwargs: dict[str, Any] | None = None,
                  **runner_kwargs: Any) -> tuple[Any, float]:
    """One ``LanguageModelSAETrainingRunner`` run on ``cfg``'s work: (the trained SAE, wall seconds of
    the start, set-up and ``run``). ``equal_start``: from our initial SAE (:func:`equal_start_sae`,
    on SAELens's clock), else from SAELens's own; ``sae_kwargs`` / ``runner_kwargs`` override the
    SAE's / the runner's config."""
    import datasets
    from sae_lens import LanguageModelSAETrainingRunner

    runner_cfg = saelens_runner_config(model, cfg, precision, compiled, sae_kwargs, **runner_kwargs)
    dataset = datasets.Dataset.from_dict({"text": [texts[i] for i in documents]}).shuffle(seed=cfg.seed)
    start = time.perf_counter()
    sae = equal_start_sae(model, texts, documents, cfg) if equal_start else None  # on SAELens's clock
    try:
        runner = LanguageModelSAETrainingRunner(runner_cfg, override_model=model, override_dataset=dataset,
                                                override_sae=sae)
        trained = runner.run()
    finally:
        model.__dict__.pop("run_with_cache", None)  # compile_llm rebinds it on the shared model
    return trained, time.perf_counter() - start


def run_saelens(model: Any, texts: list[str], documents: list[int], cfg: Any, precision: str,
                compiled: bool) -> dict[str, Any]:
    _, seconds = train_saelens(model, texts, documents, cfg, precision, compiled)
    return {"tokens_per_s": cfg.total_steps * cfg.train_batch_size_tokens / seconds, "call_seconds": seconds}


def summarise(cold: dict[str, Any], warm: list[dict[str, Any]], precisions: list[str], tokens: int) -> dict[str, Any]:
    """Warm ratios (median, min-max over repeats), compile seconds from the cold run, 1M-token projections."""
    def ratio(a: str, b: str, key: str = "tokens_per_s") -> dict[str, Any]:
        return spread([r[a][key] / r[b]["tokens_per_s"] for r in warm])

    rates = {row: spread([r[row]["tokens_per_s"] for r in warm]) for row in warm[0]}
    compile_seconds = {row: max(0.0, cold[row]["call_seconds"] - tokens / rates[row]["median"])
                       for row in cold if row.startswith("ours_") or row.endswith("_compiled")}

    def at(row: str, budget: int) -> float:  # tokens/s of a run of ``budget`` tokens, the compile counted once
        return budget / (budget / rates[row]["median"] + compile_seconds.get(row, 0.0))

    out: dict[str, Any] = {"rates_warm": rates, "rates_cold": {row: cold[row]["tokens_per_s"] for row in cold},
                           "compile_seconds_estimate": compile_seconds}
    if "bfloat16" in precisions:
        out["bfloat16_fraction_of_serial_limit"] = ratio("ours_bfloat16", "serial_limit_bfloat16", "loop_tokens_per_s")
    for p in precisions:
        for peer in (f"saelens_{p}", f"saelens_{p}_compiled"):
            out[f"ours_{p}_vs_{peer}_warm"] = ratio(f"ours_{p}", peer)
            if f"ours_{p}_run_together" in warm[0]:
                out[f"ours_{p}_run_together_vs_{peer}_warm"] = ratio(f"ours_{p}_run_together", peer)
            out[f"ours_{p}_vs_{peer}_cold_at_{tokens}"] = cold[f"ours_{p}"]["tokens_per_s"] / cold[peer]["tokens_per_s"]
            out[f"ours_{p}_vs_{peer}_projected_at_{FULL_TOKENS}"] = at(f"ours_{p}", FULL_TOKENS) / at(peer, FULL_TOKENS)
        shares = [r[f"ours_{p}"]["profile"]["share"] for r in warm]
        out[f"ours_{p}_profile_share"] = {k: statistics.median(s[k] for s in shares) for k in shares[0]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=FULL_TOKENS, help="tokens per training run")
    parser.add_argument("--repeats", type=int, default=3, help="warm interleaved repeats of every row (after a cold one)")
    parser.add_argument("--precisions", default="bfloat16,float32", help="comma-separated")
    parser.add_argument("--run-together", action="store_true",
                        help="also ours on documents run together (the rows SAELens trains on)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from sae_core.corpora import fortunes_corpus
    from sae_core.training import split_documents

    precisions = args.precisions.split(",")
    began = time.perf_counter()
    model, texts, base = load_smollm2("float32"), fortunes_corpus(), base_config(args.tokens)
    documents, _ = split_documents(len(texts), base.evaluation.held_out_documents, base.seed)
    repeats: list[dict[str, Any]] = []
    for repeat in range(args.repeats + 1):  # repeat 0 compiles from scratch (both sides); the others are warm
        rows: dict[str, Any] = {}
        for precision in precisions:
            cfg = ours_config(base, precision, args.tokens)
            rows[f"ours_{precision}"] = run_ours(model, texts, documents, cfg)
            if args.run_together:
                joined = with_overrides(cfg, "bench", windows_per_document="run_together")
                rows[f"ours_{precision}_run_together"] = run_ours(model, texts, documents, joined)
            if precision == "bfloat16":
                rows["serial_limit_bfloat16"] = serial_limit(model, texts, documents, cfg)
            for compiled in (False, True):
                name = f"saelens_{precision}" + ("_compiled" if compiled else "")
                rows[name] = run_saelens(model, texts, documents, cfg, precision, compiled)
            for name in [n for n in rows if precision in n]:
                print(f"{'cold' if repeat == 0 else f'warm {repeat}/{args.repeats}'} {name}: "
                      f"{rows[name]['tokens_per_s']:,.0f} tokens/s", flush=True)
        repeats.append(rows)
    record = {"tokens_per_run": args.tokens, "warm_repeats": args.repeats, "hook": HOOK, "precisions": precisions,
              "command": " ".join(sys.argv), "config": to_json(ours_config(base, precisions[0], args.tokens)),
              "cold": repeats[0], "warm": repeats[1:],
              "summary": summarise(repeats[0], repeats[1:], precisions, args.tokens),
              "wall_seconds": time.perf_counter() - began}
    path = write_result("training_speed_" + "_".join(precisions) + ("_run_together" if args.run_together else ""), record)
    for key, value in record["summary"].items():
        print(key, {k: (round(v, 3) if isinstance(v, float) else v) for k, v in value.items() if k != "values"}
              if isinstance(value, dict) and "median" in value else value)
    print(f"wrote {path} in {record['wall_seconds']:.0f} s")


if __name__ == "__main__":
    main()
