"""Welford whitening statistics of a model's hook points, from the stored activation run.

    python -m scripts.compute_whitening [model_constants_name]     # default: smollm2_135m_instruct

Knobs: ``WHITENING`` (``method`` zca/pca, ``eps``) of ``sae_core/models/<name>.py``; the activations
come from ``outputs/<model>/store/activations/main/`` (collected first when missing, as
``python -m scripts.extract_activations`` does). Output: ``outputs/<model>/whitening/<hook>/`` (a
``Whitener`` that ``TrainingConfig.whitening_path`` and ``SAEManager`` read) and the eigenvalue
spectrum figure. For whitened activation chunks in one go from text, see
``sae_core.whitening.ActivationExtractor`` (two passes over the model).
"""

import logging
import sys

from sae_core import pipeline
from sae_core.model_loading import load_model
from sae_core.models import DEFAULT_MODEL, load_model_constants

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

name = sys.argv[1] if len(sys.argv) > 1 else DEFAULT_MODEL
constants = load_model_constants(name)
out = pipeline.output_dir(name)
model = load_model(constants)

run = pipeline.collect_activations(model, constants, pipeline.load_texts_of(constants), out)
whiteners = pipeline.fit_whitening(run, constants, out)
index = pipeline.write_figures(out, f"sae_core: {constants.MODEL_NAME}", whiteners=whiteners)

for hook, whitener in whiteners.items():
    print(f"{hook}: {whitener}")
    print(f"  saved in {out / 'whitening' / hook}")
print(f"figures: {index.resolve()}")
