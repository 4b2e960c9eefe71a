"""Training speed with every compile counted, measured (not projected) at 1,048,576 tokens a run.

    python -m bench.training_speed_measured                                   # bf16, 1 repeat (~30 min)
    python -m bench.training_speed_measured --repeats 3 --precisions bfloat16,float32

The same rows and settings as ``bench.bench_training_speed`` (ours compiled + packed + prefetched;
SAELens's ``LanguageModelSAETrainingRunner`` as shipped and with ``compile_llm`` / ``compile_sae``;
equal start; its dataset shuffled), but every run is a fresh process with an empty inductor cache
(``TORCHINDUCTOR_CACHE_DIR`` a new folder), so each compiled row pays its whole compile inside
its timed call, as a user's first run does. Rows are interleaved within a repeat (ours, SAELens,
SAELens compiled); a ratio is taken per repeat and reported as median with min-max (one repeat:
the single value). The timed call is the training call alone on both sides (model loading and
corpus reading before it, in the same process, untimed on both sides).
Results: ``bench/results/training_speed_measured_<precisions>.json`` (``..._<tokens>.json`` below 1M tokens;
``..._<label>.json`` with ``--label``: a measurement after the ``make bench`` run, shown as rows of its own).

``--add-to-existing`` runs ``--repeats`` more interleaved repeats and adds them to that file (same
tokens and precisions, refused otherwise), for a session too short for all repeats in one go: each
repeat is interleaved within itself and its ratios are taken within it, so repeats from different
hours stay like for like; ``measured`` records each batch of repeats' date, commit and command.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.bench_training_speed import FULL_TOKENS, ours_config, run_ours, run_saelens
from bench.common import RESULTS_DIR, git_commit, spread, write_result

ROWS = ("ours", "saelens", "saelens_compiled")


def one_row(row: str, precision: str, tokens: int) -> dict[str, Any]:
    """One timed training run of ``row`` in this process (see the module docstring)."""
    from bench.bench_training import base_config
    from bench.common import load_smollm2
    from sae_core.corpora import fortunes_corpus
    from sae_core.training import split_documents

    model, texts, base = load_smollm2("float32"), fortunes_corpus(), base_config(tokens)
    documents, _ = split_documents(len(texts), base.evaluation.held_out_documents, base.seed)
    cfg = ours_config(base, precision, tokens)
    if row == "ours":
        return run_ours(model, texts, documents, cfg)
    return run_saelens(model, texts, documents, cfg, precision, compiled=row == "saelens_compiled")


def run_in_fresh_process(row: str, precision: str, tokens: int) -> dict[str, Any]:
    """:func:`one_row` in a new interpreter with an empty inductor cache; its JSON line back."""
    with tempfile.TemporaryDirectory(prefix="inductor-") as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
        done = subprocess.run([sys.executable, "-m", "bench.training_speed_measured", "--row", row,
                               "--precisions", precision, "--tokens", str(tokens)],
                              env=env, capture_output=True, text=True, timeout=4 * 3600)
    if done.returncode != 0:
        raise RuntimeError(f"{row} {precision} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarise(repeats: list[dict[str, Any]], precisions: list[str]) -> dict[str, Any]:
    """Per precision: each row's rates and our ratio to each peer row, taken within each repeat."""
    summary = {}
    for p in precisions:
        summary[f"rates_{p}"] = {row: spread([r[f"{row}_{p}"]["tokens_per_s"] for r in repeats]) for row in ROWS}
        for peer in ("saelens", "saelens_compiled"):
            summary[f"ours_{p}_vs_{peer}_{p}"] = spread([r[f"ours_{p}"]["tokens_per_s"] / r[f"{peer}_{p}"]["tokens_per_s"]
                                                        for r in repeats])
    return summary


def existing_repeats(path: Path, tokens: int, precisions: list[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The runs already in ``path`` and their provenance (``--add-to-existing``); refused unless alike."""
    if not path.exists():
        raise SystemExit(f"--add-to-existing: {path} does not exist; run without it first")
    old = json.loads(path.read_text())
    if old["tokens_per_run"] != tokens or old["precisions"] != precisions:
        raise SystemExit(f"--add-to-existing: {path.name} holds {old['tokens_per_run']:,} tokens a run in "
                         f"{old['precisions']}, not {tokens:,} in {precisions}; pass the same --tokens / --precisions")
    measured = old.get("measured") or [{"written_at": old["written_at"], "repeats": old["repeats"],
                                        "command": old["command"], "commit": None,
                                        "wall_seconds": old.get("wall_seconds")}]
    return old["runs"], measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=FULL_TOKENS, help="tokens per training run")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved repeats of every row")
    parser.add_argument("--precisions", default="bfloat16", help="comma-separated")
    parser.add_argument("--add-to-existing", action="store_true",
                        help="add the repeats to the existing result file (see the module docstring)")
    parser.add_argument("--label", help="write training_speed_measured_<precisions>_<label>.json, a measurement "
                        "apart from the make bench record's file (the README table shows every labelled file as rows of its own)")
    parser.add_argument("--row", choices=ROWS, help=argparse.SUPPRESS)  # one run, in a child process
    args = parser.parse_args()
    if args.repeats < 1 or args.tokens < 4096:
        parser.error("--repeats must be >= 1 and --tokens >= 4096")
    if args.label is not None and not args.label.replace("_", "").isalnum():
        parser.error(f"--label must be letters, digits and underscores, got {args.label!r}")
    logging.basicConfig(level=logging.WARNING)
    if args.row:
        print(json.dumps(one_row(args.row, args.precisions, args.tokens), default=str))
        return
    precisions, began = args.precisions.split(","), time.perf_counter()
    suffix = "" if args.tokens >= FULL_TOKENS else f"_{args.tokens}"  # a smoke run never replaces the full result
    name = "training_speed_measured_" + "_".join(precisions) + suffix + (f"_{args.label}" if args.label else "")
    runs, measured = existing_repeats(RESULTS_DIR / f"{name}.json", args.tokens, precisions) \
        if args.add_to_existing else ([], [])  # checked before the first run: a mismatch costs nothing
    for repeat in range(args.repeats):
        rows = {}
        for precision in precisions:
            for row in ROWS:
                rows[f"{row}_{precision}"] = run_in_fresh_process(row, precision, args.tokens)
                print(f"repeat {repeat + 1}/{args.repeats} {row}_{precision}: "
                      f"{rows[f'{row}_{precision}']['tokens_per_s']:,.0f} tokens/s", flush=True)
        runs.append(rows)
    measured.append({"written_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "repeats": args.repeats,
                     "command": " ".join(sys.argv), "commit": git_commit(), "wall_seconds": time.perf_counter() - began})
    summary = summarise(runs, precisions)
    record = {"tokens_per_run": args.tokens, "repeats": len(runs), "precisions": precisions, "label": args.label,
              "command": "; ".join(m["command"] for m in measured), "measured": measured, "runs": runs,
              "summary": summary, "wall_seconds": sum(m.get("wall_seconds") or 0 for m in measured)}
    path = write_result(name, record)
    for key, value in summary.items():
        print(key, json.dumps(value, default=lambda v: round(v, 3)))
    print(f"wrote {path} in {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
