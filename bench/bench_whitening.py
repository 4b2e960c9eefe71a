"""Whitening statistics must not be the bottleneck: accumulation throughput vs the SmolLM2 forward.

    python -m bench.bench_whitening --quick     # 2 repeats (shared machines)
    python -m bench.bench_whitening             # 5 repeats

Measures, in one run: the bare forward of SmolLM2-135M-Instruct to ``blocks.10.hook_resid_post``
(``stop_at_layer=11``, batch 32 x 128, the constant file's forward dtype), and
``IncrementalWhitener.update`` on one forward's worth of rows (4096) at d=576 (the real hook's
activations) and d=2304 (random rows). Forward and accumulation are timed in interleaved pairs
and the cost ratio is the median of the per-pair ratios, so machine load drifts cancel.
Target: accumulation < 5% of the forward time at d=576. Also reported: ``Whitener.forward``
(pass two's cost per batch) and the eigendecomposition that builds the transform.
Results go to ``bench/results/whitening.json``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.common import load_smollm2, write_result
from sae_core.activations import run_to_hooks
from sae_core.models import load_run_config
from sae_core.whitening import IncrementalWhitener

HOOK = "blocks.10.hook_resid_post"
BATCH, SEQ = 32, 128


def seconds(fn, repeats: int) -> list[float]:
    """Wall time of ``repeats`` calls of ``fn`` (after one warm-up call)."""
    fn()
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 repeats instead of 5")
    args = parser.parse_args()
    repeats = 2 if args.quick else 5
    forward_dtype = load_run_config("smollm2_135m_instruct").forward.dtype

    model = load_smollm2("float32")
    tokens = torch.randint(3, model.cfg.d_vocab, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    real = run_to_hooks(model, [HOOK], tokens, forward_dtype)[HOOK].reshape(-1, model.cfg.d_model)  # (4096, 576)
    rows = {576: real.float(), 2304: torch.randn(BATCH * SEQ, 2304, generator=torch.Generator().manual_seed(1))}

    # interleaved pairs: forward, then accumulating its rows
    stats = IncrementalWhitener(576)
    fwd, acc = [], []
    for _ in range(repeats + 1):
        fwd += seconds(lambda: run_to_hooks(model, [HOOK], tokens, forward_dtype), 1)
        acc += seconds(lambda: stats.update(rows[576]), 1)
    fwd, acc = fwd[1:], acc[1:]  # the first pair warms up
    ratios = [a / f for a, f in zip(acc, fwd, strict=True)]

    per_d = {}
    for d, x in rows.items():
        s = IncrementalWhitener(d)
        update_s = seconds(lambda s=s, x=x: s.update(x), repeats)
        start = time.perf_counter()
        whitener = s.to_whitener("zca", eps=1e-4)  # one eigendecomposition: seconds at d=2304
        build_s = time.perf_counter() - start
        whiten_s = seconds(lambda w=whitener, x=x: w.forward(x), repeats)
        per_d[str(d)] = {"rows_per_batch": x.shape[0],
                         "update_rows_per_s": x.shape[0] / statistics.median(update_s),
                         "update_seconds": update_s,
                         "whiten_forward_rows_per_s": x.shape[0] / statistics.median(whiten_s),
                         "to_whitener_seconds": build_s}

    ratio = statistics.median(ratios)
    payload = {
        "quick": args.quick, "repeats": repeats, "hook": HOOK, "batch": [BATCH, SEQ],
        "forward_dtype": forward_dtype, "stop_at_layer": 11,
        "forward_seconds": fwd, "forward_tokens_per_s": BATCH * SEQ / statistics.median(fwd),
        "accumulate_seconds_d576": acc, "accumulate_over_forward": ratios,
        "accumulate_over_forward_median": ratio, "target": 0.05, "meets_target": ratio < 0.05,
        "per_d": per_d,
    }
    path = write_result("whitening", payload)
    print(f"forward {statistics.median(fwd):.3f} s/batch ({payload['forward_tokens_per_s']:.0f} tok/s); "
          f"accumulate d=576 {statistics.median(acc) * 1e3:.1f} ms/batch = {ratio:.1%} of the forward "
          f"(target < 5%: {'met' if ratio < 0.05 else 'NOT met'})")
    for d, r in per_d.items():
        print(f"d={d}: update {r['update_rows_per_s']:.3g} rows/s, whiten {r['whiten_forward_rows_per_s']:.3g} rows/s, "
              f"to_whitener {r['to_whitener_seconds']:.2f} s")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
