"""Welford whitening statistics of a model's hook points, from the stored activation run.

    python -m scripts.compute_whitening [model_constants_name] [section.key=value ...]

Knobs: ``WHITENING`` (``method`` zca/pca, ``eps``, ``shrinkage``) of ``sae_core/models/<name>.py``; the activations
come from ``outputs/<model>/store/activations/main/`` (collected first when missing, as
``python -m scripts.extract_activations`` does). Output: ``outputs/<model>/whitening/<hook>/`` (a
``Whitener`` that ``TrainingConfig.whitening_path`` and ``SAEManager`` read) and the eigenvalue
spectrum figure. For whitened activation chunks in one go from text, see
``sae_core.whitening.ActivationExtractor`` (two passes over the model).
"""

import logging
import sys

from sae_core import pipeline

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

run_config = pipeline.run_from_argv(sys.argv[1:])
out = pipeline.output_dir(run_config.name)
model = pipeline.load_model_of(run_config)

run = pipeline.collect_activations(model, run_config, pipeline.load_texts_of(run_config), out)
whiteners = pipeline.fit_whitening(run, run_config, out)
index = pipeline.write_figures(out, f"sae_core: {run_config.model_name}", whiteners=whiteners)

for hook, whitener in whiteners.items():
    print(f"{hook}: {whitener}")
    print(f"  saved in {out / 'whitening' / hook}")
print(f"figures: {index.resolve()}")
