"""Two-pass extraction of whitened activations from text, resumable at every step.

:class:`ActivationExtractor`: pass one streams texts through the model
(``sae_core.data`` windows and loader, ``sae_core.activations`` hooks and token policy) and
accumulates the statistics, checkpointing them so an interrupted pass resumes at the next batch.
Pass two whitens the same kept rows and stores them as the activation store's padded NPZ chunks
(``activations``, ``attention_mask`` marking kept rows, ``token_ids``, ``doc_index``,
``position``) through ``sae_core.store.ShardWriter`` (atomic chunks, resumable), so the store's
``ActivationRun`` reads them back. Pass one can also read an existing activation run
(:func:`sae_core.whitening.statistics_from_run`).

TransformerLens-dependent stages are imported inside the methods, and :mod:`sae_core.whitening`
imports this module only on first use of its names, so loading a ``Whitener`` (a training job, a
worker process) costs only torch and safetensors.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from sae_core._io import file_sha256, read_json
from sae_core.data import (
    LoaderConfig,
    WindowBatch,
    WindowedTextDataset,
    limit_texts,
    make_dataloader,
)
from sae_core.whitening import (
    METHODS,
    STATS_JSON,
    WHITENED_RUN,
    WHITENING_FILENAME,
    IncrementalWhitener,
    Whitener,
)

if TYPE_CHECKING:
    from sae_core.activations import TokenPolicy

logger = logging.getLogger(__name__)


TOKEN_NAMES = ("bos", "eos", "pad", "special")


@dataclass(frozen=True)
class ExtractionConfig:
    """Two-pass whitened extraction: statistics (pass one), then whitened chunks (pass two)."""

    model: Any = field(repr=False)
    """A ``HookedTransformer`` or a constant-file name (``"smollm2_135m_instruct"``)."""
    output_dir: str | os.PathLike[str]
    """Folder of the statistics, the ``Whitener`` and the ``whitened/`` chunk run."""
    tokenizer: Any = None
    """A tokenizer or the name / folder of one (``AutoTokenizer``); None: the model's."""
    layer_index: int = -1
    """Layer whose ``hook_resid_post`` is read (-1: last); ignored when ``hook_point`` is set."""
    hook_point: str | None = None
    """Exact hook point name; overrides ``layer_index``."""
    batch_size: int = 32
    """Windows per forward pass."""
    max_length: int = 128
    """Tokens per window (a random window of longer documents)."""
    num_samples: int | None = None
    """Documents used (the first ones); None: all."""
    chunk_size: int = 16384
    """Pass two flushes a chunk once it holds this many kept rows (at the end of a batch)."""
    device: str | None = None
    """Device of the statistics; None: the model's device."""
    dtype: str = "float32"
    """Forward dtype (bfloat16 / float16 run under autocast)."""
    storage_dtype: str = "float32"
    """Dtype of the stored whitened activations: float32 or float16."""
    exclude_tokens: tuple[str | int, ...] = ("bos", "pad")
    """Rows left out of the statistics: ``bos``, ``eos``, ``pad``, ``special`` or token ids. Pad rows
    are always excluded (``pad`` must be listed)."""
    prepend_bos: bool = True
    """Put BOS at position 0 of every window: the attention-sink row is then BOS, which is excluded."""
    method: str = "zca"
    """``zca`` or ``pca``."""
    eps: float = 1e-4
    """Regulariser added to the covariance eigenvalues."""
    shrinkage: float = 0.0
    """Shrinkage of the covariance toward a scaled identity (0..1)."""
    seed: int = 0
    """Seed of the random windows."""
    checkpoint_batches: int = 50
    """Pass one saves its statistics every this many batches (an interrupted pass resumes there)."""

    def __post_init__(self) -> None:
        if self.batch_size <= 0 or self.max_length < 2 or self.chunk_size <= 0 or self.checkpoint_batches <= 0:
            raise ValueError("batch_size, chunk_size and checkpoint_batches must be positive and max_length >= 2; "
                             f"got {self.batch_size}, {self.chunk_size}, {self.checkpoint_batches}, {self.max_length}")
        if self.num_samples is not None and self.num_samples <= 0:
            raise ValueError(f"num_samples must be positive or None, got {self.num_samples}")
        unknown = [t for t in self.exclude_tokens if not isinstance(t, int) and t not in TOKEN_NAMES]
        if unknown:
            raise ValueError(f"unknown exclude_tokens {unknown}; use {TOKEN_NAMES} or integer token ids")
        if "pad" not in self.exclude_tokens:
            raise ValueError("pad rows hold no token and are always excluded; keep 'pad' in exclude_tokens")
        if self.method not in METHODS:
            raise ValueError(f"unknown whitening method {self.method!r}; use one of {METHODS}")
        if self.eps < 0 or not 0.0 <= self.shrinkage <= 1.0:
            raise ValueError(f"need eps >= 0 and 0 <= shrinkage <= 1, got {self.eps}, {self.shrinkage}")
        if self.storage_dtype not in ("float32", "float16"):
            raise ValueError(f"storage_dtype must be float32 or float16, got {self.storage_dtype!r}")
        from sae_core.model_loading import resolve_dtype

        resolve_dtype(self.dtype)
        object.__setattr__(self, "exclude_tokens", tuple(self.exclude_tokens))

    @classmethod
    def from_constants(cls, name: str, output_dir: str | os.PathLike[str], **overrides: Any) -> ExtractionConfig:
        """Defaults from a constant file: ``HOOK_POINTS[0]``, ``EXTRACTION`` and ``WHITENING``."""
        from sae_core.models import load_model_constants

        c = load_model_constants(name)
        fields = {"model": name, "output_dir": output_dir, "hook_point": c.HOOK_POINTS[0],
                  "batch_size": c.EXTRACTION.get("batch_size", 32), "max_length": c.EXTRACTION.get("max_text_length", 128),
                  "dtype": c.EXTRACTION.get("forward_dtype", "float32"), "method": c.WHITENING.get("method", "zca"),
                  "eps": c.WHITENING.get("eps", 1e-4), "shrinkage": c.WHITENING.get("shrinkage", 0.0),
                  "num_samples": c.WHITENING.get("sample_limit")}
        return cls(**{**fields, **overrides})

    def token_policy(self) -> TokenPolicy:
        """The :class:`TokenPolicy` of ``exclude_tokens``."""
        from sae_core.activations import TokenPolicy

        return TokenPolicy(exclude_bos="bos" in self.exclude_tokens, exclude_eos="eos" in self.exclude_tokens,
                           exclude_special="special" in self.exclude_tokens,
                           exclude_token_ids=tuple(t for t in self.exclude_tokens if isinstance(t, int)))


class PassOneResult(NamedTuple):
    """Statistics of pass one and the whitening built from them."""

    statistics: IncrementalWhitener
    whitener: Whitener
    n_batches: int
    resumed: bool


class PassTwoResult(NamedTuple):
    """Where pass two stored its chunks and how much they hold."""

    run_dir: Path
    n_chunks: int
    n_windows: int
    n_rows: int  # kept rows (non-pad, not excluded by the token policy)


class ActivationExtractor:
    """Two passes over ``texts``: whitening statistics, then whitened activation chunks."""

    def __init__(self, config: ExtractionConfig, texts: Any) -> None:
        from sae_core.hooks import resolve_hook

        self.config = config
        if isinstance(config.model, str):
            from sae_core.model_loading import load_model

            self.model = load_model(config.model)
        else:
            self.model = config.model
        self.hook = resolve_hook(self.model, config.hook_point or config.layer_index)
        tokenizer = config.tokenizer if config.tokenizer is not None else self.model.tokenizer
        if isinstance(tokenizer, str):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        self.tokenizer = tokenizer
        self.texts = limit_texts(texts, config.num_samples)
        self.dataset = WindowedTextDataset(self.texts, tokenizer, config.max_length, config.seed, config.prepend_bos)
        self.policy = config.token_policy()
        self.device = torch.device(config.device) if config.device else torch.device(self.model.cfg.device)
        self.output_dir = Path(config.output_dir)

    def identity(self) -> dict[str, Any]:
        """What a resumed pass must share with the interrupted one."""
        c = self.config
        return {"model": self.model.cfg.model_name, "hook": self.hook, "n_documents": len(self.dataset),
                "batch_size": c.batch_size, "max_length": c.max_length, "seed": c.seed,
                "prepend_bos": c.prepend_bos, "forward_dtype": c.dtype,
                "token_policy": self.policy.to_json(self.tokenizer)}

    def _batches(self, start_batch: int) -> Iterator[WindowBatch]:
        loader = make_dataloader(self.dataset, LoaderConfig(batch_size=self.config.batch_size), start_batch=start_batch)
        yield from tqdm(loader, desc=f"batches from {start_batch}", leave=False)

    def _activations(self, start_batch: int, policy: TokenPolicy) -> Iterator[tuple[int, WindowBatch, Any]]:
        """(batches consumed, window batch, ActivationBatch) per non-empty batch, from ``start_batch``."""
        from sae_core.activations import iter_activation_batches

        state = {"done": start_batch, "batch": None}

        def counted() -> Iterator[WindowBatch]:
            for batch in self._batches(start_batch):
                state["done"], state["batch"] = state["done"] + 1, batch
                yield batch

        for acts in iter_activation_batches(self.model, counted(), [self.hook], policy, self.config.dtype):
            yield state["done"], state["batch"], acts

    def _load_progress(self) -> tuple[IncrementalWhitener, dict[str, Any]] | None:
        if not (self.output_dir / STATS_JSON).exists():
            return None
        meta = read_json(self.output_dir / STATS_JSON)
        if meta.get("identity") != _json_roundtrip(self.identity()):
            raise ValueError(f"{self.output_dir / STATS_JSON} holds statistics of other settings "
                             f"({meta.get('identity')}); use the original settings or another output_dir")
        stats = IncrementalWhitener.load(self.output_dir, self.model.cfg.d_model, self.device)
        return stats, meta

    def compute_whitening_statistics(self) -> PassOneResult:
        """Pass one: stream the texts, accumulate mean and covariance, save them and the Whitener.

        Resumes from the last checkpoint of an interrupted run; a finished run is loaded, not redone.
        """
        c, identity = self.config, self.identity()
        progress = self._load_progress()
        stats, done = IncrementalWhitener(self.model.cfg.d_model, self.device), 0
        if progress is not None:
            stats, meta = progress
            done = int(meta["batches_done"])
            if meta.get("complete"):
                return PassOneResult(stats, self._publish(stats), done, True)
            logger.info("resuming whitening statistics at batch %d (%d rows)", done, stats.n)
        for number, (consumed, _, acts) in enumerate(self._activations(done, self.policy), start=1):
            stats.update(acts.acts[self.hook].to(self.device))
            if number % c.checkpoint_batches == 0:
                stats.save(self.output_dir, identity=identity, batches_done=consumed, complete=False)
            done = consumed
        stats.save(self.output_dir, identity=identity, batches_done=done, complete=True)
        return PassOneResult(stats, self._publish(stats), done, progress is not None)

    def _publish(self, stats: IncrementalWhitener) -> Whitener:
        whitener = stats.to_whitener(self.config.method, self.config.eps, self.config.shrinkage, self.hook)
        whitener.save(self.output_dir)
        return whitener

    def process_and_store_whitened(self) -> PassTwoResult:
        """Pass two: whiten the kept rows of every batch and store padded NPZ chunks, resumably.

        The chunks follow the activation store's padded format, so ``sae_core.store.ActivationRun``
        reads the ``whitened/`` run like any other.
        """
        from sae_core.store import ShardWriter

        meta_path = self.output_dir / STATS_JSON
        if not meta_path.exists() or not read_json(meta_path).get("complete"):
            raise FileNotFoundError(f"no complete whitening statistics in {self.output_dir}; run "
                                    "compute_whitening_statistics() first")
        whitener = Whitener.load(self.output_dir, expected_d=self.model.cfg.d_model)
        identity = {**self.identity(), "chunk_size": self.config.chunk_size,
                    "storage_dtype": self.config.storage_dtype,
                    "whitening_sha256": file_sha256(self.output_dir / WHITENING_FILENAME)}
        header = {"hooks": [self.hook], "tensor_keys": {self.hook: "activations"}, "d_model": whitener.d,
                  "storage_dtype": self.config.storage_dtype, "whitening": whitener.summary(),
                  "token_policy": self.policy.to_json(self.tokenizer),
                  "masking": "attention_mask marks kept rows (pad and excluded tokens are 0)"}
        writer = ShardWriter(self.output_dir / WHITENED_RUN, identity, header=header, shard_format="npz",
                             float_dtype=self.config.storage_dtype)
        if not writer.complete:
            self._write_chunks(writer, whitener)
            writer.finish(totals=writer.totals())
        totals = writer.totals()
        return PassTwoResult(writer.run_dir, len(writer.shards), totals.get("windows", 0), totals["rows"])

    def _write_chunks(self, writer: Any, whitener: Whitener) -> None:
        buffer: list[dict[str, Tensor]] = []
        done = writer.batches_done
        for done, batch, acts in self._activations(writer.batches_done, self.policy):
            keep = self.policy.keep_mask(batch.input_ids, batch.attention_mask, self.tokenizer)  # (batch, pos)
            padded = torch.zeros(*keep.shape, whitener.d, dtype=torch.float32)  # (batch, pos, d)
            padded[keep] = whitener.forward(acts.acts[self.hook].float()).cpu()
            buffer.append({"activations": padded, "attention_mask": keep.to(torch.uint8),
                           "token_ids": batch.input_ids, "doc_index": batch.doc_index,
                           "position": batch.token_positions()})
            if sum(int(b["attention_mask"].sum()) for b in buffer) >= self.config.chunk_size:
                self._flush(writer, buffer, done)
                buffer = []
        if buffer:
            self._flush(writer, buffer, done)

    def _flush(self, writer: Any, buffer: list[dict[str, Tensor]], batches_end: int) -> None:
        """Concatenate the buffered batches, padded on the right to the widest (token ids with PAD)."""
        from sae_core.data import pad_id_of

        width = max(b["token_ids"].shape[1] for b in buffer)
        chunk = {}
        for key in buffer[0]:
            value = pad_id_of(self.tokenizer) if key == "token_ids" else 0
            chunk[key] = torch.cat([b[key] if b[key].dim() == 1 else torch.nn.functional.pad(
                b[key], (0, 0) * (b[key].dim() - 2) + (0, width - b[key].shape[1]), value=value) for b in buffer])
        writer.write(chunk, batches_end, counts={"windows": chunk["token_ids"].shape[0]},
                     rows=int(chunk["attention_mask"].sum()))


def _json_roundtrip(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples become lists), for comparisons with stored metadata."""
    import json

    from sae_core._io import _json_default

    return json.loads(json.dumps(obj, default=_json_default))


__all__ = ["ActivationExtractor", "ExtractionConfig", "PassOneResult", "PassTwoResult"]
