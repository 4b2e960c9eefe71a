"""What moves the default SAE's quality: training variants on the default run's stream, one forward.

    python -m bench.quality_sweep [--tokens 300000] [--variant NAME=section.key=value,section.key=value ...]

The default run's training stream is drawn once exactly as ``train_from_model`` draws it (see
``bench.lr_sweep``, whose row drawing and held-out scoring this reuses), cached under
``--cache`` so later invocations skip the forward, then every variant (overrides of the default
run's config) trains on the same rows in the same order and is scored on the same held-out rows:
explained variance (1 - FVU), L0, latents never firing on held-out rows, the run's dead fraction.
With ``training.buffer_passes`` a variant trains on ``tokens`` rows from ``tokens / passes`` of the stream.
``FROM_SHIPPED`` variants override the constant file as it ships (with a 64k-row buffer, the
default they were measured at) instead of the previous default.
A variant's budget may exceed the stream (``training.total_training_tokens``): the stream is drawn
for the largest budget asked. Writes ``bench/results/quality_sweep.json`` (merged by name).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import torch

from bench.common import RESULTS_DIR, write_result
from bench.lr_sweep import held_out_scores, stream_rows

PREVIOUS_DEFAULT = ["training.total_training_tokens=300000", "training.buffer_passes=1",
                    "training.train_batch_size_tokens=4096", "optimizer.lr_scheduler=constant"]
"""The default run before this sweep (batch 4096, lr 4e-3, constant then a 20% linear decay, 300k
tokens, one pass): every variant below overrides it; ``default`` is the constant file as it is now."""

B1024_COS = ["training.train_batch_size_tokens=1024", "optimizer.lr_scheduler=cosineannealing"]
VARIANTS = {
    "previous_default": [],
    "batch_2048": ["training.train_batch_size_tokens=2048"],
    "batch_1024": ["training.train_batch_size_tokens=1024"],
    "batch_1024_lr_2e-3": ["training.train_batch_size_tokens=1024", "optimizer.lr=2e-3"],
    "aux_4": ["sae.aux_loss_coefficient=4.0"],
    "dead_window_25k": ["training.dead_window_tokens=25000"],
    "cosine": ["optimizer.lr_scheduler=cosineannealing"],
    "tokens_600k": ["training.total_training_tokens=600000"],
    "b1024_600k": ["training.train_batch_size_tokens=1024", "training.total_training_tokens=600000"],
    "b1024_aux4": ["training.train_batch_size_tokens=1024", "sae.aux_loss_coefficient=4.0"],
    "b1024_cosine": B1024_COS,
    "b1024_lr2e-3_cos": [*B1024_COS, "optimizer.lr=2e-3"],
    "b1024_lr3e-3_cos": [*B1024_COS, "optimizer.lr=3e-3"],
    "b1024_lr2e-3_cos_dw25k": [*B1024_COS, "optimizer.lr=2e-3", "training.dead_window_tokens=25000"],
    "b1024_lr2e-3_cos_warm": [*B1024_COS, "optimizer.lr=2e-3", "optimizer.lr_warm_up_fraction=0.05"],
    "b512_lr1e-3_cos": ["training.train_batch_size_tokens=512", "optimizer.lr_scheduler=cosineannealing",
                        "optimizer.lr=1e-3"],
    "b1024_lr2e-3_cos_600k": [*B1024_COS, "optimizer.lr=2e-3", "training.total_training_tokens=600000"],
    # each shuffle buffer served 3-4 times: more SAE rows from the same 300k forwarded tokens (2 times: default)
    "b1024_cos_900k_passes3": [*B1024_COS, "training.total_training_tokens=900000", "training.buffer_passes=3"],
    "b1024_lr2e-3_cos_1.2M_passes4": [*B1024_COS, "optimizer.lr=2e-3", "training.total_training_tokens=1200000",
                                      "training.buffer_passes=4"],
    "default": None,  # the constant file as shipped: b1024, cosine, 600k SAE rows, buffer_passes 2, 262k buffer
}
BUFFER_64K = ["training.shuffle_buffer_tokens=65536"]
"""The shipped default before its buffer grew to 262k rows: the base of ``FROM_SHIPPED`` (default_buffer_* vary it)."""
FROM_SHIPPED = {
    # overrides of the constant file as shipped with a 64k-row buffer (BUFFER_64K), not of PREVIOUS_DEFAULT
    "default_64k_buffer": [],  # the default as it shipped before the 262k buffer
    "default_dec_init_1": ["sae.decoder_init_norm=1.0"],
    "default_betas_0.9_0.99": ["optimizer.adam_betas=(0.9, 0.99)"],
    "default_lr_6e-3": ["optimizer.lr=6e-3"],
    "default_rescale_by_dec_norm": ["sae.rescale_acts_by_decoder_norm=True"],
    "default_betas_0.8_0.99_lr6e-3": ["optimizer.adam_betas=(0.8, 0.99)", "optimizer.lr=6e-3"],
    "default_buffer_131k": ["training.shuffle_buffer_tokens=131072"],
    "default_buffer_262k": ["training.shuffle_buffer_tokens=262144"],
    "default_buffer_299k": ["training.shuffle_buffer_tokens=299008"],
    # the seed of the SAE's init and of the shuffling (the stream is the cached one): run-to-run noise
    "default_seed_1": ["windows.seed=1"],
    "default_seed_2": ["windows.seed=2"],
}
"""Each ``FROM_SHIPPED`` variant is the shipped constant file with a 64k-row buffer plus its overrides (its
result says ``base``); ``default`` is the constant file as it ships (262k-row buffer)."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=300_000, help="budget of the variants that do not set one")
    parser.add_argument("--variant", action="append", default=None, help="NAME=override,override (repeatable)")
    parser.add_argument("--only", nargs="*", help="run only these of the built-in variants")
    parser.add_argument("--quick", action="store_true", help="smoke size: one variant on 16k tokens (own result file)")
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "sae_core_quality_stream.pt"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from sae_core import pipeline
    from sae_core.data import windowed_dataset
    from sae_core.models import load_run_config
    from sae_core.texts import DocumentSplit
    from sae_core.training import model_source, train_from_activations

    variants = {k: v for k, v in {**VARIANTS, **FROM_SHIPPED}.items() if not args.only or k in args.only}
    for text in args.variant or []:
        name, _, overrides = text.partition("=")
        variants[name] = [o for o in overrides.split(",") if o]
    if args.quick:
        variants, args.tokens = {"previous_default": []}, 16_384
    base = [*PREVIOUS_DEFAULT, f"training.total_training_tokens={args.tokens}"]
    configs = {name: load_run_config("smollm2_135m_instruct", ["training.checkpoint_every_tokens=None",
                                                               *([] if overrides is None else
                                                                 [*BUFFER_64K, *overrides] if name in FROM_SHIPPED
                                                                 else [*base, *overrides])])
               for name, overrides in variants.items()}
    run = load_run_config("smollm2_135m_instruct")
    hook = run.hook_points[0]
    budget = max(-(-c.training.total_training_tokens // c.training.buffer_passes) for c in configs.values())
    cache = Path(args.cache)
    stream = torch.load(cache) if cache.exists() else None
    if stream is None or stream["train"].shape[0] < budget:
        model, texts = pipeline.load_model_of(run), pipeline.load_texts_of(run)
        cfg = run.training
        split = DocumentSplit.of(texts, run.evaluation.held_out_documents, run.windows.seed)
        began = time.perf_counter()
        windows = windowed_dataset(texts, model.tokenizer, cfg.windows, windows_per_document=cfg.windows_per_document)
        train = stream_rows(model_source(model, windows, cfg, split.train), hook, budget)
        held_out = stream_rows(model_source(model, windowed_dataset(texts, model.tokenizer, cfg.windows), cfg,
                                            split.held_out), hook, None)
        stream = {"train": train, "held_out": held_out, "seconds": time.perf_counter() - began}
        torch.save(stream, cache)
    train, held_out = stream["train"], stream["held_out"]
    result_name = "quality_sweep_quick" if args.quick else "quality_sweep"
    path = RESULTS_DIR / f"{result_name}.json"
    results = {}
    if path.exists():
        import json

        results = json.loads(path.read_text()).get("results", {})
    with tempfile.TemporaryDirectory() as tmp:
        for name, run_cfg in configs.items():
            cfg = run_cfg.training
            started = time.perf_counter()
            trained = train_from_activations(lambda cfg=cfg: torch.split(train[:cfg.total_training_tokens],
                                                                         cfg.loader.training_batch_tokens),
                                             cfg, Path(tmp) / name, resume=False)
            results[name] = {"overrides": variants[name] if variants[name] is not None else ["(the constant file as shipped)"],
                             "base": ("shipped_64k_buffer" if name in FROM_SHIPPED else
                                      "shipped" if variants[name] is None else "previous_default"),
                             "tokens": cfg.total_training_tokens,
                             "forwarded_tokens": -(-cfg.total_training_tokens // cfg.buffer_passes),
                             "steps": cfg.total_steps, "seconds": round(time.perf_counter() - started, 1),
                             "train_dead_fraction": trained.saes[hook].curve[-1]["dead_fraction"],
                             **held_out_scores(trained.saes[hook].sae, held_out)}
            print(name, results[name], flush=True)
    write_result(result_name, {"model": run.model_name, "hook": hook, "corpus": run.dataset.source,
                                   "train_rows": int(train.shape[0]), "held_out_rows": int(held_out.shape[0]),
                                   "results": results})


if __name__ == "__main__":
    main()
