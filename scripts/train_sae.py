"""Train one SAE per hook point of a model's constant file, evaluate it, and save it.

    python -m scripts.train_sae [model_constants_name] [section.key=value ...]
    python -m scripts.train_sae smollm2_135m_instruct training.lr=4e-3 training.k=64
    torchrun --nproc-per-node 2 -m scripts.train_sae          # data-parallel (gloo on CPU)

Knobs live in the constant file (``sae_core/models/<name>.py``): ``HOOK_POINTS`` (one SAE each, all
from one forward pass), ``DATASET`` (the texts), ``WINDOWS`` / ``LOADER`` / ``FORWARD``, ``SAE``,
``OPTIMIZER``, ``TRAINING`` and ``EVALUATION`` (``sae_core.config``); ``section.key=value`` overrides
one of them for this run (``training.lr`` reaches the optimiser section). Output, per hook point: ``outputs/<model>/sae/<hook>/`` with ``cfg.json`` +
``sae_weights.safetensors`` (SAELens format: ``sae_lens.SAE.load_from_disk``), ``eval.json``,
``training_curve.json``, ``training_config.json`` and ``run_config.json``. Checkpoints go to
``outputs/<model>/sae/checkpoints/``; running the same command again resumes an interrupted run.
Set ``SAE_CORE_OUTPUTS`` to write somewhere other than ``./outputs``. ``TRAINING['sweep']`` (a list of
SAE / OPTIMIZER overrides) trains several SAEs per hook from the same forward pass, each written to
``outputs/<model>/sae/<hook>/<sweep name>/``.
"""

import logging
import sys

from sae_core import pipeline
from sae_core.training import init_distributed, train_from_model

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

run_config = pipeline.run_from_argv(sys.argv[1:])
rank, world = init_distributed()

cfg = run_config.training
model = pipeline.load_model_of(run_config)
texts = pipeline.load_texts_of(run_config)
output_root = pipeline.output_dir(run_config.name) / "sae"
if rank == 0:
    print(f"training {cfg.sae.architecture} SAEs on {', '.join(cfg.hook_points)} of {run_config.model_name} "
          f"({cfg.total_training_tokens:,} tokens, {world} process(es)); output in {output_root}")

run = train_from_model(model, texts, cfg, output_root)
if rank == 0:
    for hook in run.saes:
        pipeline.write_run_config(run_config, output_root / hook)

if rank == 0:
    print(f"{run.tokens:,} tokens in {run.seconds:.0f} s ({run.tokens_per_second:,.0f} tokens/s)")
    for hook, trained in run.saes.items():
        result = trained.eval
        print(f"{hook}: explained variance {result.explained_variance:.3f}, L0 {result.l0:.1f}, "
              f"dead {result.dead_fraction:.3f}, CE recovered {result.ce_recovered:.3f} -> {trained.folder}")
