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

import dataclasses
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch

from sae_core.config import (
    ForwardConfig,
    LoaderConfig,
    RunConfig,
    TokenPolicy,
    WhiteningConfig,
    WindowConfig,
)
from sae_core.data import WindowBatch, pad_id_of, windowed_dataset
from sae_core.files import file_sha256, read_json
from sae_core.loader import document_progress, make_dataloader
from sae_core.model_loading import resolve_dtype
from sae_core.precision import resolve_forward
from sae_core.store import ShardBuffer, ShardWriter
from sae_core.texts import limit_texts
from sae_core.whitening.statistics import (
    STATS_JSON,
    WHITENED_RUN,
    WHITENING_FILENAME,
    IncrementalWhitener,
    Whitener,
)

logger = logging.getLogger(__name__)


TOKEN_NAMES = ("bos", "eos", "pad", "special")
DOCUMENT_NAMES = {"batch_size": "loader", "max_length": "windows", "dtype": "forward", "prepend_bos": "windows",
                  "seed": "windows", "method": "whitening", "eps": "whitening", "shrinkage": "whitening"}
"""The design document's names (``003``) and the section each one sets; ``num_samples`` and
``exclude_tokens`` are translated too (:meth:`ExtractionConfig.document`)."""


@dataclass(frozen=True)
class ExtractionConfig:
    """Two-pass whitened extraction: statistics (pass one), then whitened chunks (pass two).

    Windows, loader, forward and whitening are the run's sections (``RunConfig``), so the whitened
    rows are those the store and training see. :meth:`document` takes the design document's names.
    """

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
    windows: WindowConfig = field(default_factory=WindowConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    forward: ForwardConfig = field(default_factory=ForwardConfig)
    whitening: WhiteningConfig = field(default_factory=WhiteningConfig)
    sample_limit: int | None = None
    """Documents used (the first ones); None: all."""
    chunk_size: int = 16384
    """Pass two flushes a chunk once it holds this many kept rows (at the end of a batch)."""
    device: str | None = None
    """Device of the statistics; None: the model's device."""
    storage_dtype: str = "float32"
    """Dtype of the stored whitened activations: float32 or float16."""
    checkpoint_batches: int = 50
    """Pass one saves its statistics every this many batches (an interrupted pass resumes there)."""

    def __post_init__(self) -> None:
        if self.chunk_size <= 0 or self.checkpoint_batches <= 0:
            raise ValueError("chunk_size and checkpoint_batches must be positive; "
                             f"got {self.chunk_size}, {self.checkpoint_batches}")
        if self.sample_limit is not None and self.sample_limit <= 0:
            raise ValueError(f"sample_limit must be positive or None, got {self.sample_limit}")
        if self.storage_dtype not in ("float32", "float16"):
            raise ValueError(f"storage_dtype must be float32 or float16, got {self.storage_dtype!r}")

    @classmethod
    def document(cls, model: Any, output_dir: str | os.PathLike[str], *, num_samples: int | None = None,
                 exclude_tokens: Sequence[str | int] = ("bos", "pad"), **values: Any) -> ExtractionConfig:
        """The config under the design document's names: ``batch_size``, ``max_length``,
        ``num_samples`` (our ``sample_limit``), ``dtype`` (``forward.dtype``), ``exclude_tokens``
        (a :class:`TokenPolicy`), ``prepend_bos``, ``seed``, ``method``, ``eps``, ``shrinkage``; other
        keywords are this class's own fields."""
        sections: dict[str, dict[str, Any]] = {name: {} for name in ("windows", "loader", "forward", "whitening")}
        own = {k: v for k, v in values.items() if k not in DOCUMENT_NAMES}
        for key, value in values.items():
            if key in DOCUMENT_NAMES:
                ours = {"max_length": "max_text_length"}.get(key, key)
                sections[DOCUMENT_NAMES[key]][ours] = value
        sections["windows"]["policy"] = policy_of(exclude_tokens)
        return cls(model, output_dir, windows=WindowConfig(**sections["windows"]),
                   loader=LoaderConfig(**sections["loader"]), forward=ForwardConfig(**sections["forward"]),
                   whitening=WhiteningConfig(**sections["whitening"]), sample_limit=num_samples, **own)

    @classmethod
    def from_run_config(cls, run: RunConfig, output_dir: str | os.PathLike[str], **overrides: Any) -> ExtractionConfig:
        """The run's sections and first hook point (``RunConfig``); ``overrides`` are this class's fields."""
        fields = {"hook_point": run.hook_points[0], "windows": run.windows,
                  "loader": dataclasses.replace(run.loader, pack_windows=False), "forward": run.forward,
                  "whitening": run.whitening, "device": run.device}
        return cls(run.name, output_dir, **{**fields, **overrides})

    @classmethod
    def from_constants(cls, name: str, output_dir: str | os.PathLike[str], **overrides: Any) -> ExtractionConfig:
        """:meth:`from_run_config` of a constant file by name."""
        from sae_core.models import load_run_config

        return cls.from_run_config(load_run_config(name), output_dir, **overrides)


def policy_of(exclude_tokens: Sequence[str | int]) -> TokenPolicy:
    """The :class:`TokenPolicy` of the design document's ``exclude_tokens`` (``bos``, ``eos``, ``pad``,
    ``special`` or token ids; pad rows are always excluded, so ``pad`` must be listed)."""
    unknown = [t for t in exclude_tokens if not isinstance(t, int) and t not in TOKEN_NAMES]
    if unknown:
        raise ValueError(f"unknown exclude_tokens {unknown}; use {TOKEN_NAMES} or integer token ids")
    if "pad" not in exclude_tokens:
        raise ValueError("pad rows hold no token and are always excluded; keep 'pad' in exclude_tokens")
    return TokenPolicy(exclude_bos="bos" in exclude_tokens, exclude_eos="eos" in exclude_tokens,
                       exclude_special="special" in exclude_tokens,
                       exclude_token_ids=tuple(t for t in exclude_tokens if isinstance(t, int)))


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
        self.config = config = resolve_forward(config, self.model.cfg.device)
        self.hook = resolve_hook(self.model, config.hook_point or config.layer_index)
        tokenizer = config.tokenizer if config.tokenizer is not None else self.model.tokenizer
        if isinstance(tokenizer, str):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        self.tokenizer = tokenizer
        self.texts = limit_texts(texts, config.sample_limit)
        self.dataset = windowed_dataset(self.texts, tokenizer, config.windows)
        self.policy = config.windows.policy
        self.device = torch.device(config.device) if config.device else torch.device(self.model.cfg.device)
        self.output_dir = Path(config.output_dir)

    def identity(self) -> dict[str, Any]:
        """What a resumed pass must share with the interrupted one."""
        c = self.config
        return {"model": self.model.cfg.model_name, "hook": self.hook, "n_documents": len(self.dataset),
                "batch_size": c.loader.batch_size, "max_length": c.windows.max_text_length, "seed": c.windows.seed,
                "prepend_bos": c.windows.prepend_bos, "forward_dtype": c.forward.dtype,
                "token_policy": self.policy.to_json(self.tokenizer)}

    def _batches(self, start_batch: int) -> Iterator[WindowBatch]:
        loader = make_dataloader(self.dataset, self.config.loader, start_batch=start_batch)
        yield from document_progress(loader, f"batches from {start_batch}", start_batch, leave=False)

    def _activations(self, start_batch: int, policy: TokenPolicy) -> Iterator[tuple[int, WindowBatch, Any]]:
        """(batches consumed, window batch, ActivationBatch) per non-empty batch, from ``start_batch``."""
        from sae_core.activations import iter_activation_batches

        state = {"done": start_batch, "batch": None}

        def counted() -> Iterator[WindowBatch]:
            for batch in self._batches(start_batch):
                state["done"], state["batch"] = state["done"] + 1, batch
                yield batch

        for acts in iter_activation_batches(self.model, counted(), [self.hook], policy, self.config.forward.dtype,
                                            compile=self.config.forward.compile):
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
        whitener = stats.to_whitener(self.config.whitening.method, self.config.whitening.eps,
                                       self.config.whitening.shrinkage, self.hook)
        whitener.save(self.output_dir)
        return whitener

    def process_and_store_whitened(self) -> PassTwoResult:
        """Pass two: whiten the kept rows of every batch and store padded NPZ chunks, resumably.

        The chunks follow the activation store's padded format, so ``sae_core.store.ActivationRun``
        reads the ``whitened/`` run like any other.
        """
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
        """The store's padded chunks (:class:`~sae_core.store.ShardBuffer`) of whitened kept rows."""
        buffer = ShardBuffer([self.hook], {self.hook: "activations"}, padded=True,
                             storage=resolve_dtype(self.config.storage_dtype))
        pad_id, done = pad_id_of(self.tokenizer), writer.batches_done
        for done, batch, acts in self._activations(writer.batches_done, self.policy):
            keep = self.policy.keep_mask(batch.input_ids, batch.attention_mask, self.tokenizer)  # (batch, pos)
            buffer.add(acts._replace(acts={self.hook: whitener.forward(acts.acts[self.hook].float())}), batch, keep)
            buffer.counts["windows"] = buffer.counts.get("windows", 0) + int(batch.input_ids.shape[0])
            if buffer.rows >= self.config.chunk_size:
                writer.write(buffer.tensors(pad_id), done, counts=buffer.counts, rows=buffer.rows)
                buffer.reset()
        if buffer.rows:
            writer.write(buffer.tensors(pad_id), done, counts=buffer.counts, rows=buffer.rows)


def _json_roundtrip(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples become lists), for comparisons with stored metadata."""
    import json

    from sae_core.files import json_default

    return json.loads(json.dumps(obj, default=json_default))


__all__ = ["ActivationExtractor", "ExtractionConfig", "PassOneResult", "PassTwoResult"]
