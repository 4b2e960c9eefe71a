"""sae_core: sparse-autoencoder interpretability of language models on TransformerLens and SAELens.

The modules read like the pipeline, each importing only from earlier stages:
files -> checks -> precision -> config -> models -> default_model -> model_loading -> hooks -> corpora
-> texts -> data -> loader -> compile_passes -> activations -> store/ -> whitening/ -> sae_folders
-> evaluation -> training/ -> held_out -> saes -> latents -> similarity -> browser/ -> steering/
-> documents (the design documents' names) -> plots -> pages -> reuse -> pipeline (the stages as the
scripts run them);
``tests/test_layout.py`` keeps it so.
Nothing heavy happens at import time: import the stage you need.
"""

import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
