"""Run every benchmark, then rewrite the README's benchmark table from ``bench/results/*.json``.

    python -m bench.run_all                 # make bench: every benchmark at its full size
    python -m bench.run_all --quick         # smoke sizes (results go to *_quick.json)
    python -m bench.run_all --table-only    # only regenerate the README table
    python -m bench.run_all --restart       # the full run from the start, not from where the last one stopped
    python -m bench.run_all --bfloat16-here # on a CPU without native bfloat16, its bfloat16 invocations too
    python -m bench.run_all --amend REV --reason TEXT  # go on after fixing a benchmark the run has not reached

Each benchmark runs in its own process, one after another (they measure throughput: never run
two at once). Ratios are measured within one run against SAELens on the same work. The full run
is resumable (:mod:`bench.progress`): run it again after an interruption and it goes on from the
invocation that was cut short; when it finishes, ``bench/results/make_bench.json`` records how long
each invocation took. On a CPU without native bfloat16 matmuls (no AVX512-BF16 or AMX) the full run
does the invocations that time float32 or no model and leaves the bfloat16 ones (:func:`times_bfloat16`)
to a CPU that has them: timed here they would measure an emulated path ~8x slower than float32 on
both sides. ``make bench`` on such a CPU goes on with the same record.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.common import cpu_kind, write_result
from bench.progress import PROGRESS, BenchProgress, amend, code_digest

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
BENCHES = ["bench_precision", "bench_whitening", "bench_synthetic", "bench_analysis", "bench_browser",
           "bench_activations", "store_long_run", "bench_training_speed", "training_speed_measured",
           "bench_three_hooks", "bench_lr_quality", "quality_same_contexts", "bench_sweep", "quality_sweep"]
# The benchmarks that time no model precision come first (on any CPU they are the same work).
TIMES_BFLOAT16 = {"bench_activations", "store_long_run", "bench_training_speed", "bench_three_hooks", "bench_lr_quality",
                  "quality_same_contexts", "bench_sweep", "quality_sweep"}
"""Benchmarks that time or train in bfloat16 whatever their arguments (quality_sweep: the default run's "auto",
bfloat16 on the CPU the table was measured on); training_speed_measured does so when its arguments ask for it."""
# bench_training is not run here and has no rows: its comparisons (SAELens's b_dec at zero, ours at the mean; one
# run each; three separate SAELens runs for three hooks) are measured fairly by bench_training_speed,
# training_speed_measured and bench_three_hooks (equal start, MultiSAETrainingRunner, interleaved repeats).
_ONE_THEN_TWO_MORE = [[], ["--add-to-existing"], ["--add-to-existing"]]  # three repeats, one invocation each
ARGUMENTS: dict[str, list[str] | list[list[str]]] = {  # the budgets the README table was measured at, so `make bench` reproduces every row as printed
    # The long runs go one repeat an invocation (each under an hour), so a cut loses little (bench.progress):
    # the store's 1M-token compile-counted repeats (~25 min each) and the 1M-token training repeats.
    "bench_activations": ["--long-repeats", "1"],
    "store_long_run": [["--add-repeats", "1"], ["--add-repeats", "1"]],
    "bench_synthetic": ["--rows", "300000", "--repeats", "3"],
    "bench_training_speed": [["--tokens", "65536", "--repeats", "3", "--precisions", "bfloat16,float32"],
                             ["--tokens", "65536", "--repeats", "3", "--precisions", "bfloat16", "--run-together"]],
    "training_speed_measured": [["--tokens", "1048576", "--repeats", "1", "--precisions", precision, *more]  # ~30 / ~50 min
                                for precision in ("bfloat16", "float32") for more in _ONE_THEN_TWO_MORE],
    "bench_three_hooks": ["--tokens", "65536", "--repeats", "3"],
}
QUICK_ARGUMENTS: dict[str, list[str] | None] = {
    "bench_training_speed": ["--tokens", "8192", "--repeats", "1", "--precisions", "bfloat16"],
    "training_speed_measured": ["--tokens", "8192", "--repeats", "1", "--precisions", "bfloat16"],
    "store_long_run": None}  # adds to the full store result: no smoke size (bench_activations --quick has its long run)
# quality_sweep: its built-in variants at their own budgets (ARGUMENTS: none); --quick: one variant, 16k tokens
# A list of argument lists runs the benchmark once for each, in order (one process each).


def invocations(name: str, quick: bool = False) -> list[list[str]]:
    """The command lines ``make bench`` (or ``--quick``) runs for benchmark ``name``, in order."""
    arguments = QUICK_ARGUMENTS.get(name, ["--quick"]) if quick else ARGUMENTS.get(name, [])
    if arguments is None:
        return []
    runs = arguments if arguments and isinstance(arguments[0], list) else [arguments]
    return [[sys.executable, "-m", f"bench.{name}", *run] for run in runs]


def times_bfloat16(command: Sequence[str]) -> bool:
    """Whether an invocation (``[python, "-m", "bench.name", *arguments]``) times or trains in bfloat16."""
    return command[2].removeprefix("bench.") in TIMES_BFLOAT16 or any("bfloat16" in part for part in command[3:])


START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def _load(*names: str) -> dict[str, Any] | None:
    for name in names:
        path = RESULTS / f"{name}.json"
        if path.exists():
            return json.loads(path.read_text())
    return None


def _fmt(value: Any, digits: int = 0) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, str):
        return value
    return f"{value:,.{digits}f}"


def _ratio(a: Any, b: Any) -> float | None:
    return a / b if a and b else None


def _row(what: str, ours: Any, peer: Any, ratio: Any, target: str, met: Any, digits: int = 0) -> str:
    return f"| {what} | {_fmt(ours, digits)} | {_fmt(peer, digits)} | {_fmt(ratio, 2)} | {target} | {_fmt(met)} |"


def _spread(entry: dict[str, Any] | None) -> str:
    """``1.04 (0.98-1.09)``: the median ratio of interleaved rounds with its range."""
    if not entry:
        return "–"
    return f"{entry['median']:.2f} ({entry['min']:.2f}-{entry['max']:.2f})"


STORE_RATIOS = {"bp_over_c_saelens": ("bp_save_packed_windows", "c_saelens_cache_activations"),
                "bt_over_c_saelens": ("bt_save_token_budget", "c_saelens_cache_activations"),
                "bp_over_a2p_same_batches": ("bp_save_packed_windows", "a2p_bare_forward_our_packed_batches"),
                "c_over_a1_saelens_vs_bare_forward": ("c_saelens_cache_activations", "a1_bare_forward_packed_32x128"),
                "three_hooks_b3p_over_c3": ("b3p_save_three_hooks_one_run", "c3_saelens_three_single_hook_runs")}


def _round_spreads(part: dict[str, Any]) -> dict[str, Any]:
    """Per-round ratios from the rounds' rates, for result files written before ``ratio_spread`` existed."""
    out = {}
    for name, (ours, peer) in STORE_RATIOS.items():
        a, b = part.get(ours, {}).get("all_tokens_per_s"), part.get(peer, {}).get("all_tokens_per_s")
        if a and b:
            values = [x / y for x, y in zip(a, b, strict=True)]
            out[name] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    return out


def activation_rows(result: dict[str, Any]) -> list[str]:
    rows = []
    for precision in ("float32", "bfloat16"):
        part = result.get(precision)
        if not part:
            continue
        rate = {k: v["tokens_per_s"] for k, v in part.items() if isinstance(v, dict) and "tokens_per_s" in v}
        spread = part.get("ratio_spread") or _round_spreads(part)

        def row(what: str, ours: str, peer: str, ratio: str, target: str, limit: float | None,
                peer_column: Any = None, rate: dict[str, Any] = rate, spread: dict[str, Any] = spread) -> str:
            entry = spread.get(ratio)
            met = None if limit is None or not entry else entry["median"] >= limit
            peer_value = rate.get(peer) if peer_column is None else peer_column
            return (f"| {what} | {_fmt(rate.get(ours))} | {_fmt(peer_value)} | {_spread(entry)} | {target} | "
                    f"{_fmt(met)} |")

        rows += [
            row(f"save, 1 hook, eager vs eager, {precision} (tokens/s) vs SAELens CacheActivationsRunner",
                "bp_save_packed_windows", "c_saelens_cache_activations", "bp_over_c_saelens", ">= 1.1x", 1.1),
            row(f"… save, 1 hook, both compiled (untimed warm-up each), {precision}",
                "bpc_save_packed_windows_compiled", "cc_saelens_cache_activations_compiled",
                "bpc_over_cc_saelens_compiled", "reference", None),
            row(f"… save without packing (each window its own row), eager, vs SAELens, {precision}",
                "bt_save_token_budget", "c_saelens_cache_activations", "bt_over_c_saelens", "reference", None),
            row(f"… profile: save vs its own bare forward on the same batches, eager, {precision}",
                "bp_save_packed_windows", "a2p_bare_forward_our_packed_batches", "bp_over_a2p_same_batches",
                "forward share of save's time", None, peer_column="(ours)"),
            row(f"… profile: SAELens cache runner vs bare forward on packed 32x128, {precision}",
                "c_saelens_cache_activations", "a1_bare_forward_packed_32x128", "c_over_a1_saelens_vs_bare_forward",
                "forward share of SAELens's time", None, peer_column="(SAELens)"),
            row(f"save, 3 hooks in one run vs 3 SAELens runs, eager, {precision}", "b3p_save_three_hooks_one_run",
                "c3_saelens_three_single_hook_runs", "three_hooks_b3p_over_c3", ">= 2x", 2.0),
        ]
        warmup = dict(part.get("compile_warmup_seconds") or {})
        if warmup:
            peer = warmup.pop("cc_saelens_cache_activations_compiled", None)
            names = {"a2pc_compiled_forward_our_packed_batches": "1 hook", "b3pc_save_three_hooks_one_run_compiled": "3 hooks"}
            ours = ", ".join(f"{v:.0f} ({names.get(k, k)})" for k, v in warmup.items())
            rows.append(_row(f"one-off compile + first call before the timed rounds, {precision} (s)", ours,
                             None if peer is None else f"{peer:.0f} (1 hook)", None, "reported", None))
    long = result.get("long_run_bfloat16")
    if long:
        rows += long_run_rows(long)
    return rows


def _added_batches(measured: list[dict[str, Any]]) -> str:
    """`` (2 at 2026-12-06 04:03 + 1 at ...)`` when a result's repeats were measured in several batches."""
    if len(measured) < 2:
        return ""
    return " (" + " + ".join(f"{m['repeats']} at {m['written_at'][:16].replace('T', ' ')}" for m in measured) + ")"


def long_run_rows(long: dict[str, Any]) -> list[str]:
    """The store's >= 1M-token runs, every compile counted: median (min-max) over interleaved repeats."""
    from bench.store_long_run import as_runs, summarise

    runs = as_runs(long)
    summary, n = summarise(runs), len(runs)
    rates, tokens = summary["rates_median"], runs[0]["ours_compiled_compile_counted"]["tokens"]
    verdict = "reported (one run each)" if n == 1 else f"reported ({n} interleaved repeats)"
    when = _added_batches(long.get("measured", []))  # repeats added later (bench.store_long_run --add-repeats)
    return [
        f"| save, compiled, compile counted (dynamo reset; inductor's disk cache warm on both sides), {tokens:,} tokens, "
        f"bf16 vs SAELens compiled, compile counted{when} | {_fmt(rates['ours_compiled_compile_counted'])} | "
        f"{_fmt(rates['saelens_compiled_compile_counted'])} | {_spread(summary['ratio_compiled_compile_counted'])} | "
        f"{verdict} | – |",
        f"| … the same compiled runs of ours vs SAELens eager, bf16 | {_fmt(rates['ours_compiled_compile_counted'])} | "
        f"{_fmt(rates['saelens_eager'])} | {_spread(summary['ratio_ours_compiled_over_saelens_eager'])} | {verdict} | – |",
        f"| … the same 1M tokens eager vs eager, bf16 | {_fmt(rates['ours_eager'])} | {_fmt(rates['saelens_eager'])} | "
        f"{_spread(summary['ratio_eager'])} | {verdict} | – |"]


def training_speed_rows(result: dict[str, Any]) -> list[str]:
    """Compiled + packed + prefetched training vs the serial limit and SAELens (as shipped, and compiled)."""
    rows, summary = [], result.get("summary", {})
    tokens = f"{result['tokens_per_run']:,}"
    for precision in result.get("precisions", []):
        rates = summary["rates_warm"]
        ours, fraction = rates[f"ours_{precision}"], summary.get(f"{precision}_fraction_of_serial_limit")
        if fraction:  # the serial limit is measured in bfloat16 only
            rows.append(f"| training {precision}, compiled + packed + prefetched, {tokens} tokens a run, vs serial limit "
                        f"(compiled forward + our step alone, same rows) | {ours['median']:,.0f} | "
                        f"{rates[f'serial_limit_{precision}']['median']:,.0f} (ours) | {_spread(fraction)} | >= 0.85x | "
                        f"{_fmt(fraction['median'] >= 0.85)} |")
        else:
            rows.append(f"| training {precision}, compiled + packed + prefetched, {tokens} tokens a run | "
                        f"{ours['median']:,.0f} | – | – | reported | – |")
        for peer, label, limit in (("saelens", "LanguageModelSAETrainingRunner as shipped", 1.8),
                                   ("saelens_compiled", "the same with compile_llm / compile_sae", 1.3)):
            key = f"ours_{precision}_vs_saelens_{precision}{'_compiled' if peer.endswith('compiled') else ''}"
            warm = summary[f"{key}_warm"]
            projected = summary.get(f"{key}_projected_at_1048576")
            peer_rate = rates[f"saelens_{precision}{'_compiled' if peer.endswith('compiled') else ''}"]["median"]
            rows.append(f"| … vs {label}, {precision}, equal start, warm (compile excluded) | {ours['median']:,.0f} | "
                        f"{peer_rate:,.0f} | {_spread(warm)} | reported | – |")
            if projected:
                rows.append(f"| … same, compile counted, projected to 1,048,576 tokens from the cold-minus-warm compile "
                            f"time (not measured) | – | – | {projected:.2f} | >= {limit}x at >= 1M tokens, measured | "
                            f"projected {_fmt(projected >= limit)}; not measured |")
    return rows


def run_together_speed_rows(result: dict[str, Any]) -> list[str]:
    """Ours on documents run together (the rows SAELens trains on, in its order) vs SAELens, in the same run."""
    rows, summary, tokens = [], result["summary"], f"{result['tokens_per_run']:,}"
    for p in result["precisions"]:
        rates = summary["rates_warm"]
        ours = rates[f"ours_{p}_run_together"]["median"]
        for peer, label in (("", "LanguageModelSAETrainingRunner as shipped"), ("_compiled", "the same with compile_llm / compile_sae")):
            rows.append(f"| training {p} on documents run together (windows_per_document=run_together: the contexts "
                        f"SAELens trains on, in its order), compiled, {tokens} tokens a run, equal start, warm, "
                        f"{result['warm_repeats']} interleaved repeats, vs {label} (ours on packed windows in the same run: "
                        f"{_spread(summary[f'ours_{p}_vs_saelens_{p}{peer}_warm'])}) | {ours:,.0f} | "
                        f"{rates[f'saelens_{p}{peer}']['median']:,.0f} | "
                        f"{_spread(summary[f'ours_{p}_run_together_vs_saelens_{p}{peer}_warm'])} | reported | – |")
    return rows


def training_speed_measured_rows(result: dict[str, Any]) -> list[str]:
    """Compile counted, measured: every run a fresh process with an empty inductor cache."""
    rows, summary, tokens = [], result["summary"], f"{result['tokens_per_run']:,}"
    when = _added_batches(result.get("measured", []))  # repeats added later (--add-to-existing)
    if result.get("label"):  # --label: measured apart from the make bench run
        commits = sorted({m.get("commit") or "?" for m in result.get("measured", [])})
        when += f", `{result['label']}` (commit {', '.join(commits)}, after the `make bench` run)"
    for p in result["precisions"]:
        rates = summary[f"rates_{p}"]
        for peer, label, limit in (("saelens", "LanguageModelSAETrainingRunner as shipped", 1.8),
                                   ("saelens_compiled", "the same with compile_llm / compile_sae", 1.3)):
            ratio = summary[f"ours_{p}_vs_{peer}_{p}"]
            rows.append(f"| training {p}, {tokens} tokens a run, every compile counted (fresh process, empty inductor "
                        f"cache), measured, {result['repeats']} interleaved repeat(s){when}, vs {label} | "
                        f"{rates['ours']['median']:,.0f} | {rates[peer]['median']:,.0f} | {_spread(ratio)} | "
                        f">= {limit}x | {_fmt(ratio['median'] >= limit)} |")
    return rows


def three_hook_rows(result: dict[str, Any]) -> list[str]:
    """Three SAEs on three hooks from one forward: ours vs MultiSAETrainingRunner (as shipped, and compile_llm)."""
    summary, tokens = result["summary"], f"{result['tokens_per_run']:,}"
    rates, warm = summary["rates_warm"], summary["ours_vs_saelens_multi_warm"]
    rows = [f"| training, 3 SAEs on blocks 4 / 10 / 16 from one forward, {result['precision']}, {tokens} tokens a run, "
            f"equal start, warm (compile excluded), vs MultiSAETrainingRunner as shipped | {rates['ours']['median']:,.0f} | "
            f"{rates['saelens_multi']['median']:,.0f} | {_spread(warm)} | >= 1.3x | {_fmt(warm['median'] >= 1.3)} |"]
    compiled = summary["ours_vs_saelens_multi_compiled_warm"]
    rows.append(f"| … vs the same with compile_llm (its runner has no compile_sae), warm | {rates['ours']['median']:,.0f} | "
                f"{rates['saelens_multi_compiled']['median']:,.0f} | {_spread(compiled)} | reported | – |")
    for peer, label in (("saelens_multi", "as shipped"), ("saelens_multi_compiled", "with compile_llm")):
        projected = summary[f"ours_vs_{peer}_projected_at_1048576"]
        rows.append(f"| … vs MultiSAETrainingRunner {label}, compile counted, projected to 1,048,576 tokens from the "
                    f"cold-minus-warm compile time (not measured) | – | – | {projected:.2f} | reported | – |")
    return rows


def _ce_windows(result: dict[str, Any]) -> str:
    """The held-out windows a quality bench scored for CE-loss recovered: ``HeldOutEvaluator`` draws them as the
    result's config says (results written before ``bench_training.base_config`` pinned one window a document
    record the constant file's "proportional", which the evaluator followed)."""
    n = result["ce_documents"]
    if result.get("config", {}).get("windows_per_document") == "proportional":
        return f"{n} windows drawn in proportion to length from {n} held-out documents"
    return f"{n} held-out documents, one window each"


def lr_quality_rows(result: dict[str, Any]) -> list[str]:
    """Held-out quality of each side at its best learning rate, same start, over seeds, in both context formats;
    SAELens normalised as its docs suggest."""
    results, best, tokens = result["results"], result["best_lr"], f"{result['tokens_per_run']:,}"
    summary = result.get("summary")

    def cell(r: dict[str, Any], key: str = "explained_variance") -> str:  # "saelens_format": EV in its contexts
        if key == "saelens_format":
            return f"{r[key]['explained_variance']:.3f}"
        return f"{r[key]:.3f}" + (f" / {r['ce_recovered']:.3f}" if "ce_recovered" in r else "")

    def spread(m: dict[str, Any]) -> str:
        return f"{m['median']:.3f} ({m['min']:.3f}-{m['max']:.3f})"

    lrs = ", ".join(results["ours"])
    what = (f"SAE quality, each side at its best lr of {lrs} (ours {best['ours']}, SAELens {best['saelens']}), equal "
            f"start, {result['precision']}, {tokens} tokens")
    if summary is None:  # a result from before the seed repeats
        ours, peer = results["ours"][best["ours"]], results["saelens"][best["saelens"]]
        rows = [f"| {what}: held-out EV / CE-loss recovered (on {result['ce_documents']} documents) | {cell(ours)} | "
                f"{cell(peer)} | {ours['explained_variance'] - peer['explained_variance']:+.3f} EV | reported (no seed "
                "repeats) | – |"]
    else:
        seeds, noise = len(result["repeats"]["ours"]), summary["within_noise_or_better"]
        rows = []
        for metric, label in (("explained_variance", "held-out EV, our windows (one document each)"),
                              ("saelens_format_explained_variance", "held-out EV, SAELens's contexts (documents run "
                                                                    "together)"),
                              ("ce_recovered", f"CE-loss recovered on {_ce_windows(result)}")):
            ours, peer = summary["ours"][metric], summary["saelens"][metric]
            rows.append(f"| {'' if rows else what + ', '}{'' if not rows else '… '}{label}, median (min-max) of {seeds} seeds | "
                        f"{spread(ours)} | {spread(peer)} | {ours['median'] - peer['median']:+.3f} | within noise or "
                        f"better (our median >= SAELens's lowest seed) | {_fmt(noise[metric])} |")
    for lr in results["ours"]:
        both = "saelens_format" in results["ours"][lr]
        rows.append(f"| … seed 0, lr {lr}: held-out EV{' / CE' if 'ce_recovered' in results['ours'][lr] else ''}"
                    f"{', EV in SAELens contexts' if both else ''} | "
                    f"{cell(results['ours'][lr])}{', ' + cell(results['ours'][lr], 'saelens_format') if both else ''} | "
                    f"{cell(results['saelens'][lr])}{', ' + cell(results['saelens'][lr], 'saelens_format') if both else ''} | "
                    "– | reported | – |")
    normalized = result["saelens_normalized"]
    both = "saelens_format" in normalized
    rows.append(f"| … SAELens with normalize_activations=\"expected_average_only_in\" (its docs' advice) at lr "
                f"{normalized['lr']}, its own start (b_dec zero), norm from {normalized['norm_batches']} batches"
                f"{', EV in SAELens contexts' if both else ''} | – | "
                f"{cell(normalized)}{', ' + cell(normalized, 'saelens_format') if both else ''} | – | reported | – |")
    return rows


def sweep_rows(result: dict[str, Any]) -> list[str]:
    """A sweep of several SAEs on one hook from one forward vs separate runs of ours and vs MultiSAETrainingRunner."""
    n, tokens, precision = len(result["units"]), result["tokens_per_run"], result["precision"]
    what = f"sweep of {n} SAEs on one hook, one forward, {precision}, {tokens:,} tokens each"
    rows = [f"| {what}: time vs {n} separate runs of ours | – | – | {_spread(result['speedup_vs_separate'])} | "
            f">= 2.5x | {_fmt(result['speedup_vs_separate']['median'] >= 2.5)} |"]
    if result.get("speedup_vs_saelens_multi"):
        rows.append(f"| … the same sweep vs SAELens MultiSAETrainingRunner ({n} SAEs on the hook) | – | – | "
                    f"{_spread(result['speedup_vs_saelens_multi'])} | reported | – |")
    return rows


def synthetic_rows(result: dict[str, Any]) -> list[str]:
    """Ground truth: MCC of both trainers from the same start on the same rows, at equal steps and equal time."""
    rows = []
    for arch, case in result.get("cases", {}).items():
        ours, peer = case["summary"]["ours"], case["summary"]["saelens"]
        mcc = lambda m: f"{m['median']:.3f} ({m['min']:.3f}-{m['max']:.3f})"  # noqa: E731
        speed = case["speed_ratio_saelens_seconds_over_ours"]
        same = "same rows" if case["same_first_batch"] else "DIFFERENT rows"
        rows.append(f"| synthetic ground truth, {arch}, {case['rows']:,} rows, {len(case['seeds'])} seeds ({same}, same "
                    f"initial SAE): MCC | {mcc(ours['mcc'])} | {mcc(peer['mcc'])} | "
                    f"{ours['mcc']['median'] / peer['mcc']['median']:.2f} | within noise or better | "
                    f"{_fmt(ours['mcc']['median'] >= peer['mcc']['min'])} |")
        rows.append(f"| … uniqueness / dead latents, {arch} | {ours['uniqueness']['median']:.3f} / "
                    f"{ours['dead_latents']['median']:.0f} | {peer['uniqueness']['median']:.3f} / "
                    f"{peer['dead_latents']['median']:.0f} | – | reported | – |")
        rows.append(f"| … wall time per run, {arch} (s; SAELens / ours) | {ours['seconds']['median']:.1f} | "
                    f"{peer['seconds']['median']:.1f} | {_spread(speed)} | reported | – |")
        equal = case["equal_wall_time"]
        cols = (equal["mcc"], equal["against"]["mcc"]) if equal["side"] == "ours" else (equal["against"]["mcc"],
                                                                                        equal["mcc"])
        rows.append(f"| … at equal wall time, {arch}: the faster side ({equal['side']}) trains on {equal['rows']:,} "
                    f"rows in the other's time: MCC | {mcc(cols[0])} | {mcc(cols[1])} | – | reported | – |")
    return rows


def whitening_rows(result: dict[str, Any]) -> list[str]:
    share = result.get("accumulate_over_forward_median")
    return [_row("Welford statistics cost / forward time, d=576", None, None, share, "< 0.05",
                 share is not None and share < 0.05)]


ANALYSIS_ROWS = [  # (what, our case, reference case or None, reference label, names of its targets)
    ("decoder similarity, 16,384 latents", "similarity_blocked_n16384", "similarity_dense_n16384", "dense numpy",
     ["similarity time <= 1.2x dense at 16,384"]),
    ("decoder similarity, 65,536 latents", "similarity_blocked_n65536", "similarity_dense_n65536", "dense numpy",
     ["similarity peak RSS at 65,536 latents <= 1 GB"]),
    ("co-occurrence (Jaccard), 1M tokens x 16,384 latents", "cooccurrence_blocked_t1000000_n16384",
     "cooccurrence_oneshot_t1000000_n16384", "one-shot X.T @ X",
     ["co-occurrence time <= one-shot X.T @ X", "co-occurrence peak RSS <= 1.2 GB"]),
    ("top-10 neighbours, 262,144 latents", "topk_similarity_n262144", None, "",
     ["top-k at 262,144 latents peak RSS <= 1.2 GB"]),
]


def _case(entry: dict[str, Any] | None) -> str:
    if not entry:
        return "not run"
    if entry.get("skipped"):
        return f"not run (~{entry.get('estimated_seconds', 0):,.0f} s est.)"
    if "seconds" not in entry:  # the case's process failed: say how (bench.bench_analysis.child_failure)
        return f"failed ({entry.get('signal') or 'exit status ' + str(entry.get('returncode', '?'))}" + (
            f": {entry['note']})" if entry.get("note") else ")")
    return f"{entry['seconds']:,.1f} s, {entry['peak_rss_mb']:,.0f} MB"


def analysis_rows(result: dict[str, Any]) -> list[str]:
    """One row per analysis: ours vs the in-memory reference as time and peak RSS; time ratio."""
    cases, targets = result.get("cases", {}), {t["target"]: t for t in result.get("targets", [])}
    rows = []
    for what, ours_name, ref_name, ref_label, names in ANALYSIS_ROWS:
        ours, ref = cases.get(ours_name), cases.get(ref_name) if ref_name else None
        if ours is None:
            continue
        ratio = ours["seconds"] / ref["seconds"] if ours.get("seconds") and ref and ref.get("seconds") else None
        checks = [targets[n] for n in names if n in targets]
        met = all(t["met"] for t in checks) if checks and all(t["met"] is not None for t in checks) else None
        peer = f"{ref_label}: {_case(ref)}" if ref_name else "–"
        target = "; ".join(names)
        rows.append(f"| {what} (time, peak RSS; out of core) | {_case(ours)} | {peer} | {_fmt(ratio, 2)} | "
                    f"{target} | {_fmt(met)} |")
    return rows


def browser_rows(result: dict[str, Any]) -> list[str]:
    """Feature browser: build time and peak RSS per size; against SAEDashboard (or the re-run baseline)."""
    cases, targets = result.get("cases", {}), {t["target"]: t for t in result.get("targets", [])}
    rows = []
    for name, what in (("build_n4608_t262144", "4,608 latents, 262,144 tokens"),
                       ("build_n65536_t1000000", "65,536 latents, 1M tokens")):
        case = cases.get(name)
        if case and "seconds" in case:
            met = targets.get("peak RSS at 65,536 latents over 1M tokens < 2 GB", {}).get("met") if "65" in what else None
            rows.append(f"| feature browser build, {what} (time, peak RSS; from disk) | {_case(case)} | – | – | "
                        f"{'peak RSS < 2 GB' if met is not None else 'reported'} | {_fmt(met)} |")
    for name in ("saedashboard", "saedashboard_n4608"):
        peer = cases.get(name)
        if not peer:
            continue
        what = f"feature browser, {peer['n_features']:,} latents x 8,192 tokens (forward + encode + build)"
        if "ratio" not in peer:
            if peer.get("ratio_cpu_extrapolated"):
                rows.append(f"| {what}, CPU s, vs SAEDashboard SaeVisRunner | {peer['ours']['cpu_seconds']:,.1f} | "
                            f"~{peer['saedashboard_cpu_seconds_extrapolated']:,.0f} (extrapolated, not measured) | "
                            f"~{peer['ratio_cpu_extrapolated']:.1f} | >= 10x | not measured |")
            continue
        theirs = peer["saedashboard"]
        spread_wall, spread_cpu = peer.get("ratio_spread"), peer.get("ratio_cpu_spread")
        wall = _spread(spread_wall) if spread_wall else f"{peer['ratio']:.2f}"
        targeted = name == "saedashboard_n4608"  # the case; the 512-latent subset has no target

        def verdict(ratio: float, targeted: bool = targeted) -> str:
            return f">= 10x | {_fmt(ratio >= 10)}" if targeted else "reported (subset) | –"

        rows.append(f"| {what}, wall s, vs SAEDashboard SaeVisRunner | {peer['ours']['seconds']:,.1f} | "
                    f"{theirs['seconds']:,.1f} | {wall} | {verdict(peer['ratio'])} |")
        if peer.get("ratio_cpu"):
            cpu = _spread(spread_cpu) if spread_cpu else f"{peer['ratio_cpu']:.2f}"
            rows.append(f"| … the same in process CPU s | {peer['ours']['cpu_seconds']:,.1f} | "
                        f"{theirs.get('cpu_seconds', 0):,.1f} | {cpu} | {verdict(peer['ratio_cpu'])} |")
        if peer.get("ratio_build_only"):
            rows.append(f"| … build alone from the CSR on disk (s) vs SAEDashboard | {peer['ours']['build_seconds']:,.1f} | "
                        f"{theirs['seconds']:,.1f} | {peer['ratio_build_only']:.2f} | reference | – |")
    return rows


def _same_weights(result: dict[str, Any]) -> str:
    same = [r["same_weights_as_ours_on_saelens_contexts"] for r in result["repeats"]["ours_run_together"]]
    return f"; bitwise the SAEs of the row above on {sum(same)} of {len(same)} seeds"


def same_contexts_rows(result: dict[str, Any]) -> list[str]:
    """Quality with the data format taken out: ours trained on SAELens's own contexts, and our pipeline on
    documents run together, each against SAELens."""
    summary, seeds = result["summary"], len(result["repeats"]["saelens"])
    sides = {"ours_on_saelens_contexts": (
        f"SAE quality with the data format taken out: ours trained on SAELens's contexts (the first "
        f"{result['tokens_per_run']:,} rows its ActivationsStore makes from the same shuffled documents; not the same "
        f"draw of them, b_dec from a batch of them) vs SAELens, lr {result['lr']:g}, {result['precision']}, equal "
        "initial weights"),
        "ours_run_together": (
        "… our pipeline end to end with windows_per_document=\"run_together\" (the same documents run together into "
        "the contexts SAELens's ActivationsStore makes, in the same order: the rows of the row above, forwarded by "
        "our pipeline" + _same_weights(result) + ") vs SAELens, same settings")}
    rows = []
    for side, what in sides.items():
        verdicts = summary["within_noise_or_better"][side]
        for n, (metric, label) in enumerate((("saelens_format_explained_variance", "held-out EV, SAELens's contexts"),
                                             ("explained_variance", "held-out EV, our windows"),
                                             ("ce_recovered", f"CE-loss recovered on {_ce_windows(result)}"))):
            ours, peer = summary[side][metric], summary["saelens"][metric]
            rows.append(f"| {what + ', ' if n == 0 else '… '}{label}, median (min-max) of {seeds} seeds | "
                        f"{ours['median']:.3f} ({ours['min']:.3f}-{ours['max']:.3f}) | "
                        f"{peer['median']:.3f} ({peer['min']:.3f}-{peer['max']:.3f}) | {ours['median'] - peer['median']:+.3f} | "
                        f"within noise or better (our median >= SAELens's lowest seed) | "
                        f"{_fmt(verdicts[metric])} |")
    return rows


def labelled_measurements() -> list[str]:
    """The ``bench.training_speed_measured --label`` result files: each gets rows of its own, when measured."""
    paths = sorted(RESULTS.glob("training_speed_measured_*.json"))
    return [path.stem for path in paths if json.loads(path.read_text()).get("label")]


def table() -> str:
    lines = ["| benchmark | ours | peer (SAELens) | ratio | target | met |", "|---|---|---|---|---|---|"]
    machine, cpus = None, {}
    for names, rows in ((("bench_activations", "bench_activations_quick"), activation_rows),
                        (("training_speed_bfloat16_float32", "training_speed_bfloat16"), training_speed_rows),
                        (("training_speed_bfloat16_run_together",), run_together_speed_rows),
                        (("training_speed_measured_bfloat16",), training_speed_measured_rows),
                        *(((name,), training_speed_measured_rows) for name in labelled_measurements()),
                        (("training_speed_measured_float32",), training_speed_measured_rows),
                        (("three_hooks", "three_hooks_quick"), three_hook_rows),
                        (("lr_quality", "lr_quality_quick"), lr_quality_rows),
                        (("quality_same_contexts", "quality_same_contexts_quick"), same_contexts_rows),
                        (("sweep", "sweep_quick"), sweep_rows),
                        (("synthetic", "synthetic_quick"), synthetic_rows),
                        (("whitening",), whitening_rows),
                        (("analysis", "analysis_quick"), analysis_rows),
                        (("browser",), browser_rows)):
        result = _load(*names)
        if result is None:
            lines.append(f"| {names[0]}: not run yet | | | | | |")
            continue
        machine = machine or result.get("machine")
        cpus.setdefault(cpu_kind(result.get("machine")), []).append(names[0])
        quick = " (quick sizes)" if result.get("quick") else ""
        lines += [line.replace(" |", f"{quick} |", 1) if quick else line for line in rows(result)]
    if machine:
        lines.append("")
        lines.append(f"Machine: {machine['cpu_count']} CPU cores ({machine['processor']}), {machine['memory_gib']} GiB, "
                     f"torch {machine['versions']['torch']}, sae-lens {machine['versions']['sae-lens']}, "
                     f"transformer-lens {machine['versions']['transformer-lens']}; load average at the start "
                     f"{machine['load_average'][0]:.1f}. Raw results: `bench/results/*.json`.")
        if len(cpus) > 1:  # sessions run on machines of the same size but not the same CPU: ratios compare within a row only
            lines.append("CPUs: " + "; ".join(f"{cpu}: {', '.join(files)}" for cpu, files in cpus.items()) + ".")
    lines.append(make_bench_line(_load("make_bench"), _load("bench_progress")))
    return "\n".join(lines)


def _times(count: int) -> str:
    return "once" if count == 1 else f"{count} times"


def make_bench_line(result: dict[str, Any] | None, progress: dict[str, Any] | None = None) -> str:
    """How long the last complete ``make bench`` took (``bench/results/make_bench.json``), or how far the one under way
    has got (``bench/results/bench_progress.json``), or that none has finished."""
    if (progress and progress.get("runs") and not progress.get("finished_at")
            and (result is None or progress["started_at"] > result["started_at"])):
        runs, commands = progress["runs"], [c for name in BENCHES for c in invocations(name)]
        total, seconds = len(commands), sum(run["seconds"] for run in runs)
        finished = {run["number"] for run in runs}
        waiting = sum(times_bfloat16(c) for number, c in enumerate(commands, 1) if number not in finished)
        bfloat16 = (f"; {waiting} of those to go time bfloat16, which a CPU without native bfloat16 leaves to one with it "
                    "(AVX512-BF16 or AMX)") if waiting else ""
        stale = ("" if progress.get("digest") == code_digest() else
                 " The code has changed since it began, so `make bench` will not go on with it: "
                 "`python -m bench.run_all --restart` starts over.")
        return (f"`make bench` under way since {progress['started_at']}: {len(runs)} of {total} invocations done "
                f"({seconds // 3600:.0f} h {seconds % 3600 / 60:.0f} min of benchmarks, resumed "
                f"{_times(progress['resumed'])}{bfloat16}); rows from result files it has not rewritten yet are from "
                "earlier runs (their dates are in `bench/results/*.json`)." + stale)
    if result is None:
        return "`make bench` end to end: not finished yet (the parts' times are in the text above)."
    seconds = result["benchmark_seconds"]
    shared = result["shared_machine"]
    return (f"`make bench` end to end (commit {result.get('commit') or '?'}): "
            f"{len(result['runs'])} invocations, {seconds // 3600:.0f} h {seconds % 3600 / 60:.0f} min of benchmarks, "
            f"{result['started_at']} to {result['finished_at']}, resumed {_times(result['resumed'])}; "
            + (f"on a shared machine (load average > 3): {', '.join(shared)}." if shared else "none on a shared machine.")
            + "".join(f" Amended at {entry['at']} after {entry['after_invocations']} invocations, before any ran the changed "
                      f"{', '.join(entry['files'])}: {entry['reason']}." for entry in result.get("amendments", [])))


QUALITY_START, QUALITY_END = "<!-- quality:start -->", "<!-- quality:end -->"


def quality_table() -> str:
    """The training variants of ``bench.quality_sweep``: one stream, the same held-out rows, each change's effect."""
    result = _load("quality_sweep")
    if result is None:
        return "quality_sweep: not run yet"
    lines = [f"{result['model']}, `{result['hook']}`, corpus `{result['corpus']}`: {result['train_rows']:,} stream rows, "
             f"scored on {result['held_out_rows']:,} held-out rows (same rows for every variant). SAE seconds: "
             f"training alone on the cached rows, on {cpu_kind(result.get('machine'))}, load average at the start "
             f"{result['machine']['load_average'][0]:.1f} (indicative: compare within the table).", "",
             "| variant | changes from the previous default (b4096, lr 4e-3, constant + 20% decay) or the shipped one (the default_* rows) | SAE rows | forwarded "
             "tokens | steps | held-out EV | never fired on held-out | dead in training | SAE seconds |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in sorted(result["results"].items(), key=lambda item: item[1]["explained_variance"]):
        changes = ", ".join(o.split(".", 1)[1] if "." in o else o for o in r["overrides"]) or "–"
        if r.get("base") == "shipped_64k_buffer":
            changes = "shipped default with a 64k-row buffer" + (f" + {changes}" if r["overrides"] else "")
        lines.append(f"| {name} | {changes} | {r['tokens']:,} | {r.get('forwarded_tokens', r['tokens']):,} | {r['steps']} | "
                     f"{r['explained_variance']:.3f} | {r['never_fired_on_held_out']:.3f} | {r['train_dead_fraction']:.3f} | "
                     f"{r['seconds']:.0f} |")
    return "\n".join(lines)


def write_table(readme: Path = ROOT / "README.md") -> None:
    text = readme.read_text(encoding="utf-8")
    new = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: f"{START}\n{table()}\n{END}", text, flags=re.S)
    new = re.sub(re.escape(QUALITY_START) + ".*?" + re.escape(QUALITY_END),
                 lambda _: f"{QUALITY_START}\n{quality_table()}\n{QUALITY_END}", new, flags=re.S)
    from sae_core.files import atomic_write_text

    atomic_write_text(readme, new)


def run_benchmarks(names: list[str], progress: BenchProgress | None, quick: bool = False,
                   execute: Callable[[Sequence[str]], None] | None = None,
                   leave: Callable[[Sequence[str]], bool] | None = None) -> list[list[str]]:
    """Every invocation of ``names`` in order; with ``progress``, skipping those it has finished and recording each.

    Invocations for which ``leave(command)`` holds are not run (a CPU without native bfloat16 leaves the bfloat16
    ones to a CPU that has it); they are returned. An invocation that adds to another's result file times the same
    precision as that one, so the two are left or run together.
    """
    execute = execute or _execute
    commands = [command for name in names for command in invocations(name, quick)]
    left = []
    for number, command in enumerate(commands, 1):
        if progress is not None and progress.done(number, command):
            print(f"[{number}/{len(commands)}] done before, skipped:", " ".join(command[1:]), flush=True)
            continue
        if leave is not None and leave(command):
            print(f"[{number}/{len(commands)}] left for a CPU with native bfloat16:", " ".join(command[1:]), flush=True)
            left.append(command)
            continue
        print(f"[{number}/{len(commands)}] running", " ".join(command), flush=True)
        if progress is None:
            execute(command)
        else:
            progress.run(number, command, execute)
    return left


def _execute(command: Sequence[str]) -> None:
    done = subprocess.run(command, cwd=ROOT, check=False)
    if done.returncode != 0:
        raise SystemExit(f"`{' '.join(command[1:])}` failed (exit status {done.returncode}; its output is above). "
                         "Fix it and run `make bench` again: the finished benchmarks are kept and skipped.")


def amend_record(revision: str, reason: str) -> None:
    """``--amend``: the code at ``revision`` (``git archive``) is the record's; :func:`bench.progress.amend` checks the change."""
    archive = subprocess.run(["git", "archive", revision, "bench", "sae_core", "pyproject.toml", "constraints.txt"],
                             cwd=ROOT, capture_output=True, check=False)
    if archive.returncode:
        raise SystemExit(f"git archive {revision} failed ({archive.stderr.decode().strip()}): name a commit of this repository")
    with tempfile.TemporaryDirectory() as base:
        tarfile.open(fileobj=io.BytesIO(archive.stdout)).extractall(base, filter="data")
        planned = [BenchProgress.key(command) for name in BENCHES for command in invocations(name)]
        entry = amend(PROGRESS, Path(base), reason, planned)
    print(f"make bench record amended: {', '.join(entry['files'])} ({reason}); `make bench` goes on", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke sizes")
    parser.add_argument("--table-only", action="store_true", help="only rewrite the README table")
    parser.add_argument("--only", nargs="*", choices=BENCHES, help="run only these benchmarks (not resumable)")
    parser.add_argument("--restart", action="store_true",
                        help="start the full run over, dropping an unfinished one's record (bench/results/bench_progress.json)")
    parser.add_argument("--amend", metavar="REV", help="carry the unfinished run recorded at git revision REV over a change "
                        "to benchmarks it has not run yet (refused otherwise; recorded with --reason)")
    parser.add_argument("--reason", help="with --amend: what changed and why")
    parser.add_argument("--bfloat16-here", action="store_true",
                        help="on a CPU without native bfloat16, run the bfloat16 invocations too (a slow path on both sides)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.amend:
        amend_record(args.amend, args.reason or parser.error("--amend needs --reason: what changed and why"))
        return
    if not args.table_only:
        names = args.only or BENCHES
        if "bench_browser" in names:
            from bench.bench_browser import SD_PYTHON

            if not SD_PYTHON.exists():  # found out now, not hours into the run
                raise SystemExit(f"bench_browser compares with SAEDashboard, run from {SD_PYTHON}: `make bench` builds it "
                                 "(bench/requirements-saedashboard.txt), or leave bench_browser out (--only)")
        from sae_core.precision import auto_dtype

        full = not args.quick and not args.only  # only the full run (hours) is resumable
        leave = None
        if auto_dtype("cpu") != "bfloat16":  # bfloat16 rows here would time a slow path on both sides (~8x float32)
            if full and not args.bfloat16_here:
                leave = times_bfloat16
                logging.warning("this CPU has no native bfloat16 matmuls (bench/results/precision.json): make bench runs "
                                "the invocations that time float32 or no model, and leaves the bfloat16 ones to a CPU "
                                "with AVX512-BF16 or AMX (run `make bench` there: the record goes on), or --bfloat16-here")
            else:
                logging.warning("this CPU has no native bfloat16 matmuls (bench/results/precision.json): the bfloat16 "
                                "rows will time a slow path on both sides, not comparable with rows measured on a CPU "
                                "that has them; the footer names each result file's CPU")
        progress = BenchProgress.open(restart=args.restart) if full else None
        left = run_benchmarks(names, progress, args.quick, leave=leave)
        if left:
            logging.warning("make bench is not finished: %d invocations time bfloat16 and were left for a CPU with native "
                            "bfloat16 (AVX512-BF16 or AMX); `make bench` there goes on from here", len(left))
        elif progress is not None:
            path = write_result("make_bench", progress.summary())
            progress.finish()
            print(f"make bench finished: {path}", flush=True)
    write_table()
    print(table())


if __name__ == "__main__":
    main()
