"""Forward precision on this CPU: the rates behind what ``"auto"`` chooses (``sae_core.precision``).

    python -m bench.bench_precision            # 5 interleaved rounds
    python -m bench.bench_precision --quick    # 2 rounds

In one run, interleaved round by round (float32 then bfloat16, the order reversed every other round):
a bare matmul of SmolLM2's MLP shape (``F.linear`` of 4096 x 576 rows by a 1536 x 576 weight, 10
calls a round after a warm-up) in float32 and in bfloat16, and SmolLM2-135M-Instruct's eager forward
to ``blocks.10.hook_resid_post`` (8 x 128 random tokens a call, 2 calls a round) in float32 and under
bfloat16 autocast. Each ratio is bfloat16's rate over float32's, median of the rounds with min-max.
``"auto"`` should pick bfloat16 exactly where that ratio is above 1.

Results go to ``bench/results/precision.json``, one entry per kind of CPU (its SIMD level and native
half precisions), so machines of different kinds keep their own entries side by side.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from bench.common import RESULTS_DIR, load_smollm2, machine_info, spread, write_result
from sae_core.activations import run_to_hooks
from sae_core.precision import auto_dtype, native_half_dtypes

HOOK = "blocks.10.hook_resid_post"
ROWS, D_MODEL, D_MLP = 4096, 576, 1536
BATCH, SEQ = 8, 128
DTYPES = ("float32", "bfloat16")


def _timed(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def measure(rounds: int) -> dict[str, dict[str, list[float]]]:
    """Per dtype, per round: matmul GFLOP/s and forward tokens/s."""
    model = load_smollm2()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.cfg.d_vocab, (BATCH, SEQ), generator=gen)
    operands = {name: (torch.randn(ROWS, D_MODEL, generator=gen).to(getattr(torch, name)),
                       torch.randn(D_MLP, D_MODEL, generator=gen).to(getattr(torch, name))) for name in DTYPES}
    calls = {name: (lambda a=a, w=w: F.linear(a, w)) for name, (a, w) in operands.items()}
    forwards = {name: (lambda name=name: run_to_hooks(model, [HOOK], ids, name)) for name in DTYPES}
    for name in DTYPES:  # warm-up
        calls[name]()
        forwards[name]()
    out: dict[str, dict[str, list[float]]] = {name: {"matmul_gflops": [], "forward_tokens_per_s": []} for name in DTYPES}
    for index in range(rounds):
        for name in DTYPES if index % 2 == 0 else DTYPES[::-1]:
            out[name]["matmul_gflops"].append(2 * ROWS * D_MODEL * D_MLP / _timed(calls[name], 10) / 1e9)
            out[name]["forward_tokens_per_s"].append(BATCH * SEQ / _timed(forwards[name], 2))
    return out


def summarise(rates: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, object]]:
    """Median and min-max per dtype and measure, and bfloat16 over float32 per round."""
    summary: dict[str, dict[str, object]] = {}
    for measure_name in ("matmul_gflops", "forward_tokens_per_s"):
        fp32, bf16 = rates["float32"][measure_name], rates["bfloat16"][measure_name]
        summary[measure_name] = {"float32": spread([round(v, 1) for v in fp32]),
                                 "bfloat16": spread([round(v, 1) for v in bf16]),
                                 "bfloat16_over_float32": spread([b / f for b, f in zip(bf16, fp32, strict=True)])}
    return summary


def machine_kind() -> str:
    """``AVX2, native half: none``: what decides the choice, the key of this machine's entry."""
    return f"{torch.backends.cpu.get_cpu_capability()}, native half: {', '.join(native_half_dtypes('cpu')) or 'none'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 rounds instead of 5")
    args = parser.parse_args()
    rounds = 2 if args.quick else 5
    began = time.perf_counter()
    summary = summarise(measure(rounds))
    forward_ratio = summary["forward_tokens_per_s"]["bfloat16_over_float32"]["median"]
    entry = {"written_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "rounds": rounds, "auto_chooses": auto_dtype("cpu"),
             "auto_is_the_faster": (auto_dtype("cpu") == "bfloat16") == (forward_ratio > 1),
             "seconds": round(time.perf_counter() - began, 1), "machine": machine_info(), **summary}
    path = RESULTS_DIR / "precision.json"
    kinds = json.loads(path.read_text())["kinds"] if path.exists() else {}
    kinds[machine_kind()] = entry
    print(json.dumps({machine_kind(): entry}, indent=2))
    write_result("precision", {"shapes": {"matmul": [ROWS, D_MODEL, D_MLP], "forward": [BATCH, SEQ, HOOK]},
                               "kinds": kinds})


if __name__ == "__main__":
    main()
