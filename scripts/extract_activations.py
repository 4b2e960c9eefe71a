"""Collect activations at a model's hook points into the activation store.

    python -m scripts.extract_activations [model_constants_name] [section.key=value ...]
    torchrun --nproc-per-node 2 -m scripts.extract_activations     # data-parallel: rank-tagged shards

The model defaults to ``smollm2_135m_instruct``; overrides such as ``windows.max_text_length=64``
change one knob for this run. Knobs: ``HOOK_POINTS``, ``DATASET``, ``WINDOWS``, ``LOADER``,
``FORWARD`` and ``STORE`` of ``sae_core/models/<name>.py``. Output: ``outputs/<model>/store/activations/main/`` (shards +
``meta.json``); running it again resumes an interrupted run and reuses a finished one.
"""

import logging
import sys

from sae_core import pipeline
from sae_core.training import init_distributed

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

run_config = pipeline.run_from_argv(sys.argv[1:])
rank, world = init_distributed()
out = pipeline.output_dir(run_config.name)
model = pipeline.load_model_of(run_config)
texts = pipeline.load_texts_of(run_config)

run = pipeline.collect_activations(model, run_config, texts, out)

if rank == 0:
    meta = run.meta
    print(f"{len(run):,} activation rows of {run.hooks} from {meta.get('sample_count', 0):,} documents "
          f"in {len(run.shards)} shards ({world} process(es))")
    print(f"token policy: {meta.get('token_policy')}")
    print(f"run: {run.path}")
