"""The store bench's >= 1M-token rows: every compile on the clock, repeated and interleaved.

    python -m bench.bench_activations                         # the rounds, then --long-repeats (3) of these
    python -m bench.store_long_run --add-repeats 2            # more repeats, added to bench_activations.json

Four cases a repeat, on the same Shakespeare pieces (bf16): ours compiled, SAELens compiled (its
``run_with_cache`` through ``torch.compile``), ours eager, SAELens eager. ``torch._dynamo.reset()``
before each case, so each compiled side pays its graph capture and compile inside its timed call;
inductor's on-disk cache is warm on both sides (from the rounds, or from the untimed warm-up
``--add-repeats`` runs first). The order alternates between repeats (forward, then reversed), so a
drift of the machine's speed does not favour one side; each repeat's ratios are taken within it
and reported as median with min-max.

``--add-repeats`` adds repeats to the existing ``bench/results/bench_activations.json`` (same target
tokens, refused otherwise) without rerunning its rounds, for a session too short for the whole
bench; ``measured`` records each batch's date, commit, command and seconds.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import RESULTS_DIR, git_commit, spread
from sae_core.files import atomic_write_json

CASES = ("ours_compiled_compile_counted", "saelens_compiled_compile_counted", "ours_eager", "saelens_eager")
RATIOS = {"ratio_compiled_compile_counted": ("ours_compiled_compile_counted", "saelens_compiled_compile_counted"),
          "ratio_ours_compiled_over_saelens_eager": ("ours_compiled_compile_counted", "saelens_eager"),
          "ratio_eager": ("ours_eager", "saelens_eager")}
PRECISION = "bfloat16"
LONG_REPEATS = 3  # interleaved repeats `make bench` runs (bench_activations --long-repeats default)


def _cases(model: Any, n_tokens: int, root: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The four timed calls and the documents' description (the same documents on both sides)."""
    import datasets

    from bench import bench_activations as ba

    texts = ba.shakespeare_pieces()
    corpus = datasets.Dataset.from_dict({"text": texts})
    docs = ba.documents_for(texts, model.tokenizer, n_tokens)
    calls = {"ours_compiled_compile_counted": lambda: ba.run_save(model, [ba.HOOK], docs, PRECISION, root,
                                                                  ba.TOKEN_BUDGET, pack=True, compile_forward=True),
             "saelens_compiled_compile_counted": lambda: ba.run_saelens_compiled(model, [ba.HOOK], corpus, n_tokens,
                                                                                 PRECISION, root),
             "ours_eager": lambda: ba.run_save(model, [ba.HOOK], docs, PRECISION, root, ba.TOKEN_BUDGET, pack=True),
             "saelens_eager": lambda: ba.run_saelens(model, [ba.HOOK], corpus, n_tokens, PRECISION, root)}
    about = {"target_tokens": n_tokens, "documents": len(docs), "text": "Shakespeare in ~350-character pieces"}
    return calls, about


def run_repeats(model: Any, n_tokens: int, root: Path, repeats: int, first: int = 0) -> tuple[list[dict], dict]:
    """``repeats`` interleaved repeats of the four cases (repeat ``first`` onwards sets the order)."""
    from bench import bench_activations as ba

    calls, about = _cases(model, n_tokens, root)
    runs = []
    for index in range(first, first + repeats):
        order = list(CASES) if index % 2 == 0 else list(reversed(CASES))
        run: dict[str, Any] = {"repeat": index, "order": order}
        for name in order:
            torch._dynamo.reset()
            ba._PEER_COMPILED.clear()
            start = time.perf_counter()
            tokens = calls[name]()
            seconds = time.perf_counter() - start
            run[name] = {"tokens": tokens, "seconds": round(seconds, 1), "tokens_per_s": round(tokens / seconds, 1)}
            logging.getLogger("bench").info("long run %d %s: %.0f tokens/s", index, name, tokens / seconds)
        runs.append(run)
    return runs, about


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-case median rates and per-repeat ratios (median, min, max, values)."""
    out: dict[str, Any] = {"repeats": len(runs),
                           "rates_median": {c: round(statistics.median(r[c]["tokens_per_s"] for r in runs), 1)
                                            for c in CASES}}
    for name, (ours, peer) in RATIOS.items():
        out[name] = spread([r[ours]["tokens_per_s"] / r[peer]["tokens_per_s"] for r in runs])  # rounded when shown
    return out


def as_runs(long: dict[str, Any]) -> list[dict[str, Any]]:
    """A long-run entry's repeats; a file from before repeats holds one run at its top level."""
    if "runs" in long:
        return long["runs"]
    return [{"repeat": 0, "order": list(CASES), **{c: long[c] for c in CASES}}]


def long_run(model: Any, n_tokens: int, root: Path, repeats: int, earlier: dict[str, Any] | None = None,
             command: str = "python -m bench.bench_activations") -> dict[str, Any]:
    """The result file's ``long_run_bfloat16`` entry: ``earlier``'s repeats (if any) plus ``repeats`` new ones."""
    before = as_runs(earlier) if earlier else []
    began = time.perf_counter()
    runs, about = run_repeats(model, n_tokens, root, repeats, first=len(before))
    from bench.common import machine_info

    measured = [*(earlier or {}).get("measured", []), {"written_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "repeats": repeats,
                            "commit": git_commit(), "command": command,
                            "seconds": round(time.perf_counter() - began), "machine": machine_info()}]
    return {**about, "runs": before + runs, "measured": measured, "summary": summarise(before + runs)}


def existing(path: Path, n_tokens: int) -> dict[str, Any]:
    """The whole result file whose long run ``--add-repeats`` extends; refused unless alike."""
    if not path.exists():
        raise SystemExit(f"--add-repeats: {path} does not exist; run `python -m bench.bench_activations` first")
    result = json.loads(path.read_text())
    long = result.get("long_run_bfloat16")
    if not long:
        raise SystemExit(f"--add-repeats: {path.name} has no long_run_bfloat16; run `python -m bench.bench_activations`")
    if long["target_tokens"] != n_tokens:
        raise SystemExit(f"--add-repeats: {path.name}'s long run has {long['target_tokens']:,} target tokens, not "
                         f"{n_tokens:,}; pass --tokens {long['target_tokens']}")
    if "measured" not in long:  # written before repeats: its one run came with the rounds
        long["measured"] = [{"written_at": result["written_at"], "repeats": len(as_runs(long)), "commit": None,
                             "command": "python -m bench.bench_activations"}]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--add-repeats", type=int, required=True, help="interleaved repeats to add (>= 1)")
    parser.add_argument("--tokens", type=int, default=1_048_576, help="target tokens a run (as in the file)")
    args = parser.parse_args()
    if args.add_repeats < 1:
        parser.error("--add-repeats must be >= 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("sae_lens").setLevel(logging.WARNING)
    result = existing(RESULTS_DIR / "bench_activations.json", args.tokens)  # before any run: a mismatch costs nothing
    from bench import bench_activations as ba
    from bench.common import load_smollm2

    model = load_smollm2()
    with tempfile.TemporaryDirectory(prefix="store_long_run.") as tmp:
        # Untimed warm-up of both compiled sides on a few batches: inductor's disk cache then holds both
        # sides' kernels, as after the full bench's rounds.
        calls, _ = _cases(model, 8192, Path(tmp))
        for name in ("ours_compiled_compile_counted", "saelens_compiled_compile_counted"):
            calls[name]()
        ba._PEER_COMPILED.clear()
        command = "python -m bench.store_long_run " + " ".join(sys.argv[1:])
        result["long_run_bfloat16"] = long_run(model, args.tokens, Path(tmp), args.add_repeats,
                                               result["long_run_bfloat16"], command)
    path = atomic_write_json(RESULTS_DIR / "bench_activations.json", result)  # the rounds' date and machine kept
    logging.getLogger("bench").info("wrote %s: %s", path, result["long_run_bfloat16"]["summary"])


if __name__ == "__main__":
    main()
