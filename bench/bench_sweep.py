"""A sweep of four SAEs on one hook from one forward pass versus four separate runs, and versus SAELens.

    python -m bench.bench_sweep --quick              # 8,192 tokens per run, 1 repeat (~9 min on the loaded machine)
    python -m bench.bench_sweep --tokens 8192        # 3 interleaved repeats: 28 min at load ~12 on 2 cores
    python -m bench.bench_sweep                      # 49,152 tokens per run, 3 repeats (an idle machine)

Work: SmolLM2-135M-Instruct (float32 weights), ``blocks.10.hook_resid_post``, bfloat16 forward and
SAE step (SAELens ``autocast_lm=True, autocast=True``), the settings of ``bench.bench_training``
(lr 4e-4, batch 4096, context 128 with BOS, special tokens excluded, the training documents of the
default corpus). The four SAEs (``SWEEP``): TopK k=16, 32, 64 at d_sae 4608, and k=32 at d_sae 9216.

Each repeat runs, interleaved so the machine's drift hits every side alike:
1. ours, the sweep: one ``train_saes`` call with ``TRAINING['sweep']`` (one forward pass per batch,
   four SAE steps);
2. ours, four separate ``train_saes`` calls, one per unit (``unit.config``: what the sweep would
   train alone), their times summed;
3. SAELens's ``MultiSAETrainingRunner`` with the four SAEs on the one hook (it accepts several SAEs
   per hook: ``hook_names`` as one string shares the hook), one forward per batch as well.
Times are wall clock of the whole call (set-up, training, writing the SAEs; no evaluation), so the
separate runs pay their set-up four times, as they would. The loop-only time (``run.seconds``) is
reported too. Ratios are per repeat; the result gives the median and min-max over repeats.
Check: every sweep unit ends with the same weights as its separate run (same seed, same rows).
Target: sweep >= 2.5x the four separate runs. Results: ``bench/results/sweep.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.bench_training import HOOK, base_config, model_source
from bench.common import load_smollm2, spread, write_result
from sae_core.config import to_json, with_overrides

SWEEP = ({"k": 16}, {"k": 32}, {"k": 64}, {"d_sae": 9216, "k": 32})
QUICK_TOKENS = 8192
TOKENS = 49_152


def run_ours(model: Any, texts: list[str], documents: list[int], cfg: Any, out: Path) -> tuple[Any, float]:
    """One ``train_saes`` call: (run, wall seconds of the call, source set-up included)."""
    from sae_core.training import hook_widths, train_saes

    start = time.perf_counter()
    run = train_saes(cfg, model_source(model, texts, documents, cfg), hook_widths(model, cfg.hook_points), out,
                     resume=False)
    return run, time.perf_counter() - start


def run_saelens_multi(model: Any, texts: list[str], cfg: Any) -> float:
    """``MultiSAETrainingRunner`` with the sweep's SAEs on ``HOOK``: wall seconds of ``run()`` and set-up."""
    import datasets
    from sae_lens.multi_sae_training_runner import (
        MultiSAETrainingRunner,
        MultiSAETrainingRunnerConfig,
    )

    from bench.common import saelens_training_kwargs, topk_training_config

    saes = {unit.name.rsplit("/", 1)[-1]: topk_training_config(unit.config.sae, model.cfg.d_model)
            for unit in cfg.units()}
    runner_cfg = MultiSAETrainingRunnerConfig(saes=saes, hook_names=HOOK, **{
        **saelens_training_kwargs(cfg), "model_name": model.cfg.model_name, "autocast": True, "autocast_lm": True})
    start = time.perf_counter()
    runner = MultiSAETrainingRunner(runner_cfg, override_model=model,
                                    override_dataset=datasets.Dataset.from_dict({"text": texts}))
    runner.run()
    return time.perf_counter() - start


def same_weights(sweep_folder: Path, alone_folder: Path) -> bool:
    from sae_lens import SAE

    a, b = SAE.load_from_disk(str(sweep_folder)).state_dict(), SAE.load_from_disk(str(alone_folder)).state_dict()
    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def one_repeat(model: Any, texts: list[str], train_docs: list[int], train_texts: list[str], cfg: Any,
               tmp: Path, with_saelens: bool) -> dict[str, Any]:
    sweep_run, sweep_wall = run_ours(model, texts, train_docs, cfg, tmp / "sweep")
    separate_wall, separate_loop, equal = 0.0, 0.0, True
    for index, unit in enumerate(cfg.units()):
        run, wall = run_ours(model, texts, train_docs, unit.config, tmp / f"alone{index}")
        separate_wall, separate_loop = separate_wall + wall, separate_loop + run.seconds
        equal = equal and same_weights(tmp / "sweep" / unit.name, tmp / f"alone{index}" / HOOK)
    entry = {"sweep_wall_s": sweep_wall, "sweep_loop_s": sweep_run.seconds, "separate_wall_s": separate_wall,
             "separate_loop_s": separate_loop, "speedup_vs_separate": separate_wall / sweep_wall,
             "speedup_vs_separate_loop_only": separate_loop / sweep_run.seconds, "units_equal_separate_runs": equal,
             "final_train_explained_variance": {name: trained.curve[-1]["explained_variance"]
                                                for name, trained in sweep_run.saes.items()}}
    if with_saelens:
        entry["saelens_multi_wall_s"] = run_saelens_multi(model, train_texts, cfg)
        entry["speedup_vs_saelens_multi"] = entry["saelens_multi_wall_s"] / sweep_wall
    return entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_TOKENS:,} tokens per run, one repeat")
    parser.add_argument("--tokens", type=int, default=None, help=f"tokens per run (default {TOKENS:,})")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 3; --quick: 1)")
    parser.add_argument("--skip-saelens", action="store_true", help="skip the MultiSAETrainingRunner side")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from sae_core.corpora import fortunes_corpus
    from sae_core.training import split_documents

    tokens = args.tokens or (QUICK_TOKENS if args.quick else TOKENS)
    repeats = args.repeats or (1 if args.quick else 3)
    model = load_smollm2("float32")
    texts = fortunes_corpus()
    base = with_overrides(base_config(tokens), "bench", dtype="bfloat16", sae_dtype="bfloat16")
    cfg = dataclasses.replace(base, sweep=SWEEP)
    train_docs, _ = split_documents(len(texts), cfg.evaluation.held_out_documents, cfg.seed)
    train_texts = [texts[i] for i in train_docs]
    began, entries = time.perf_counter(), []
    for repeat in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            entries.append(one_repeat(model, texts, train_docs, train_texts, cfg, Path(tmp), not args.skip_saelens))
        print(f"repeat {repeat + 1}/{repeats}: {entries[-1]}", flush=True)
    record: dict[str, Any] = {
        "tokens_per_run": cfg.total_steps * cfg.train_batch_size_tokens, "repeats": repeats, "quick": args.quick,
        "hook": HOOK, "sweep": [dict(e) for e in SWEEP], "units": [u.name for u in cfg.units()],
        "precision": "bfloat16", "config": to_json(base),
        "repeat_results": entries, "wall_seconds_total": time.perf_counter() - began}
    for key in ("speedup_vs_separate", "speedup_vs_separate_loop_only", "speedup_vs_saelens_multi"):
        if key in entries[0]:
            record[key] = spread([e[key] for e in entries])
    record["targets"] = {"sweep_ge_2.5x_separate": record["speedup_vs_separate"]["median"] >= 2.5,
                         "units_equal_separate_runs": all(e["units_equal_separate_runs"] for e in entries)}
    path = write_result("sweep_quick" if args.quick else "sweep", record)
    print(f"speedups: { {k: record[k]['median'] for k in record if k.startswith('speedup')} }\n"
          f"targets: {record['targets']}\nwrote {path}")


if __name__ == "__main__":
    main()
