"""Steer generation with one SAE latent of a model's first hook point and compare before / after.

    python -m scripts.steer [model_constants_name]                 # default: smollm2_135m_instruct

Knobs: ``STEERING`` of ``sae_core/models/<name>.py`` (``prompt``, ``coefficient`` in units of the
mean activation norm at the hook, ``max_new_tokens``, ``feature``: a latent index, or None for the
most active latent that ``python -m scripts.analyse`` shows). Needs the SAE of
``python -m scripts.train_sae``. Output: the comparison figure, linked from
``outputs/<model>/index.html``, and ``outputs/<model>/steering.json``.
"""

import logging
import sys

from sae_core import pipeline
from sae_core._io import atomic_write_json
from sae_core.model_loading import load_model
from sae_core.models import DEFAULT_MODEL, load_model_constants

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

name = sys.argv[1] if len(sys.argv) > 1 else DEFAULT_MODEL
constants = load_model_constants(name)
out = pipeline.output_dir(name)
hook = constants.HOOK_POINTS[0]
model = load_model(constants)
texts = pipeline.load_texts_of(constants)
manager = pipeline.load_saes(model, out, [hook])
run = pipeline.collect_activations(model, constants, texts, out)

feature = constants.STEERING.get("feature")
if feature is None:
    shown = pipeline.analyse(model, manager, texts, constants, out, hook).shown
    feature = shown[0] if shown else 0
steer, comparison = pipeline.steering_example(model, manager, constants, hook, feature,
                                              scale=pipeline.mean_activation_norm(run, hook))
index = pipeline.write_figures(out, f"sae_core: {constants.MODEL_NAME}", steering=(steer, comparison))
atomic_write_json(out / "steering.json", {"hook": hook, "latent": feature, "coefficient": steer.coefficient,
                                          "prompt": comparison.prompts[0], "before": comparison.before.completions[0],
                                          "after": comparison.after.completions[0]})

print(f"{hook}, latent {feature}, coefficient {steer.coefficient:.1f}")
print(f"before: {comparison.before.completions[0]!r}")
print(f"after:  {comparison.after.completions[0]!r}")
print(f"figures: {index.resolve()}")
