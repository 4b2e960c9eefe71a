"""Export of the browser's per-latent data in the JSON layout of SAEDashboard's Neuronpedia runner.

``sae_dashboard.neuronpedia.neuronpedia_runner`` writes, per batch of features, ``batch-<i>.json``
holding ``NeuronpediaDashboardBatch.to_dict()`` (``model_id``, ``layer``, ``sae_set``,
``sae_id_suffix``, ``features``), each feature being ``NeuronpediaDashboardFeature.to_dict()``,
plus ``skipped_indexes.json``; Neuronpedia's upload reads that folder. :class:`NeuronpediaWriter`
writes the same files, one batch per browser chunk, from the records :mod:`sae_core.browser`
builds, so the export costs no extra pass.

What is filled from our data, and how:
- ``activations``: the top examples (``bin_min = -1``, ``bin_max`` = the largest value,
  ``bin_contains = -1``, as the runner's "TOP ACTIVATIONS" group) and the quantile examples
  (``bin_min`` / ``bin_max`` = the group's value range, ``bin_contains`` = its share of the
  firings). ``tokens`` are decoded strings, ``values`` the latent's activation on every token,
  ``qualifying_token_index`` the example's token (our contexts have no BOS to skip).
- ``pos_str`` / ``pos_values`` / ``neg_str`` / ``neg_values``: the logit lens;
  ``logits_hist_data_*``: the histogram of the latent's logit-lens row; ``freq_hist_data_*``: the
  activation histogram (bin centres and counts); ``frac_nonzero``: the density.
- ``neuron_alignment_*``: the 3 residual dimensions with the largest ``|W_dec|`` entries (value and
  share of the row's L1), from the decoder since the encoder is not an input here.
- ``correlated_features_*``: the decoder-cosine neighbours in ``_l1`` (SAEDashboard puts a cosine
  there) and the co-occurrence Jaccard in ``_pearson``. Activation Pearson correlations of
  features and neurons need the activations themselves, which the browser does not read: the
  neuron tables stay empty, as do ``decoder_weights_dist`` (attention heads) and ``vector``.
- ``skipped_indexes.json`` lists the latents that never fire (written as dead, like the runner's
  sparsity-threshold skips); their features are still exported unless ``skip_dead``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from sae_core.files import atomic_write_text
from sae_core.hooks import hook_layer


def _activation(example: dict[str, Any], vocab: list[str], bin_min: float, bin_max: float,
                bin_contains: float) -> dict[str, Any]:
    return {"bin_min": bin_min, "bin_max": bin_max, "bin_contains": bin_contains,
            "tokens": [vocab[t] for t in example["tokens"]], "values": example["acts"],
            "qualifying_token_index": example["focus"]}


def neuronpedia_feature(record: dict[str, Any], vocab: list[str], decoder_row: np.ndarray,
                        meta: dict[str, Any]) -> dict[str, Any]:
    """One ``NeuronpediaDashboardFeature.to_dict()`` from a browser latent record."""
    activations = [_activation(ex, vocab, -1, record["max"], -1) for ex in record["top"]]
    for group in record["quantiles"]:
        activations += [_activation(ex, vocab, group["lo"], group["hi"], group["share"])
                        for ex in group["examples"]]
    hist, logit_hist = record["hist"], record["logit_hist"]

    def centres(h: dict[str, Any]) -> list[float]:
        width = (h["hi"] - h["lo"]) / len(h["counts"])
        return [round(h["lo"] + (i + 0.5) * width, 5) for i in range(len(h["counts"]))]

    row = np.asarray(decoder_row, np.float64)
    strongest = np.argsort(-np.abs(row), kind="stable")[:3]
    l1 = float(np.abs(row).sum()) or 1.0
    return {
        "feature_index": record["id"],
        "neuron_alignment_indices": strongest.tolist(),
        "neuron_alignment_values": np.round(row[strongest], 5).tolist(),
        "neuron_alignment_l1": np.round(np.abs(row[strongest]) / l1, 5).tolist(),
        "correlated_neurons_indices": [], "correlated_neurons_l1": [], "correlated_neurons_pearson": [],
        "correlated_features_indices": [latent for latent, _ in record["neighbours"]],
        "correlated_features_l1": [value for _, value in record["neighbours"]],
        "correlated_features_pearson": [dict(record["jaccard"]).get(latent, 0.0) for latent, _ in record["neighbours"]],
        "neg_str": [vocab[t] for t, _ in record["logits"]["neg"]],
        "neg_values": [v for _, v in record["logits"]["neg"]],
        "pos_str": [vocab[t] for t, _ in record["logits"]["pos"]],
        "pos_values": [v for _, v in record["logits"]["pos"]],
        "frac_nonzero": record["density"],
        "freq_hist_data_bar_values": centres(hist) if record["count"] else [],
        "freq_hist_data_bar_heights": hist["counts"] if record["count"] else [],
        "logits_hist_data_bar_heights": logit_hist["counts"],
        "logits_hist_data_bar_values": centres(logit_hist),
        "n_prompts_total": meta["n_prompts_total"],
        "n_tokens_in_prompt": meta["n_tokens_in_prompt"],
        "dataset": meta["dataset"],
        "decoder_weights_dist": [],
        "activations": activations,
        "vector": [],
    }


class NeuronpediaWriter:
    """Writes ``batch-<i>.json`` per chunk of records and ``skipped_indexes.json`` at :meth:`close`."""

    def __init__(self, folder: str | Path, *, model_id: str, layer: int, sae_set: str,
                 sae_id_suffix: str | None = None, dataset: str = "", n_prompts_total: int = 0,
                 n_tokens_in_prompt: int = 0, sparsity_threshold: int = -6, skip_dead: bool = False) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.header = {"model_id": model_id, "layer": layer, "sae_set": sae_set, "sae_id_suffix": sae_id_suffix}
        self.meta = {"dataset": dataset, "n_prompts_total": n_prompts_total, "n_tokens_in_prompt": n_tokens_in_prompt}
        self.sparsity_threshold, self.skip_dead = sparsity_threshold, skip_dead
        self.dead: list[int] = []
        self.batches = 0

    def write_batch(self, records: list[dict[str, Any]], vocab: list[str], W_dec: np.ndarray) -> Path:
        """One ``batch-<i>.json`` from browser records (``W_dec`` rows are the decoder directions)."""
        self.dead += [r["id"] for r in records if r["count"] == 0]
        features = [neuronpedia_feature(r, vocab, W_dec[r["id"]], self.meta) for r in records
                    if r["count"] or not self.skip_dead]
        path = self.folder / f"batch-{self.batches}.json"
        atomic_write_text(path, json.dumps({**self.header, "features": features}, allow_nan=False))
        self.batches += 1
        return path

    def close(self) -> Path:
        """Write ``skipped_indexes.json`` (the dead latents) and return the folder."""
        atomic_write_text(self.folder / "skipped_indexes.json", json.dumps({
            "model_id": self.header["model_id"], "layer": str(self.header["layer"]),
            "sae_set": self.header["sae_set"], "log_sparsity": self.sparsity_threshold,
            "skipped_indexes": self.dead}))
        return self.folder


def neuronpedia_header(run: Any, hook: str, csr: Any) -> dict[str, Any] | None:
    """What the Neuronpedia export names (model, layer, SAE set, dataset), or None when it is off."""
    if not run.analysis.neuronpedia_export:
        return None
    return {"model_id": run.model_name, "layer": hook_layer(hook) or 0, "sae_set": f"sae_core-{run.name}",
            "sae_id_suffix": hook, "dataset": run.dataset.source,
            "n_prompts_total": int(np.unique(np.asarray(csr.doc_index)).size),
            "n_tokens_in_prompt": run.windows.max_text_length}
