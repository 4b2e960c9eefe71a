"""Train one SAE per hook point of a model's constant file, evaluate it, and save it.

    python -m scripts.train_sae [model_constants_name]        # default: smollm2_135m_instruct
    torchrun --nproc-per-node 2 -m scripts.train_sae          # data-parallel (gloo on CPU)

Knobs live in the constant file (``sae_core/models/<name>.py``): ``HOOK_POINTS`` (one SAE each, all
from one forward pass), ``DATASET`` (the texts) and ``TRAINING`` (``sae_core.training.TrainingConfig``
fields). Output, per hook point: ``outputs/<model>/sae/<hook>/`` with ``cfg.json`` +
``sae_weights.safetensors`` (SAELens format: ``sae_lens.SAE.load_from_disk``), ``eval.json``,
``training_curve.json`` and ``training_config.json``. Checkpoints go to
``outputs/<model>/sae/checkpoints/``; running the same command again resumes an interrupted run.
Set ``SAE_CORE_OUTPUTS`` to write somewhere other than ``./outputs``.
"""

import logging
import sys

from sae_core import pipeline
from sae_core.model_loading import load_model
from sae_core.models import DEFAULT_MODEL, load_model_constants
from sae_core.training import init_distributed, train_from_model

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

name = sys.argv[1] if len(sys.argv) > 1 else DEFAULT_MODEL
constants = load_model_constants(name)
rank, world = init_distributed()

cfg = pipeline.training_config(constants)
model = load_model(constants)
texts = pipeline.load_texts_of(constants)
output_root = pipeline.output_dir(name) / "sae"
if rank == 0:
    print(f"training {cfg.architecture} SAEs on {', '.join(cfg.hook_points)} of {constants.MODEL_NAME} "
          f"({cfg.total_training_tokens:,} tokens, {world} process(es)); output in {output_root}")

run = train_from_model(model, texts, cfg, output_root)

if rank == 0:
    print(f"{run.tokens:,} tokens in {run.seconds:.0f} s ({run.tokens_per_second:,.0f} tokens/s)")
    for hook, trained in run.saes.items():
        result = trained.eval
        print(f"{hook}: explained variance {result.explained_variance:.3f}, L0 {result.l0:.1f}, "
              f"dead {result.dead_fraction:.3f}, CE recovered {result.ce_recovered:.3f} -> {trained.folder}")
