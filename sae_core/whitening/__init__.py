"""Whitening: streaming float64 Welford statistics, ZCA / PCA transforms, and the two-pass extraction.

* :mod:`.statistics` — :class:`IncrementalWhitener` (Welford mean / covariance) and :class:`Whitener`
  (forward and inverse transforms, saved as safetensors), :func:`statistics_from_run`.
* :mod:`.extraction` — :class:`ActivationExtractor`: statistics from text (pass one), then whitened
  chunks in the store's format (pass two).
"""

from sae_core.whitening.extraction import (
    ActivationExtractor,
    ExtractionConfig,
    PassOneResult,
    PassTwoResult,
)
from sae_core.whitening.statistics import (
    STATS_JSON,
    WHITENED_RUN,
    WHITENING_FILENAME,
    IncrementalWhitener,
    Whitener,
    spectrum_summary,
    statistics_from_run,
)

__all__ = ["STATS_JSON", "WHITENED_RUN", "WHITENING_FILENAME", "ActivationExtractor", "ExtractionConfig",
           "IncrementalWhitener", "PassOneResult", "PassTwoResult", "Whitener", "spectrum_summary",
           "statistics_from_run"]
