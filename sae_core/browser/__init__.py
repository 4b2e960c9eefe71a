"""The feature browser: a static site with a view of every latent, built from the stored latents alone.

* :mod:`.data` — every number of a latent's view from the CSR latent store, the decoder and the
  unembedding (statistics, histograms, top and quantile examples, logit lens, neighbours,
  co-occurrence), in memory bounded by one chunk of latents.
* :mod:`.relations` — the logit lens, decoder neighbours and co-occurring latents.
* :mod:`.export` — the same per-latent data in the JSON layout of SAEDashboard's Neuronpedia runner.
* :mod:`.site` — :func:`build_browser`: ``index.html`` + ``latent.html`` + chunked ``<script>`` data
  files that open from ``file://`` (no server).
"""

from sae_core.browser.data import BrowserConfig
from sae_core.browser.export import NeuronpediaWriter
from sae_core.browser.site import build_browser, chunk_file, read_data

__all__ = ["BrowserConfig", "NeuronpediaWriter", "build_browser", "chunk_file", "read_data"]
