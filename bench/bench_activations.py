"""Activation extraction throughput: ``sae_core.store.save`` vs the bare forward and SAELens.

    python -m bench.bench_activations            # full run (~1 h 50 min with 3 repeats of the 1M-token runs)
    python -m bench.bench_activations --quick    # smoke run (a few minutes), validates the pipeline

Writes ``bench/results/bench_activations[_quick].json``. On SmolLM2-135M-Instruct (CPU), for each
forward precision (float32; bfloat16 autocast) with every peer in the same precision:

* (a) the bare forward with ``stop_at_layer`` just past the hook, no hooks, on (a1) packed 32 x 128
  token batches of the same text (documents run together, as SAELens does) and (a2p, a2t) the
  very batches our loader produces for (bp, bt), tokenised beforehand (no attention mask: the
  bare cost of the same cells);
* (b) ``save(...)`` end to end (tokenising, forward, masking, shard writing with fsync and hashing)
  with ``batch_tokens=32 * 128``: (bpc) with ``pack_windows=True`` and ``compile_forward=True``,
  the headline: windows share 128-token rows, kept apart by the attention mask, so a pass is
  32 x 128 real tokens as SAELens's, and the same TransformerLens forward runs through
  ``torch.compile``; (bp) the same with the eager forward; (bt) eager, without packing: each
  window its own row, short ones many to a pass, with the padding of length-sorted batches;
* (a2pc) the compiled forward alone (``run_to_hooks(..., compile=True)``) on bp's batches: what
  bpc costs beyond its forward. The compiled cases run once before the timed rounds (the
  one-off compile, recorded as ``compile_warmup_seconds``: compile plus one call) and are then
  timed like the others;
* (c) SAELens's ``CacheActivationsRunner`` on the same model, hook, text and precision
  (``autocast_lm=True`` for bf16), given the fortunes as an HF ``Dataset`` with a text column: it
  tokenises and packs them into 128-token contexts.

Tokens are counted the same way everywhere: real (non-pad) tokens that went through the model.
For (b) and (a2) that is ``attention_mask.sum()`` (``meta.json``'s ``token_count``); for (a1) and
(c) every token of a packed context is real, so 128 per context row. The documents given to (b)
are the first fortunes whose windows hold about as many tokens as SAELens processes, so both do the
same amount of real work.

Three hooks (resid_post of blocks 4, 10, 16): one packed ``save`` run collecting all three in one
forward (b3pc compiled, b3p eager) versus three single-hook SAELens runs. Ratios are what to
read: the machine is shared. SAELens's cache runner costs little beyond its forward pass, so
``c / a1`` bounds what an extraction on the same eager forward can gain over it (reported as a
ratio); the compiled cases are how ``save`` gets past that bound.

After the rounds, ``--long-repeats`` (3) interleaved repeats of the >= 1M-token bf16 runs with every
compile on the clock (``bench.store_long_run``: ours and SAELens, each compiled and eager).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import machine_info, median_rate, saelens_offline, write_result
from bench.store_long_run import LONG_REPEATS, long_run

HOOK = "blocks.10.hook_resid_post"
THREE_HOOKS = ["blocks.4.hook_resid_post", "blocks.10.hook_resid_post", "blocks.16.hook_resid_post"]
BATCH, CONTEXT = 32, 128
# Tokens per timed call, per precision (full run): ~10-15 s a call at the rates seen on this machine.
FULL_TOKENS = {"float32": 3 * 8192, "bfloat16": 6 * 8192}
QUICK_TOKENS = {"float32": 4096, "bfloat16": 4096}
TOKEN_BUDGET = BATCH * CONTEXT  # bt / b3t: forward passes of up to 32 x 128 padded cells, as SAELens's
SAELENS_BUFFER_TOKENS = 4096  # tokens per SAELens shard (its buffer): one 32 x 128 batch


def documents_for(texts: list[str], tokenizer: Any, target_tokens: int) -> list[str]:
    """The first documents whose 128-token windows hold at least ``target_tokens`` tokens."""
    docs, total = [], 0
    for text in texts:
        n = min(len(tokenizer(text, add_special_tokens=False)["input_ids"]), CONTEXT)
        if n:
            docs.append(text)
            total += n
        if total >= target_tokens:
            return docs
    raise ValueError(f"the corpus holds fewer than {target_tokens} tokens")


def packed_batches(texts: list[str], tokenizer: Any, n_tokens: int) -> list[torch.Tensor]:
    """Documents tokenised, concatenated and cut into (32, 128) batches: SAELens-style packing."""
    stream: list[int] = []
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(stream) >= n_tokens:
            break
    rows = torch.tensor(stream[: n_tokens // CONTEXT * CONTEXT]).view(-1, CONTEXT)  # (contexts, 128)
    return list(rows.split(BATCH))


def bare_forward(model: Any, batches: list[torch.Tensor], stop: int | None, precision: str) -> int:
    """Forward every batch to ``stop_at_layer``, no hooks; returns the real tokens processed."""
    from sae_core.activations import forward_context

    tokens = 0
    with torch.inference_mode(), forward_context("cpu", precision):
        for ids, mask in batches:
            model(ids, stop_at_layer=stop, return_type=None)
            tokens += int(mask.sum()) if mask is not None else ids.numel()
    return tokens


def our_batches(model: Any, docs: list[str], batch_tokens: int | None,
                pack: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The padded (or packed) batches ``save`` forwards for ``docs``, as (input_ids, attention_mask)."""
    return [(b.input_ids, b.attention_mask) for b in window_batches(model, docs, batch_tokens, pack)]


def run_save(model: Any, hooks: list[str], docs: list[str], precision: str, root: Path,
             batch_tokens: int | None = None, pack: bool = False, compile_forward: bool = False) -> int:
    """One fresh ``save`` run; returns the real tokens processed (``token_count``)."""
    from sae_core.store import ActivationRun, save

    store = Path(tempfile.mkdtemp(dir=root))
    try:
        run_id = save(model, hooks, docs, store, batch_size=BATCH, batch_tokens=batch_tokens, max_text_length=CONTEXT,
                      dtype=precision, storage_dtype="float32", progress=False, pack_windows=pack,
                      compile=compile_forward, prepend_bos=False)  # no BOS: as the README table was measured
        return int(ActivationRun.open(store, run_id).meta["token_count"])
    finally:
        shutil.rmtree(store, ignore_errors=True)


def compiled_forward_only(model: Any, batches: list[Any], hooks: list[str], precision: str) -> int:
    """``run_to_hooks(..., compile=True)`` over ``save``'s own batches; returns the real tokens processed."""
    from sae_core.activations import run_to_hooks

    tokens = 0
    for batch in batches:
        run_to_hooks(model, hooks, batch.input_ids, precision, batch, compile=True)
        tokens += int(batch.attention_mask.sum())
    return tokens


def window_batches(model: Any, docs: list[str], batch_tokens: int | None, pack: bool) -> list[Any]:
    """The ``WindowBatch``es ``save`` forwards for ``docs`` (same loader, same order)."""
    from sae_core.config import LoaderConfig
    from sae_core.data import WindowedTextDataset
    from sae_core.loader import make_dataloader

    dataset = WindowedTextDataset(docs, model.tokenizer, CONTEXT, seed=0)
    cfg = LoaderConfig(batch_size=BATCH, batch_tokens=batch_tokens, pack_windows=pack)
    return list(make_dataloader(dataset, cfg))


def run_saelens(model: Any, hooks: list[str], corpus: Any, n_tokens: int, precision: str, root: Path) -> int:
    """SAELens ``CacheActivationsRunner``, one run per hook; returns the tokens processed (per hook)."""
    from sae_lens import CacheActivationsRunner, CacheActivationsRunnerConfig

    tokens = 0
    bytes_per_token = model.cfg.d_model * 4
    for hook in hooks:
        out = Path(tempfile.mkdtemp(dir=root))
        try:
            cfg = CacheActivationsRunnerConfig(
                dataset_path="fortunes", model_name="smollm2", model_batch_size=BATCH, hook_name=hook,
                d_in=model.cfg.d_model, training_tokens=n_tokens, context_size=CONTEXT,
                new_cached_activations_path=str(out / "cache"), shuffle=False, dtype="float32", device="cpu",
                buffer_size_gb=(SAELENS_BUFFER_TOKENS + 0.5) * bytes_per_token / 1e9, prepend_bos=False,
                autocast_lm=precision == "bfloat16")
            assert cfg.n_tokens_in_buffer == SAELENS_BUFFER_TOKENS, cfg.n_tokens_in_buffer
            with saelens_offline(model):
                dataset = CacheActivationsRunner(cfg, override_dataset=corpus).run()
            tokens = len(dataset) * CONTEXT
        finally:
            shutil.rmtree(out, ignore_errors=True)
    return tokens


_PEER_COMPILED: dict[int, Any] = {}


def run_saelens_compiled(model: Any, hooks: list[str], corpus: Any, n_tokens: int, precision: str, root: Path) -> int:
    """SAELens's cache runner with its model's ``run_with_cache`` through ``torch.compile``: the peer compiled too.

    ``model.run_with_cache = torch.compile(model.run_with_cache)`` (an instance attribute, removed
    afterwards); the compiled callable is kept per model, so the untimed warm-up's compile serves the
    timed rounds, as ours does.
    """
    if id(model) not in _PEER_COMPILED:
        _PEER_COMPILED[id(model)] = torch.compile(model.run_with_cache)
    model.run_with_cache = _PEER_COMPILED[id(model)]
    try:
        return run_saelens(model, hooks, corpus, n_tokens, precision, root)
    finally:
        del model.run_with_cache


def ratio_spread(result: dict[str, Any], ours: str, peer: str) -> dict[str, float]:
    """``ours / peer`` round by round (each round times every case once): median, min and max."""
    values = [a / b for a, b in zip(result[ours]["all_tokens_per_s"], result[peer]["all_tokens_per_s"], strict=True)]
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3), "max": round(max(values), 3),
            "rounds": len(values)}


def interleaved(cases: dict[str, Any], repeats: int, label: str) -> dict[str, Any]:
    """Time every case once per round, ``repeats`` rounds: load drift on a shared machine hits all cases alike."""
    log = logging.getLogger("bench")
    rates: dict[str, list[Any]] = {name: [] for name in cases}
    for round_number in range(repeats):
        for name, fn in cases.items():
            log.info("%s round %d: %s", label, round_number, name)
            rates[name].append(median_rate(fn, repeats=1))
    out = {}
    for name, runs in rates.items():
        values = [r.median for r in runs]
        out[name] = {"tokens_per_s": round(statistics.median(values), 1), "all_tokens_per_s": [round(v, 1) for v in values],
                     "tokens_per_call": int(runs[-1].units), "seconds_per_call": [round(r.seconds[0], 2) for r in runs]}
    return out


RATIOS = {  # name: (our case, the case it is divided by)
    "bp_over_c_saelens": ("bp_save_packed_windows", "c_saelens_cache_activations"),
    "bt_over_c_saelens": ("bt_save_token_budget", "c_saelens_cache_activations"),
    "bpc_over_cc_saelens_compiled": ("bpc_save_packed_windows_compiled", "cc_saelens_cache_activations_compiled"),
    "bp_over_a2p_same_batches": ("bp_save_packed_windows", "a2p_bare_forward_our_packed_batches"),
    "bt_over_a2t_same_batches": ("bt_save_token_budget", "a2t_bare_forward_our_token_budget_batches"),
    "bp_over_a1_packed": ("bp_save_packed_windows", "a1_bare_forward_packed_32x128"),
    "bpc_over_a2pc_compiled_forward_same_batches": ("bpc_save_packed_windows_compiled",
                                                    "a2pc_compiled_forward_our_packed_batches"),
    "a2pc_over_a2p_compiled_forward_speed_up": ("a2pc_compiled_forward_our_packed_batches",
                                                "a2p_bare_forward_our_packed_batches"),
    "cc_over_c_saelens_compile_speed_up": ("cc_saelens_cache_activations_compiled", "c_saelens_cache_activations"),
    "c_over_a1_saelens_vs_bare_forward": ("c_saelens_cache_activations", "a1_bare_forward_packed_32x128"),
    "three_hooks_b3p_over_c3": ("b3p_save_three_hooks_one_run", "c3_saelens_three_single_hook_runs"),
    "three_hooks_b3pc_over_c3": ("b3pc_save_three_hooks_one_run_compiled", "c3_saelens_three_single_hook_runs"),
}


def shakespeare_pieces(chars: int = 350) -> list[str]:
    """Shakespeare's works cut at line ends into pieces of about ``chars`` characters (~110 tokens each).

    1.2M+ tokens of documents that each fit one 128-token window, so ``save`` (one window a document)
    and SAELens (documents run together) process the same text; the fortunes hold only ~0.6M tokens.
    """
    from sae_core.corpora import shakespeare_corpus

    pieces = []
    for text in shakespeare_corpus().texts:
        piece: list[str] = []
        size = 0
        for line in text.splitlines():
            piece.append(line)
            size += len(line) + 1
            if size >= chars:
                pieces.append("\n".join(piece).strip())
                piece, size = [], 0
    return [p for p in pieces if p]


def bench_precision(model: Any, texts: list[str], corpus: Any, precision: str, n_tokens: int,
                    repeats: int, root: Path) -> dict[str, Any]:
    from sae_core.activations import compiled_forward
    from sae_core.hooks import stop_layer_for

    tok = model.tokenizer
    docs = documents_for(texts, tok, n_tokens)
    stop = stop_layer_for([HOOK], model.cfg.n_layers)
    packed = [(b, None) for b in packed_batches(texts, tok, n_tokens)]
    ours_tok = our_batches(model, docs, TOKEN_BUDGET)
    ours_packed = our_batches(model, docs, TOKEN_BUDGET, pack=True)
    ours_packed_windows = window_batches(model, docs, TOKEN_BUDGET, pack=True)

    def cells(batches: list[Any]) -> dict[str, Any]:
        n = sum(ids.numel() for ids, _ in batches)
        real = sum(int(mask.sum()) if mask is not None else ids.numel() for ids, mask in batches)
        return {"passes": len(batches), "cells": n, "real_tokens": real, "padding": round(1 - real / n, 4)}

    result: dict[str, Any] = {"documents": len(docs), "target_tokens": n_tokens,
                              "forward_passes": {"packed_32x128": cells(packed), "token_budget": cells(ours_tok),
                                                 "token_budget_packed_windows": cells(ours_packed)}}
    cases = {
        "a1_bare_forward_packed_32x128": lambda: bare_forward(model, packed, stop, precision),
        "a2p_bare_forward_our_packed_batches": lambda: bare_forward(model, ours_packed, stop, precision),
        "a2t_bare_forward_our_token_budget_batches": lambda: bare_forward(model, ours_tok, stop, precision),
        "a2pc_compiled_forward_our_packed_batches": lambda: compiled_forward_only(model, ours_packed_windows, [HOOK],
                                                                                  precision),
        "bpc_save_packed_windows_compiled": lambda: run_save(model, [HOOK], docs, precision, root, TOKEN_BUDGET,
                                                             pack=True, compile_forward=True),
        "bp_save_packed_windows": lambda: run_save(model, [HOOK], docs, precision, root, TOKEN_BUDGET, pack=True),
        "bt_save_token_budget": lambda: run_save(model, [HOOK], docs, precision, root, TOKEN_BUDGET),
        "c_saelens_cache_activations": lambda: run_saelens(model, [HOOK], corpus, n_tokens, precision, root),
        "cc_saelens_cache_activations_compiled": lambda: run_saelens_compiled(model, [HOOK], corpus, n_tokens,
                                                                             precision, root),
        "b3pc_save_three_hooks_one_run_compiled": lambda: run_save(model, THREE_HOOKS, docs, precision, root,
                                                                   TOKEN_BUDGET, pack=True, compile_forward=True),
        "b3p_save_three_hooks_one_run": lambda: run_save(model, THREE_HOOKS, docs, precision, root, TOKEN_BUDGET,
                                                         pack=True),
        "c3_saelens_three_single_hook_runs": lambda: run_saelens(model, THREE_HOOKS, corpus, n_tokens, precision,
                                                                 root),
    }
    warmup = {}
    for name in ("a2pc_compiled_forward_our_packed_batches", "b3pc_save_three_hooks_one_run_compiled",
                 "cc_saelens_cache_activations_compiled"):
        # bpc's graph is a2pc's (same hook, precision and packing): one compile serves both.
        start = time.perf_counter()
        cases[name]()
        warmup[name] = round(time.perf_counter() - start, 1)
    result["compile_warmup_seconds"] = warmup
    compiled = compiled_forward(model)
    if compiled.disabled is not None or not compiled.compiled_calls:  # the compiled cases would time eager work
        raise RuntimeError(f"the compiled forward did not run: {compiled.disabled}")
    result.update(interleaved(cases, repeats, precision))
    result["ratios"], result["ratio_spread"] = {}, {}
    for name, (ours, peer) in RATIOS.items():
        result["ratios"][name] = round(result[ours]["tokens_per_s"] / result[peer]["tokens_per_s"], 3)
        result["ratio_spread"][name] = ratio_spread(result, ours, peer)
    spread = result["ratio_spread"]
    result["profile"] = {  # where save's time goes, eager: its bare forward's share of it (same cells)
        "forward_share_of_save_eager": round(result["bp_save_packed_windows"]["tokens_per_s"]
                                             / result["a2p_bare_forward_our_packed_batches"]["tokens_per_s"], 3),
        "saelens_forward_share": round(result["c_saelens_cache_activations"]["tokens_per_s"]
                                       / result["a1_bare_forward_packed_32x128"]["tokens_per_s"], 3)}
    result["targets_met"] = {
        "eager vs eager: save >= 1.1x SAELens (median of rounds)": spread["bp_over_c_saelens"]["median"] >= 1.1,
        "compiled vs compiled: save >= 1.1x SAELens": spread["bpc_over_cc_saelens_compiled"]["median"] >= 1.1,
        "save >= 0.95x its bare forward on the same batches": spread["bp_over_a2p_same_batches"]["median"] >= 0.95,
        "three hooks, eager: >= 2x three SAELens runs": spread["three_hooks_b3p_over_c3"]["median"] >= 2.0}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny token counts, one repeat: validates the pipeline")
    parser.add_argument("--long-tokens", type=int, default=1_048_576,
                        help="tokens of the compile-counted bf16 runs (0: skip them)")
    parser.add_argument("--long-repeats", type=int, default=LONG_REPEATS, help="interleaved repeats of the compile-counted runs")
    args = parser.parse_args()
    if args.long_repeats < 1 or args.long_tokens < 0:
        parser.error("--long-repeats must be >= 1 and --long-tokens >= 0")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("sae_lens").setLevel(logging.WARNING)
    import datasets

    from bench.common import load_smollm2
    from sae_core.corpora import fortunes_corpus

    datasets.disable_progress_bars()
    model = load_smollm2()
    texts = fortunes_corpus()
    corpus = datasets.Dataset.from_dict({"text": texts})
    tokens = QUICK_TOKENS if args.quick else FULL_TOKENS
    repeats = 2 if args.quick else 3
    payload: dict[str, Any] = {
        "model": model.cfg.model_name, "hook": HOOK, "three_hooks": THREE_HOOKS, "batch": f"{BATCH} x {CONTEXT}",
        "quick": args.quick, "repeats": repeats, "storage_dtype": "float32",
        "token_counting": ("real (non-pad) tokens through the model: attention_mask.sum() for save and for the "
                           "bare forward on our batches; 128 per packed context for SAELens and the packed bare "
                           "forward. save is given the first fortunes holding about as many tokens as SAELens "
                           "processes (tokens_per_call in each case)."),
        "notes": ("bpc / b3pc / a2pc run the forward through torch.compile (compile_forward=True), after one "
                  "untimed warm-up call per precision (compile_warmup_seconds); the other cases are eager. "
                  "bp packs windows into 128-token rows kept apart by the attention mask (pack_windows=True), "
                  "32 rows a pass; a2p is the bare forward on the same cells, a1 the bare forward on documents "
                  "run together in 32 x 128 contexts as SAELens does. bt is save without packing (each window "
                  "its own row, length-sorted, token budget 32 x 128 cells) and a2t its bare forward."),
        "machine_at_start": machine_info(),
    }
    with tempfile.TemporaryDirectory(prefix="bench_activations.") as tmp:
        for precision in ("float32", "bfloat16"):
            payload[precision] = bench_precision(model, texts, corpus, precision, tokens[precision], repeats, Path(tmp))
        long_tokens = 8192 if args.quick else args.long_tokens
        if long_tokens:
            payload["long_run_bfloat16"] = long_run(model, long_tokens, Path(tmp), 1 if args.quick else args.long_repeats,
                                                    command="python -m bench.bench_activations " + " ".join(sys.argv[1:]))
    path = write_result("bench_activations_quick" if args.quick else "bench_activations", payload)
    for precision in ("float32", "bfloat16"):
        logging.getLogger("bench").info("%s ratios: %s", precision, payload[precision]["ratios"])
    logging.getLogger("bench").info("wrote %s", path)


if __name__ == "__main__":
    main()
