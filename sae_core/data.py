"""Random token windows of long documents, their batches and the DataLoader (texts: :mod:`sae_core.texts`).

* :class:`WindowedTextDataset` tokenises one document per ``__getitem__`` and, when it is longer
  than ``max_text_length``, keeps a random contiguous window of that length, drawn from
  ``(seed, epoch, index)``. Long documents are seen in different parts on different epochs without
  pre-tokenising the corpus, memory stays flat, and every worker draws the same windows for the
  same epoch (the generator is derived from the index, not from worker state). Streaming sources
  (no ``len``) go through :class:`IterableWindowedTextDataset`, which draws the same windows.
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
import itertools
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from sae_core.config import LoaderConfig, WindowConfig

logger = logging.getLogger(__name__)

class Window(NamedTuple):
    """One item of :class:`WindowedTextDataset`."""

    input_ids: torch.Tensor  # (n,) int64, n <= max_text_length; empty if the text had no tokens
    doc_index: int
    window_start: int  # offset of the window in the document's tokens (before any BOS)
    bos: bool = False  # a BOS was prepended at position 0 (it is not one of the document's tokens)
    row: int = -1  # row of a packed batch, as the batch sampler laid it out (-1: the collate packs)


class PackedIndex(NamedTuple):
    """A document index with the row the batch sampler gave its window in a packed batch."""

    index: int
    row: int


class WindowedTextDataset(Dataset):
    """Each item: one document tokenised, cut to a random window of ``max_text_length`` tokens."""

    def __init__(self, texts: Any, tokenizer: Any, max_text_length: int = 128, seed: int = 0,
                 prepend_bos: bool = False, text_field: str = "text") -> None:
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
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Draw different windows: items of epoch ``e`` use the generator ``(seed, e, index)``."""
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

    def __getitem__(self, index: int | PackedIndex) -> Window:
        if isinstance(index, PackedIndex):
            return self[index.index]._replace(row=index.row)
        return make_window(self.tokenizer, self.text(index), index, self.max_text_length,
                           (self.seed, self.epoch, index), self.prepend_bos)


def make_window(tokenizer: Any, text: str, index: int, max_text_length: int, rng_key: tuple[int, ...],
                prepend_bos: bool) -> Window:
    """Tokenise ``text`` (no special tokens) and keep a random window drawn from ``rng_key``."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    room = max_text_length - int(prepend_bos)
    start = 0
    if len(ids) > room:
        rng = np.random.default_rng(rng_key)
        start = int(rng.integers(0, len(ids) - room + 1))
        ids = ids[start:start + room]
    if prepend_bos and ids:
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


def windowed_dataset(texts: Any, tokenizer: Any, windows: WindowConfig, rank: int = 0,
                     world_size: int = 1) -> WindowedTextDataset | IterableWindowedTextDataset:
    """The random windows of ``windows`` over ``texts``: indexable for sized texts, streaming otherwise."""
    args = (texts, tokenizer, windows.max_text_length, windows.seed, windows.prepend_bos, windows.text_field)
    if hasattr(texts, "__len__") and not isinstance(texts, IterableDataset):
        return WindowedTextDataset(*args)
    return IterableWindowedTextDataset(*args, rank, world_size)


def make_dataloader(dataset: WindowedTextDataset | IterableWindowedTextDataset,
                    cfg: LoaderConfig | None = None, indices: Sequence[int] | None = None,
                    start_batch: int = 0) -> DataLoader:
    """A DataLoader of :class:`WindowBatch` over ``dataset`` (or only the documents ``indices``).

    The batch list is a pure function of (indices, seed, epoch); ``start_batch`` drops its first
    batches without tokenising them. A streaming dataset takes neither ``indices`` (it splits by
    rank itself) nor ``start_batch`` (skip batches while iterating).
    """
    cfg = cfg if cfg is not None else LoaderConfig()
    common = dict(collate_fn=PadCollate(pad_id_of(dataset.tokenizer), cfg.pack_windows), num_workers=cfg.num_dataloader_workers,
                  pin_memory=cfg.pin_memory, persistent_workers=cfg.persistent_workers, **cfg.extra)
    if isinstance(dataset, IterableWindowedTextDataset):
        if indices is not None or start_batch:
            raise ValueError("a streaming dataset takes no indices / start_batch; skip batches while iterating")
        return DataLoader(dataset, batch_size=cfg.batch_size, **common)
    if start_batch < 0:
        raise ValueError(f"start_batch must be >= 0, got {start_batch}")
    indices = range(len(dataset)) if indices is None else indices
    if cfg.group_by_length:
        batches: Any = LengthGroupedBatchSampler(dataset, indices, cfg.batch_size, cfg.length_group_batches,
                                                 cfg.shuffle, cfg.batch_tokens, cfg.pack_windows)
        return DataLoader(dataset, batch_sampler=SkipBatches(batches, start_batch), **common)
    generator = torch.Generator().manual_seed(dataset.seed * 1_000_003 + dataset.epoch)
    source = torch.utils.data.Subset(dataset, list(indices))
    order = (torch.utils.data.RandomSampler(source, generator=generator) if cfg.shuffle
             else torch.utils.data.SequentialSampler(source))
    batches = torch.utils.data.BatchSampler(order, cfg.batch_size, drop_last=False)
    return DataLoader(source, batch_sampler=SkipBatches(batches, start_batch), **common)
