"""Learning-rate sweep that chose ``OptimizerConfig.lr``: the default model's SAE at the default budget.

    python -m bench.lr_sweep [--tokens 300000] [--lrs 5e-4,1e-3,2e-3,4e-3,8e-3]

The default run's training stream (``smollm2_135m_instruct``: the mixed corpus, blocks.10, bf16
forward, windows of 128 drawn in proportion to document length, BOS prepended and dropped) is run
through the model once, exactly as ``train_from_model`` draws it, and kept in memory, as are one
epoch of the run's held-out documents. Every learning rate then trains the default SAE (TopK k=32,
d_sae 4608, AuxK, mean decoder-bias start, the default schedule) on the same rows in the same order
(``train_from_activations``: the same shuffle, seed and budget, minus the forward), and is scored
on the held-out rows: explained variance (1 - FVU, against the mean), L0
and the dead fraction of the run. CE-loss recovered needs the model's forward and is left to the
demo, which runs the chosen rate end to end. Writes ``bench/results/lr_sweep.json``.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import torch

from bench.common import write_result

LRS = (5e-4, 1e-3, 2e-3, 4e-3, 8e-3)


def held_out_scores(sae, rows: torch.Tensor) -> dict[str, float]:
    """EV against the mean, L0 and latents that never fire, on held-out rows (float64 sums)."""
    from sae_core.sae_folders import reconstruct

    with torch.no_grad():
        latents, x_hat = reconstruct(sae, rows)
    x = rows.double()
    residual = ((x - x_hat.double()) ** 2).sum()
    total = ((x - x.mean(0)) ** 2).sum()
    fired = (latents > 0).any(0)
    return {"explained_variance": float(1 - residual / total), "l0": float((latents > 0).sum(-1).float().mean()),
            "never_fired_on_held_out": float(1 - fired.float().mean())}


def stream_rows(source, hook: str, budget: int | None) -> torch.Tensor:
    """Rows of ``source``'s stream: the first ``budget`` of them, or (None) one epoch's."""
    epoch_batches = len(source.sampler.batches(0))
    rows, total = [], 0
    for chunk, position in source.chunks(0):
        rows.append(chunk[hook].float())
        total += len(rows[-1])
        if (budget is not None and total >= budget) or (budget is None and position >= epoch_batches):
            break
    return torch.cat(rows)[:budget] if budget is not None else torch.cat(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=None, help="training budget (default: the run's)")
    parser.add_argument("--lrs", default=",".join(str(v) for v in LRS))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from sae_core import pipeline
    from sae_core.config import to_json
    from sae_core.data import windowed_dataset
    from sae_core.models import load_run_config
    from sae_core.texts import DocumentSplit
    from sae_core.training import model_source, train_from_activations

    run = load_run_config("smollm2_135m_instruct")
    cfg, hook = run.training, run.hook_points[0]
    budget = args.tokens or cfg.total_training_tokens
    model, texts = pipeline.load_model_of(run), pipeline.load_texts_of(run)
    split = DocumentSplit.of(texts, run.evaluation.held_out_documents, run.windows.seed)
    began = time.perf_counter()
    # the training stream exactly as train_from_model draws it (windows, order, token policy, dtype)
    stream = windowed_dataset(texts, model.tokenizer, cfg.windows, windows_per_document=cfg.windows_per_document)
    train = stream_rows(model_source(model, stream, cfg, split.train), hook, budget)
    held_out = stream_rows(model_source(model, windowed_dataset(texts, model.tokenizer, cfg.windows), cfg, split.held_out),
                     hook, None)
    extraction_seconds = time.perf_counter() - began
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for lr in (float(v) for v in args.lrs.split(",")):
            lr_cfg = load_run_config("smollm2_135m_instruct", [f"optimizer.lr={lr}", f"training.total_training_tokens={budget}",
                                                               "training.checkpoint_every_tokens=None"]).training
            started = time.perf_counter()
            trained = train_from_activations(lambda: torch.split(train, cfg.loader.training_batch_tokens), lr_cfg,
                                             Path(tmp) / f"lr{lr}", resume=False)
            record = {"lr": lr, "seconds": round(time.perf_counter() - started, 1),
                      "train_dead_fraction": trained.saes[hook].curve[-1]["dead_fraction"],
                      **held_out_scores(trained.saes[hook].sae, held_out)}
            results.append(record)
            print(record, flush=True)
    best = max(results, key=lambda r: r["explained_variance"])
    write_result("lr_sweep", {
        "model": run.model_name, "hook": hook, "corpus": run.dataset.source, "tokens": budget,
        "train_rows": int(train.shape[0]), "held_out_rows": int(held_out.shape[0]),
        "held_out_documents": len(split.held_out), "extraction_seconds": round(extraction_seconds, 1),
        "sae": to_json(run.sae), "optimizer_other_than_lr": to_json(run.optimizer), "results": results,
        "best_lr": best["lr"], "chosen_default_lr": run.optimizer.lr})
    print(f"best lr {best['lr']} (explained variance {best['explained_variance']:.3f})")


if __name__ == "__main__":
    main()
