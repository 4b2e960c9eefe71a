"""Our training at two commits, ABBA: what one code change does to the compile-counted 1M-token row.

    python -m bench.ab_versions --before ebb9355 --after fdeb04b            # bf16, 1,048,576 tokens, ABBA
    python -m bench.ab_versions --before A --after B --rounds 2 --precision float32

Each commit is checked out with ``git worktree`` into a temporary folder, and each run is
``python -m bench.training_speed_measured --row ours`` inside that checkout (so it imports that
commit's ``sae_core`` and ``bench``), a fresh process with an empty inductor cache, exactly as the
measured rows run. Runs alternate before / after / after / before per round, so a drift of the
machine favours neither. SAELens is not run: the ratio between the two commits is the result,
taken from the medians of each commit's runs (range: slowest over fastest pairing). Results:
``bench/results/ab_versions_<before>_<after>.json`` with every run's profile (forward / data / step / other).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import spread, write_result

ROOT_DIR = Path(__file__).resolve().parent.parent


def _checkout(commit: str, folder: Path) -> str:
    """``commit`` checked out (detached) into ``folder``; its short hash."""
    done = subprocess.run(["git", "worktree", "add", "--detach", str(folder), commit], cwd=ROOT_DIR,
                          capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"cannot check out {commit!r}: {done.stderr.strip()}; name a commit of this repository")
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=folder, capture_output=True, text=True,
                          check=True).stdout.strip()


def _remove(folder: Path) -> None:
    subprocess.run(["git", "worktree", "remove", "--force", str(folder)], cwd=ROOT_DIR, capture_output=True, check=False)


def one_run(checkout: Path, precision: str, tokens: int) -> dict[str, Any]:
    """Our row, in a fresh process inside ``checkout``, with an empty inductor cache."""
    with tempfile.TemporaryDirectory(prefix="inductor-") as cache:
        done = subprocess.run([sys.executable, "-m", "bench.training_speed_measured", "--row", "ours",
                               "--precisions", precision, "--tokens", str(tokens)], cwd=checkout,
                              env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}, capture_output=True, text=True,
                              timeout=4 * 3600)
    if done.returncode:
        raise RuntimeError(f"the run in {checkout} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", required=True, help="commit without the change")
    parser.add_argument("--after", required=True, help="commit with it")
    parser.add_argument("--rounds", type=int, default=1, help="before/after/after/before rounds")
    parser.add_argument("--precision", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--tokens", type=int, default=1_048_576)
    args = parser.parse_args()
    if args.rounds < 1 or args.tokens < 4096:
        parser.error("--rounds must be >= 1 and --tokens >= 4096")
    began, runs = time.perf_counter(), []
    with tempfile.TemporaryDirectory(prefix="ab-versions-") as scratch:
        folders = {side: Path(scratch) / side for side in ("before", "after")}
        commits = {side: _checkout(getattr(args, side), folder) for side, folder in folders.items()}
        try:
            for _ in range(args.rounds):
                for side in ("before", "after", "after", "before"):
                    started, load = time.strftime("%Y-%m-%dT%H:%M:%S"), os.getloadavg()[0]
                    row = one_run(folders[side], args.precision, args.tokens)
                    runs.append({"version": side, "commit": commits[side], "started_at": started,
                                 "load_average": load, **row})
                    print(f"{side} {commits[side]}: {row['tokens_per_s']:,.0f} tokens/s", flush=True)
        finally:
            for folder in folders.values():
                _remove(folder)
    rates = {side: spread([r["tokens_per_s"] for r in runs if r["version"] == side]) for side in ("before", "after")}
    ratio = {"median": rates["after"]["median"] / rates["before"]["median"],
             "min": rates["after"]["min"] / rates["before"]["max"], "max": rates["after"]["max"] / rates["before"]["min"]}
    path = write_result(f"ab_versions_{commits['before']}_{commits['after']}", {
        "precision": args.precision, "tokens_per_run": args.tokens, "commits": commits, "rates": rates,
        "after_vs_before": ratio, "runs": runs, "command": " ".join(sys.argv),
        "wall_seconds": time.perf_counter() - began})
    print(f"after / before: {ratio['median']:.3f} ({ratio['min']:.3f}-{ratio['max']:.3f}); wrote {path}")


if __name__ == "__main__":
    main()
