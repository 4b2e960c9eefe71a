"""Analyse the trained SAEs of a model: CSR latents, density, top examples, decoder similarity,
co-occurrence and nearest neighbours (memmaps), and their figures.

    python -m scripts.analyse [model_constants_name] [section.key=value ...]

Needs the SAEs of ``python -m scripts.train_sae`` in ``outputs/<model>/sae/<hook>/``. Knobs:
``ANALYSIS`` of ``sae_core/models/<name>.py``. Output: ``outputs/<model>/analysis/<hook>/`` (CSR
latents, ``similarity_<metric>.npy``, ``cooccurrence_<metric>.npy``, neighbour arrays) and figures
linked from ``outputs/<model>/index.html``. Files already there are reused.
"""

import logging
import sys

from sae_core import pipeline
from sae_core.evaluation import read_curve, read_eval

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

run_config = pipeline.run_from_argv(sys.argv[1:])
out = pipeline.output_dir(run_config.name)
hooks = list(run_config.hook_points)
model = pipeline.load_model_of(run_config)
texts = pipeline.load_texts_of(run_config)
manager = pipeline.load_saes(model, run_config, out)

analyses = [pipeline.analyse(model, manager, texts, run_config, out, hook) for hook in hooks]
trained = [pipeline.SAEReport(hook, out / "sae" / hook, read_eval(out / "sae" / hook), read_curve(out / "sae" / hook))
           for hook in hooks]
index = pipeline.write_figures(out, f"sae_core: {run_config.model_name}", analyses=analyses,
                               tokenizer=model.tokenizer, trained=trained)

for analysis in analyses:
    alive = int((analysis.density > 0).sum())
    print(f"{analysis.hook}: {analysis.csr.n_rows:,} tokens, {alive:,} of {analysis.density.size:,} latents fire; "
          f"files in {analysis.folder}; feature browser {analysis.paths['browser']}")
    for latent, tokens in pipeline.top_tokens(analysis, model.tokenizer).items():
        print(f"  latent {latent:5d} (density {analysis.density[latent]:.4f}): top tokens {tokens}")
print(f"figures: {index.resolve()}")
