"""Collect activations at a model's hook points into the activation store.

    python -m scripts.extract_activations [model_constants_name]   # default: smollm2_135m_instruct
    torchrun --nproc-per-node 2 -m scripts.extract_activations     # data-parallel: rank-tagged shards

Knobs: ``HOOK_POINTS``, ``DATASET`` and ``EXTRACTION`` (``sae_core.store.StoreConfig`` fields) of
``sae_core/models/<name>.py``. Output: ``outputs/<model>/store/activations/main/`` (shards +
``meta.json``); running it again resumes an interrupted run and reuses a finished one.
"""

import logging
import sys

from sae_core import pipeline
from sae_core.model_loading import load_model
from sae_core.models import DEFAULT_MODEL, load_model_constants
from sae_core.training import init_distributed

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

name = sys.argv[1] if len(sys.argv) > 1 else DEFAULT_MODEL
constants = load_model_constants(name)
rank, world = init_distributed()
out = pipeline.output_dir(name)
model = load_model(constants)
texts = pipeline.load_texts_of(constants)

run = pipeline.collect_activations(model, constants, texts, out)

if rank == 0:
    meta = run.meta
    print(f"{len(run):,} activation rows of {run.hooks} from {meta.get('sample_count', 0):,} documents "
          f"in {len(run.shards)} shards ({world} process(es))")
    print(f"token policy: {meta.get('token_policy')}")
    print(f"run: {run.path}")
