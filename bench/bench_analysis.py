"""Benchmark of the out-of-core analysis: decoder similarity, co-occurrence, top-k neighbours.

    python -m bench.bench_analysis --quick      # smoke run, under a minute
    python -m bench.bench_analysis              # full run, about an hour, ~18 GB of scratch disk
    python -m bench.bench_analysis --cases similarity_blocked_n65536

Each case runs in a fresh subprocess that reports its own time and peak RSS (``VmHWM`` of
``/proc/self/status`` at exit; ``RUSAGE_CHILDREN`` would give the maximum over all children so far,
and ``ru_maxrss`` keeps the parent's peak across exec). ``baseline_rss_mb`` is the peak after imports and input
generation, before the measured work. Inputs are synthetic: Gaussian decoder rows, and for
co-occurrence a random CSR with ~``active`` distinct uniformly drawn latents per token (duplicates
dropped), not a trained SAE's firing pattern. Results are merged by case name into
``bench/results/analysis[_quick].json`` (``bench.common.write_result``: atomic, with machine info)
with the targets checked at the end. The machine is shared, so times vary with load; each case
records the load average when it started.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import RESULTS_DIR, write_result
from sae_core.files import read_json

REPO = Path(__file__).resolve().parent.parent
D_IN = 576  # SmolLM2-135M's d_model
TARGETS = [  # (description, measured case, reference case or None, metric, limit)
    ("similarity peak RSS at 65,536 latents <= 1 GB", "similarity_blocked_n65536", None, "peak_rss_mb", 1024),
    ("similarity time <= 1.2x dense at 16,384", "similarity_blocked_n16384", "similarity_dense_n16384", "seconds", 1.2),
    ("co-occurrence peak RSS <= 1.2 GB", "cooccurrence_blocked_t1000000_n16384", None, "peak_rss_mb", 1229),
    ("co-occurrence time <= one-shot X.T @ X", "cooccurrence_blocked_t1000000_n16384",
     "cooccurrence_oneshot_t1000000_n16384", "seconds", 1.0),
    ("top-k at 262,144 latents peak RSS <= 1.2 GB", "topk_similarity_n262144", None, "peak_rss_mb", 1229),
]


def case_table(quick: bool) -> dict[str, dict]:
    sim = [2048] if quick else [16_384, 65_536]
    tokens, n_cooc = (20_000, 2048) if quick else (1_000_000, 16_384)
    n_topk, topk_chunk = (8192, 256) if quick else (262_144, 128)
    table: dict[str, dict] = {}
    for n in sim:
        table[f"similarity_blocked_n{n}"] = {"kind": "similarity_blocked", "n": n, "chunk_size": 1024, "metric": "cosine"}
        table[f"similarity_dense_n{n}"] = {"kind": "similarity_dense", "n": n, "metric": "cosine"}
    for kind in ("blocked", "oneshot"):
        table[f"cooccurrence_{kind}_t{tokens}_n{n_cooc}"] = {
            "kind": f"cooccurrence_{kind}", "n_tokens": tokens, "n": n_cooc, "active": 30, "chunk_size": 512,
            "metric": "jaccard"}
    table[f"topk_similarity_n{n_topk}"] = {"kind": "topk_similarity", "n": n_topk, "k": 10,
                                           "chunk_size": topk_chunk, "metric": "cosine"}
    return table


def peak_rss_mb() -> float:
    """This process's peak RSS: ``VmHWM`` (reset by exec), else ``ru_maxrss``.

    ``ru_maxrss`` survives exec on Linux, so a child would inherit its parent's peak.
    """
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def available_memory() -> int:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes (0 where it cannot be read)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def decoder(n: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((n, D_IN), dtype=np.float32)


def synthetic_store(scratch: Path, n_tokens: int, n: int, active: int) -> Path:
    """A random CSR (~``active`` latents per token), built once per shape and reused."""
    import scipy.sparse as sp

    from sae_core.latents import CSRBuilder

    folder = scratch / f"csr_t{n_tokens}_n{n}_a{active}"
    if folder.exists():
        return folder
    rng = np.random.default_rng(0)
    with CSRBuilder(n, workdir=scratch) as builder:
        for start in range(0, n_tokens, 65_536):
            rows = min(65_536, n_tokens - start)
            cols = np.sort(rng.integers(0, n, (rows, active)), axis=1)
            keep = np.ones_like(cols, dtype=bool)
            keep[:, 1:] = cols[:, 1:] != cols[:, :-1]  # drop duplicate draws
            indptr = np.concatenate([[0], np.cumsum(keep.sum(axis=1))])
            matrix = sp.csr_matrix((rng.random(indptr[-1], dtype=np.float32) + 0.1, cols[keep], indptr),
                                   shape=(rows, n))
            row_ids = np.arange(start, start + rows)
            builder.add(matrix, rng.integers(0, 49_152, rows), row_ids // 128, row_ids % 128)
        builder.finish(folder)
    return folder


def run_case(params: dict, scratch: Path) -> dict:
    """Run one case in this process; return its measurements."""
    from sae_core.latents import LatentCSR
    from sae_core.similarity import (
        compute_feature_cooccurrence,
        compute_feature_similarity,
        similarity_blocks,
        top_k_neighbours,
    )

    kind, out = params["kind"], Path(tempfile.mkdtemp(prefix="bench-", dir=scratch))
    try:
        if kind.startswith("cooccurrence"):
            csr = LatentCSR.load(scratch / params["store"])
        else:
            W = decoder(params["n"])
        baseline, start = peak_rss_mb(), time.perf_counter()
        if kind == "similarity_blocked":
            compute_feature_similarity(W, params["metric"], params["chunk_size"], out=out)
        elif kind == "similarity_dense":
            normed = W / np.linalg.norm(W, axis=1, keepdims=True)
            result = normed @ normed.T  # noqa: F841 - the dense (n, n) matrix is the measured cost
        elif kind == "cooccurrence_blocked":
            compute_feature_cooccurrence(csr, params["metric"], params["chunk_size"], out=out)
        elif kind == "cooccurrence_oneshot":
            import scipy.sparse as sp

            binary = sp.csr_matrix((np.ones(csr.nnz, np.int32), csr.indices, csr.indptr),
                                   shape=(csr.n_rows, csr.n_features))
            product = binary.T @ binary  # noqa: F841
        elif kind == "topk_similarity":
            top_k_neighbours(similarity_blocks(W, params["metric"], params["chunk_size"]), params["k"])
        else:
            raise ValueError(f"unknown case kind {kind!r}")
        seconds = time.perf_counter() - start
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return {"seconds": round(seconds, 3), "peak_rss_mb": round(peak_rss_mb(), 1),
            "baseline_rss_mb": round(baseline, 1)}


def run_in_child(name: str, params: dict, scratch: Path) -> dict:
    if params["kind"].startswith("cooccurrence"):
        params = {**params, "store": synthetic_store(scratch, params["n_tokens"], params["n"], params["active"]).name}
    record = {**params, "load_average_at_start": os.getloadavg()[0], "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    needed = params["n"] ** 2 * 4
    if params["kind"] == "similarity_dense" and needed + (2 << 30) > available_memory():
        return {**record, "skipped": True, "note": f"dense ({params['n']}, {params['n']}) float32 needs "
                f"{needed / 1e9:.1f} GB (+2 GB headroom), {available_memory() / 1e9:.1f} GB available; not run. "
                "Time estimated as the 16,384 dense case x (n/16384)^2."}
    command = [sys.executable, "-m", "bench.bench_analysis", "--child", json.dumps(params), "--scratch", str(scratch)]
    done = subprocess.run(command, capture_output=True, text=True, check=False, cwd=REPO)
    if done.returncode != 0:
        return {**record, **child_failure(params, done.returncode, done.stderr)}
    return {**record, **json.loads(done.stdout.strip().splitlines()[-1])}


def child_failure(params: dict, returncode: int, stderr: str) -> dict:
    """What a failed case records: its exit status, the signal that killed it, and its output's tail or why there is none."""
    failure = {"returncode": returncode, "error": stderr[-2000:].strip()}
    if returncode < 0:
        name = signal.Signals(-returncode).name
        failure["signal"] = name
        failure["error"] = failure["error"] or f"killed by {name} with no output"
        if name == "SIGSEGV" and params["kind"] == "similarity_dense" and params["n"] ** 2 >= 2**31:
            failure["note"] = ("numpy sends A @ A.T to BLAS syrk, which crashes above 2**31 outputs with some OpenBLAS "
                               "kernels (numpy/numpy#19685; here the Haswell kernel of numpy's OpenBLAS)")
    return failure


def check_targets(cases: dict) -> list[dict]:
    checks = []
    for what, measured, reference, metric, limit in TARGETS:
        value = cases.get(measured, {}).get(metric)
        if reference is not None:
            base = cases.get(reference, {}).get(metric)
            value = None if value is None or base is None else round(value / base, 3)
        checks.append({"target": what, "value": value, "limit": limit, "met": None if value is None else value <= limit})
    return checks


def estimate_skipped(cases: dict) -> None:
    """Give the skipped dense 65,536 case a time estimate from the measured 16,384 one."""
    dense16, dense64 = cases.get("similarity_dense_n16384", {}), cases.get("similarity_dense_n65536")
    if dense64 and dense64.get("skipped") and dense16.get("seconds"):
        dense64["estimated_seconds"] = round(dense16["seconds"] * 16, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--cases", nargs="*", help="run only these case names")
    parser.add_argument("--scratch", default=os.path.join(tempfile.gettempdir(), "sae_core_bench"),
                        help="folder for inputs and outputs (the full run needs ~20 GB free)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    scratch = Path(args.scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    if args.child:
        print(json.dumps(run_case(json.loads(args.child), scratch)))
        return
    table = case_table(args.quick)
    unknown = set(args.cases or []) - set(table)
    if unknown:
        raise SystemExit(f"unknown cases {sorted(unknown)}; known ({'quick' if args.quick else 'full'}): {sorted(table)}")
    result_name = "analysis_quick" if args.quick else "analysis"
    previous = RESULTS_DIR / f"{result_name}.json"
    cases = read_json(previous)["cases"] if previous.exists() else {}
    for name, params in table.items():
        if args.cases and name not in args.cases:
            continue
        cases[name] = {**run_in_child(name, params, scratch), "quick": args.quick}
        estimate_skipped(cases)
        print(name, json.dumps(cases[name]), flush=True)
        write_result(result_name, {"cases": cases, "targets": check_targets(cases)})
    for check in check_targets(cases):
        print(json.dumps(check))


if __name__ == "__main__":
    main()
