"""Training quality on ground truth: our loop and SAELens's synthetic runner on the same activations.

    python -m bench.bench_synthetic [--rows 300000] [--repeats 3] [--quick]

A comparison with no forward-pass noise. The problem is the golden test's (``tests/test_synthetic.py``):
SAELens's ``FeatureDictionary`` (128 features in 64 dimensions, orthogonalised) and an
``ActivationGenerator`` with Zipfian firing, a random correlation matrix and a hierarchy.

Like for like, per architecture and seed:
- **Same start.** One SAE is built with ``build_training_sae`` (our seeded init, SAELens's class);
  SAELens gets a copy through ``SyntheticSAERunner(..., override_sae=...)``, and its ``b_dec`` is
  set to the mean of the first batch, as ours is (``SAE.b_dec_init="mean"``).
- **Same data, same order.** SAELens's runner draws its rows through ``SyntheticActivationIterator``
  from the generator under the seed set just before ``run()``; ours draws the same rows from the
  same generator under the same seed, with the same batch size, and trains without a shuffle
  buffer larger than one batch (a permutation inside a batch leaves its gradient unchanged). The
  first batch of each side is checksummed to prove it.
- **Same optimisation.** Adam (0.9, 0.999), the same constant lr and no decay, gradient clipping at
  1.0 (SAELens's fixed value), float32, batch 1024; AuxK dead window the same number of rows.
- **Each side's clock** covers drawing its rows and training (SAELens draws inside its loop; we
  time our draw plus our training).
Scored by SAELens's ``eval_sae_on_synthetic_data`` (MCC, uniqueness, dead latents, shrinkage) on
the same fresh rows. At equal steps, then at equal wall time: the faster side trains again on as
many rows as it gets through in the slower side's median wall time.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import statistics
import time
from typing import Any

import torch

from bench.common import write_result

D_IN, N_FEATURES, BATCH, LR = 64, 128, 1024, 4e-3
ARCHITECTURES = {"topk": dict(k=4), "jumprelu": dict()}


def problem(seed: int) -> tuple[Any, Any]:
    """The golden test's feature dictionary and correlated, hierarchical generator."""
    from sae_lens import synthetic

    torch.manual_seed(seed)
    features = synthetic.FeatureDictionary(N_FEATURES, D_IN, seed=seed)
    hierarchy = synthetic.generate_hierarchy(N_FEATURES, synthetic.HierarchyConfig(
        total_root_nodes=N_FEATURES // 16, branching_factor=4, max_depth=1, mutually_exclusive_portion=0.5,
        compensate_probabilities=True), seed=seed)
    generator = synthetic.ActivationGenerator(
        N_FEATURES, synthetic.zipfian_firing_probabilities(N_FEATURES, exponent=0.5, max_prob=0.08, min_prob=0.01),
        std_firing_magnitudes=0.2, mean_firing_magnitudes=1.0, modify_activations=hierarchy.modifier,
        correlation_matrix=synthetic.generate_random_correlation_matrix(
            N_FEATURES, min_correlation_strength=0.05, max_correlation_strength=0.3, seed=seed))
    return features, generator


def config(architecture: str, rows: int, seed: int) -> Any:
    from sae_core.config import TrainingConfig, build_flat

    return build_flat(TrainingConfig, "training", hook_points=("synthetic",), architecture=architecture,
                      d_sae=N_FEATURES, train_batch_size_tokens=BATCH, total_training_tokens=rows,
                      shuffle_buffer_tokens=BATCH, checkpoint_every_tokens=None, dead_window_tokens=50 * BATCH,
                      seed=seed, sae_dtype="float32", lr=LR, lr_decay_fraction=0.0, max_grad_norm=1.0,
                      **ARCHITECTURES[architecture])


def _digest(batch: torch.Tensor) -> str:
    return hashlib.sha256(batch.detach().float().contiguous().numpy().tobytes()).hexdigest()[:16]


def draw(features: Any, generator: Any, rows: int, data_seed: int) -> list[torch.Tensor]:
    """The rows SAELens's ``SyntheticActivationIterator`` yields under ``data_seed``, in its batches."""
    from sae_lens.synthetic.training import SyntheticActivationIterator

    torch.manual_seed(data_seed)
    stream = SyntheticActivationIterator(features, generator, batch_size=BATCH)
    return [stream.next_batch() for _ in range(rows // BATCH)]


def run_ours(architecture: str, rows: int, seed: int, features: Any, generator: Any, folder: Any) -> dict[str, Any]:
    from sae_core.training import train_from_activations

    start = time.perf_counter()
    batches = draw(features, generator, rows, seed + 100)
    run = train_from_activations(lambda: iter(batches), config(architecture, rows, seed), folder)
    seconds = time.perf_counter() - start
    return {"sae": run.saes["synthetic"].sae, "seconds": seconds, "first_batch": _digest(batches[0])}


def run_saelens(architecture: str, rows: int, seed: int, features: Any, generator: Any, folder: Any) -> dict[str, Any]:
    """SAELens's ``SyntheticSAERunner`` from the same initial SAE on the same seeded stream."""
    import sae_lens.synthetic.synthetic_sae_runner as runner_module
    from sae_lens.synthetic import SyntheticModel, SyntheticModelConfig

    from sae_core.training import build_training_sae

    cfg = config(architecture, rows, seed)
    sae = build_training_sae(cfg, D_IN, "synthetic", seed)
    first = draw(features, generator, BATCH, seed + 100)[0]  # the stream's first batch, for the mean b_dec
    with torch.no_grad():
        sae.b_dec.copy_(first.double().mean(0).float())
    model = SyntheticModel(SyntheticModelConfig(num_features=N_FEATURES, hidden_dim=D_IN), feature_dict=features,
                           activation_generator=generator)
    sae_cfg = copy.deepcopy(sae.cfg)
    runner_cfg = runner_module.SyntheticSAERunnerConfig(
        synthetic_model=model.cfg, sae=sae_cfg, training_samples=rows, batch_size=BATCH, lr=LR, lr_end=LR,
        lr_scheduler_name="constant", lr_decay_steps=0, adam_beta1=0.9, adam_beta2=0.999, device="cpu",
        checkpoint_path=None, output_path=None, eval_samples=0, run_final_eval=False, dead_feature_window=50,
        feature_sampling_window=50)
    seen: list[str] = []
    original = runner_module.SyntheticActivationIterator

    class Recording(original):  # type: ignore[misc, valid-type]
        def next_batch(self) -> torch.Tensor:
            batch = super().next_batch()
            if not seen:
                seen.append(_digest(batch))
            return batch

    runner_module.SyntheticActivationIterator = Recording
    try:
        runner = runner_module.SyntheticSAERunner(runner_cfg, override_synthetic_model=model, override_sae=sae)
        torch.manual_seed(seed + 100)
        start = time.perf_counter()
        result = runner.run()
        seconds = time.perf_counter() - start
    finally:
        runner_module.SyntheticActivationIterator = original
    return {"sae": result.sae, "seconds": seconds, "first_batch": seen[0] if seen else None}


def score(sae: Any, features: Any, generator: Any, seed: int, eval_rows: int) -> dict[str, float]:
    from sae_lens import synthetic

    torch.manual_seed(seed + 200)
    result = synthetic.eval_sae_on_synthetic_data(sae, features, generator, num_samples=eval_rows)
    return {"mcc": round(result.mcc, 4), "uniqueness": round(result.uniqueness, 4),
            "dead_latents": int(result.dead_latents), "shrinkage": round(float(result.shrinkage), 4),
            "explained_variance": round(float(result.explained_variance), 4), "l0": round(float(result.sae_l0), 3)}


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 4), "min": round(min(values), 4), "max": round(max(values), 4)}


def compare(architecture: str, rows: int, seeds: list[int], eval_rows: int, tmp: Any) -> dict[str, Any]:
    """Interleaved runs (ours, SAELens, ours, ...) per seed at equal steps, then at equal wall time."""
    runs: dict[str, list[dict[str, Any]]] = {"ours": [], "saelens": []}
    for seed in seeds:
        features, generator = problem(seed)
        for side, fn in (("ours", run_ours), ("saelens", run_saelens)):
            out = fn(architecture, rows, seed, features, generator, tmp / f"{architecture}_{side}_{seed}")
            runs[side].append({"seed": seed, "seconds": round(out["seconds"], 2), "first_batch": out["first_batch"],
                               **score(out["sae"], features, generator, seed, eval_rows)})
    same_data = all(a["first_batch"] == b["first_batch"] for a, b in zip(runs["ours"], runs["saelens"], strict=True))
    seconds = {side: statistics.median(r["seconds"] for r in runs[side]) for side in runs}
    fast, slow = sorted(seconds, key=seconds.get)
    equal_time_rows = int(rows * seconds[slow] / seconds[fast]) // BATCH * BATCH
    equal_time = []
    for seed in seeds:
        features, generator = problem(seed)
        fn = run_ours if fast == "ours" else run_saelens
        out = fn(architecture, equal_time_rows, seed, features, generator, tmp / f"{architecture}_{fast}_time_{seed}")
        equal_time.append({"seed": seed, "seconds": round(out["seconds"], 2),
                           **score(out["sae"], features, generator, seed, eval_rows)})
    summary = {side: {metric: _spread([r[metric] for r in runs[side]])
                      for metric in ("mcc", "uniqueness", "dead_latents", "shrinkage", "explained_variance", "seconds")}
               for side in runs}
    ratios = [s["seconds"] / o["seconds"] for o, s in zip(runs["ours"], runs["saelens"], strict=True)]
    return {"rows": rows, "seeds": seeds, "same_first_batch": same_data, "runs": runs, "summary": summary,
            "speed_ratio_saelens_seconds_over_ours": _spread(ratios),
            "equal_wall_time": {"side": fast, "rows": equal_time_rows, "runs": equal_time,
                                "mcc": _spread([r["mcc"] for r in equal_time]),
                                "against": {"side": slow, "rows": rows, "mcc": summary[slow]["mcc"]}}}


def main(argv: list[str] | None = None) -> None:
    import tempfile
    from pathlib import Path

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=300_000)
    parser.add_argument("--repeats", type=int, default=3, help="seeds, each an interleaved pair")
    parser.add_argument("--eval-rows", type=int, default=20_000)
    parser.add_argument("--quick", action="store_true", help="smoke size: 20k rows, 1 seed")
    args = parser.parse_args(argv)
    rows, repeats = (20_480, 1) if args.quick else (args.rows, args.repeats)
    torch.set_num_threads(1)  # tiny matmuls: a second thread only contends (as in the golden test)
    settings = {"d_in": D_IN, "n_features": N_FEATURES, "batch": BATCH, "lr": LR, "lr_schedule": "constant, no decay",
                "adam_betas": [0.9, 0.999], "grad_clip": 1.0, "precision": "float32", "b_dec_start": "first-batch mean",
                "initial_sae": "build_training_sae (same weights both sides)", "torch_threads": 1,
                "differs": "none known; SAELens's TopK trains through its dense training_forward_pass, ours "
                           "through the sparse TopK step (fast_topk), JumpReLU through SAELens's on both sides"}
    with tempfile.TemporaryDirectory() as tmp:
        cases = {arch: compare(arch, rows, list(range(repeats)), args.eval_rows, Path(tmp)) for arch in ARCHITECTURES}
    write_result("synthetic_quick" if args.quick else "synthetic", {"settings": settings, "cases": cases})
    for arch, case in cases.items():
        o, s = case["summary"]["ours"], case["summary"]["saelens"]
        print(f"{arch}: MCC ours {o['mcc']['median']} [{o['mcc']['min']}, {o['mcc']['max']}] vs SAELens "
              f"{s['mcc']['median']} [{s['mcc']['min']}, {s['mcc']['max']}]; time ratio "
              f"{case['speed_ratio_saelens_seconds_over_ours']}; same data {case['same_first_batch']}")


if __name__ == "__main__":
    main()
