"""sae_core: sparse-autoencoder interpretability of language models on TransformerLens and SAELens.

The modules read like the pipeline, each importing only from earlier stages:
model_loading -> hooks -> data -> activations -> store -> whitening -> training / evaluation
-> saes -> latents / similarity -> steering -> plots -> pipeline.
Nothing heavy happens at import time: import the stage you need.
"""

import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
