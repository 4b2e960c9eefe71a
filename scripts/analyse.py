"""Analyse the trained SAEs of a model: CSR latents, density, top examples, decoder similarity,
co-occurrence and nearest neighbours (memmaps), and their figures.

    python -m scripts.analyse [model_constants_name]               # default: smollm2_135m_instruct

Needs the SAEs of ``python -m scripts.train_sae`` in ``outputs/<model>/sae/<hook>/``. Knobs:
``ANALYSIS`` of ``sae_core/models/<name>.py``. Output: ``outputs/<model>/analysis/<hook>/`` (CSR
latents, ``similarity_<metric>.npy``, ``cooccurrence_<metric>.npy``, neighbour arrays) and figures
linked from ``outputs/<model>/index.html``. Files already there are reused.
"""

import logging
import sys

from sae_core import pipeline
from sae_core.evaluation import read_curve, read_eval
from sae_core.model_loading import load_model
from sae_core.models import DEFAULT_MODEL, load_model_constants

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

name = sys.argv[1] if len(sys.argv) > 1 else DEFAULT_MODEL
constants = load_model_constants(name)
out = pipeline.output_dir(name)
hooks = list(constants.HOOK_POINTS)
model = load_model(constants)
texts = pipeline.load_texts_of(constants)
manager = pipeline.load_saes(model, out, hooks)

analyses = [pipeline.analyse(model, manager, texts, constants, out, hook) for hook in hooks]
trained = [pipeline.SAEReport(hook, out / "sae" / hook, read_eval(out / "sae" / hook), read_curve(out / "sae" / hook))
           for hook in hooks]
index = pipeline.write_figures(out, f"sae_core: {constants.MODEL_NAME}", analyses=analyses,
                               tokenizer=model.tokenizer, trained=trained)

for analysis in analyses:
    alive = int((analysis.density > 0).sum())
    print(f"{analysis.hook}: {analysis.csr.n_rows:,} tokens, {alive:,} of {analysis.density.size:,} latents fire; "
          f"files in {analysis.folder}")
    for latent, tokens in pipeline.top_tokens(analysis, model.tokenizer).items():
        print(f"  latent {latent:5d} (density {analysis.density[latent]:.4f}): top tokens {tokens}")
print(f"figures: {index.resolve()}")
