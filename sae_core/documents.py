"""The design documents' interfaces, as thin entry points over the modules that implement them.

The four documents in ``shared/seeds/`` (000 saving activations, 001 scaling changes, 002 analysis
guide, 003 whitening extractor) call some things by other names, or through interfaces this
package does not otherwise have. This module gives a reader who follows a document those names;
each one calls the stage that does the work and repeats none of it:

- :class:`ModelWithHooks` (002): a ``HookedTransformer`` with the document's ``get_layer`` /
  ``num_layers``; a layer index means that layer's ``hook_resid_post`` (``sae_core.hooks``), so
  ``get_layer(L)`` is a TransformerLens ``HookPoint`` (an identity ``nn.Module``: the document's
  ``register_forward_hook`` works on it) instead of an architecture-dependent ``if hasattr`` chain.
- :class:`ActivationCollector` (002): ``collect(input_ids, layer_indices, positions)`` is one
  :func:`~sae_core.activations.run_to_hooks` forward, positions picked by
  :func:`~sae_core.activations.select_positions`.
- :class:`ActivationCache` (002): ``process_dataset`` is one run of the activation store
  (:func:`sae_core.store.save`), read back with :class:`~sae_core.store.ActivationRun`, instead of
  one ``.npy`` per layer and batch (padded, not resumable, no record of what was run).
- :func:`list_layers` and :class:`TextDataset` / :data:`HuggingFaceDataset` (000): hook point names
  filtered by a pattern (:func:`sae_core.hooks.list_hook_points`); documents from a list or an HF
  dataset (:func:`sae_core.texts.load_texts`) with ``random_sample(n, seed)``
  (:func:`sae_core.texts.random_sample`).
- :func:`whitening_parameters` (003): the saved whitening under the document's names ``{mean,
  transform, reverse_transform, n_samples}`` (:class:`sae_core.whitening.Whitener`).

Everything else the documents name exists under the same or another name; README.md's table
"The design documents' names" maps each one. Rejected: a second model wrapper holding HF modules
(``register_forward_hook`` on decoder layers), since every stage here runs on hook points.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookPoint

from sae_core.activations import run_to_hooks, select_positions
from sae_core.checks import check_texts
from sae_core.config import TextSourceConfig
from sae_core.hooks import hook_layer, list_hook_points, resolve_hook
from sae_core.store import ActivationRun, ShardedRows, save
from sae_core.texts import load_texts, random_sample
from sae_core.whitening import Whitener

Layer = int | str
"""A layer index (its ``hook_resid_post``; negative counts from the end) or an exact hook point name."""


def list_layers(model: HookedTransformer, pattern: str | None = None) -> list[str]:
    """Hook point names in model order, filtered by a glob or regex (000's ``lm.layers.list_layers()``;
    ``list_layers(model, "attn")`` is the document's ``[l for l in all_layers if "attn" in l]``)."""
    return [info.name for info in list_hook_points(model, pattern, seq_len=None)]


class ModelWithHooks:
    """002's model interface: a ``HookedTransformer`` (or a constant-file name to load) and its layers.

    ``kind`` picks which hook point of a layer an index means (``resid_post``: the output of the
    block, what the document's forward hook on a decoder layer sees).
    """

    def __init__(self, model: HookedTransformer | str, kind: str = "resid_post") -> None:
        if isinstance(model, str):
            from sae_core.model_loading import load_model

            model = load_model(model)
        self.model = model
        self.tokenizer = model.tokenizer
        self.device = torch.device(model.cfg.device)
        self.kind = kind

    def layer_hook(self, layer: Layer) -> str:
        """The hook point name of ``layer`` (validated; a wrong one names the closest valid names)."""
        return resolve_hook(self.model, layer, self.kind)

    def get_layer(self, layer: Layer) -> HookPoint:
        """The ``HookPoint`` module of ``layer`` (``register_forward_hook`` / ``add_hook`` work on it)."""
        return self.model.hook_dict[self.layer_hook(layer)]

    def num_layers(self) -> int:
        return self.model.cfg.n_layers

    def list_layers(self, pattern: str | None = None) -> list[str]:
        return list_layers(self.model, pattern)


def _model_of(model: HookedTransformer | ModelWithHooks) -> HookedTransformer:
    return model.model if isinstance(model, ModelWithHooks) else model


class ActivationCollector:
    """002's collector: activations of several layers from one forward pass, hooks always removed.

    ``forward_dtype`` is the autocast precision (``FORWARD["dtype"]``); weights keep their dtype.
    """

    def __init__(self, model: HookedTransformer | ModelWithHooks, forward_dtype: str = "float32",
                 kind: str = "resid_post") -> None:
        self.model_wrapper = model if isinstance(model, ModelWithHooks) else ModelWithHooks(model, kind)
        self.forward_dtype = forward_dtype
        self.activations: dict[Layer, Tensor] = {}

    def collect(self, input_ids: Int[Tensor, "batch pos"], layer_indices: Sequence[Layer],
                positions: str | Sequence[int] = "all",
                attention_mask: Int[Tensor, "batch pos"] | None = None) -> dict[Layer, Tensor]:
        """Activations per layer (keyed as given): ``"all"`` -> ``(batch, pos, d)``; ``"last"`` ->
        ``(batch, d)``, the last token of each row (the last real one with ``attention_mask``);
        a list of positions -> ``(batch, len, d)``, in position order, negative ones from the row end.
        """
        hooks = {layer: self.model_wrapper.layer_hook(layer) for layer in layer_indices}
        acts = run_to_hooks(self.model_wrapper.model, list(dict.fromkeys(hooks.values())), input_ids,
                            self.forward_dtype)
        self.activations = {}  # a new dict per call: an earlier result stays as it was
        if positions == "all":
            self.activations = {layer: acts[hook] for layer, hook in hooks.items()}
            return self.activations
        keep = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        chosen = select_positions(keep.cpu(), positions)  # (batch, pos)
        per_row = chosen.sum(dim=1)
        if not bool((per_row == per_row[0]).all()) or int(per_row[0]) == 0:
            raise ValueError(f"positions {positions!r} pick {per_row.tolist()} tokens per row (pads are not "
                             "picked); use positions='last', positions that every row reaches, or no attention_mask")
        for layer, hook in hooks.items():
            rows = acts[hook][chosen.to(acts[hook].device)]  # (batch * n, d), row-major
            shaped = rows.view(input_ids.shape[0], int(per_row[0]), rows.shape[-1])
            self.activations[layer] = shaped[:, 0] if positions == "last" else shaped
        return self.activations


class ActivationCache:
    """002's cache: a dataset's activations at several layers, as one run of the activation store.

    Not TransformerLens's ``ActivationCache`` (one forward's activations in memory). Rows are the
    kept tokens of random windows (pads dropped), with their document, position and token id.
    """

    def __init__(self, cache_dir: str | os.PathLike[str] = "./activation_cache") -> None:
        self.cache_dir = Path(cache_dir)
        self.run_id: str | None = None

    def process_dataset(self, model_wrapper: HookedTransformer | ModelWithHooks, dataset: Any,
                        layers: Sequence[Layer], batch_size: int = 32, *, run_id: str | None = None,
                        **knobs: Any) -> str:
        """:func:`sae_core.store.save` of ``dataset`` (a list of texts, a :class:`TextDataset`, an HF
        dataset or a ``TextSourceConfig``) at ``layers``; ``knobs`` are the store's flat knobs
        (``max_text_length``, ``shard_size``, ``dtype``, ...). Returns the run id (resumes a known one)."""
        self.run_id = save(_model_of(model_wrapper), list(layers), dataset, self.cache_dir, run_id=run_id,
                           batch_size=batch_size, progress=False, **knobs)
        return self.run_id

    def run(self, run_id: str | None = None) -> ActivationRun:
        """The stored run (default: the last one processed)."""
        run_id = run_id or self.run_id
        if run_id is None:
            raise ValueError("no run processed yet; call process_dataset(...) or pass run_id=")
        return ActivationRun.open(self.cache_dir, run_id)

    def activations(self, layer: Layer, run_id: str | None = None) -> ShardedRows:
        """The run's rows at ``layer`` (a hook name, or a layer index if the run holds one hook there)."""
        run = self.run(run_id)
        if isinstance(layer, str):
            return run.activations(layer)
        n_layers = run.meta.get("identity", {}).get("n_layers")
        index = layer % n_layers if layer < 0 and n_layers else layer
        at = [h for h in run.hooks if hook_layer(h) == index]
        if len(at) != 1:
            raise KeyError(f"layer {layer} matches hooks {at} of run {run.run_id} (hooks: {run.hooks}); "
                           "pass the hook name")
        return run.activations(at[0])


class TextDataset(list):
    """000's text dataset: a list of documents (so every stage takes it as is) with ``random_sample``."""

    def __init__(self, texts: Iterable[str] = ()) -> None:
        super().__init__(texts)
        check_texts(self)

    @classmethod
    def from_source(cls, source: TextSourceConfig, text_field: str = "text") -> TextDataset:
        """The documents of any text source (``DATASET`` section: a corpus, an HF dataset, files)."""
        texts = load_texts(source, text_field)
        if isinstance(texts, (list, tuple)):
            return cls(texts)
        if not hasattr(texts, "__len__"):
            raise TypeError("a streaming dataset has no length to sample from; pass it to save() as it is")
        return cls(texts[text_field])

    @classmethod
    def from_huggingface(cls, name: str, split: str = "train", store: Any = None, text_field: str = "text",
                         sample_limit: int | None = None) -> TextDataset:
        """An HF dataset's ``text_field`` column (needs the hub or its cache; a local folder works
        offline). ``store`` is accepted for the document's signature: HF caches datasets itself."""
        del store
        return cls.from_source(TextSourceConfig(source="hf", name=name, split=split, sample_limit=sample_limit),
                               text_field)

    def random_sample(self, n: int, seed: int = 0) -> TextDataset:
        """``n`` documents drawn without replacement, reproducibly, in their original order."""
        return TextDataset(random_sample(self, n, seed))


HuggingFaceDataset = TextDataset.from_huggingface
"""000's ``HuggingFaceDataset(name=, split=, text_field=)``: :meth:`TextDataset.from_huggingface`."""


def whitening_parameters(path: str | os.PathLike[str]) -> dict[str, Float[Tensor, "..."] | int]:
    """003's saved whitening parameters ``{mean, transform, reverse_transform, n_samples}`` of a
    whitening folder, ``.safetensors`` or ``.pt`` (``Whitener.save`` / ``save_torch``), in float64."""
    whitener = Whitener.load(path)
    return {"mean": whitener.mean, "transform": whitener.transform,
            "reverse_transform": whitener.reverse_transform, "n_samples": whitener.n_samples}


__all__ = ["ActivationCache", "ActivationCollector", "HuggingFaceDataset", "Layer", "ModelWithHooks",
           "TextDataset", "list_layers", "whitening_parameters"]
