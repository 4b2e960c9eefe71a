"""Steer generation with one SAE latent of a model's first hook point and compare before / after.

    python -m scripts.steer [model_constants_name] [section.key=value ...]

Knobs: ``STEERING`` of ``sae_core/models/<name>.py`` (``prompt``, ``coefficient`` in units of the
mean activation norm at the hook, ``max_new_tokens``, ``feature``: a latent index, or None for the
interpretable latent whose decoder direction raises its own top tokens most, ``STEERING['screen']``). Needs the SAE of
``python -m scripts.train_sae``. Output: the comparison figure, linked from
``outputs/<model>/index.html``, and ``outputs/<model>/steering.json``.
"""

import logging
import sys

from sae_core import pipeline
from sae_core.files import atomic_write_json
from sae_core.steering import ModelSteering

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

run_config = pipeline.run_from_argv(sys.argv[1:])
out = pipeline.output_dir(run_config.name)
hook = run_config.hook_points[0]
model = pipeline.load_model_of(run_config)
texts = pipeline.load_texts_of(run_config)
manager = pipeline.load_saes(model, run_config, out, [hook])
run = pipeline.collect_activations(model, run_config, texts, out)

feature = run_config.steering.feature
if feature is None:
    analysis = pipeline.analyse(model, manager, texts, run_config, out, hook)
    feature = pipeline.steering_latent(run_config, analysis, model.tokenizer, ModelSteering(model, manager)).feature
steer, comparison = pipeline.steering_example(model, manager, run_config, hook, feature,
                                              scale=pipeline.mean_activation_norm(run, hook))
index = pipeline.write_figures(out, f"sae_core: {run_config.model_name}", steering=(steer, comparison))
atomic_write_json(out / "steering.json", {"hook": hook, "latent": feature, "coefficient": steer.coefficient,
                                          "prompt": comparison.prompts[0], "before": comparison.before.completions[0],
                                          "after": comparison.after.completions[0]})

print(f"{hook}, latent {feature}, coefficient {steer.coefficient:.1f}")
print(f"before: {comparison.before.completions[0]!r}")
print(f"after:  {comparison.after.completions[0]!r}")
print(f"figures: {index.resolve()}")
