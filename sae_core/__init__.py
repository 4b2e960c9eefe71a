"""sae_core: sparse-autoencoder interpretability of language models on TransformerLens and SAELens.

The modules read like the pipeline, each importing only from earlier stages:
model_loading -> hooks -> data -> activations -> store (shards, runs) -> whitening
(whitened_extraction) -> evaluation -> training -> saes -> latents / similarity -> browser_data /
browser_export / browser (the static feature browser and its Neuronpedia export) -> steering -> plots
-> pipeline (the stages as the scripts run them); ``tests/test_layout.py`` keeps it so.
Nothing heavy happens at import time: import the stage you need.
"""

import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
