"""Random token windows of long documents, their batches and the DataLoader (texts: :mod:`sae_core.texts`).

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
* Documents run together (``windows_per_document="run_together"``): every token of every document
  once an epoch, the documents in a seeded random order joined into rows of ``max_text_length``
  tokens, BOS first in every row and between documents, as SAELens's ``ActivationsStore`` makes its
  contexts (``concat_and_batch_sequences``: begin-batch and separator token BOS). Attention crosses
  the documents of a row there, and here too (``WindowBatch.joined``: no mask between them,
  positions run on along the row). Each piece of a document in a row is an item
  (:class:`DocumentPiece`), so every cell still maps back to (document, position). The one
  difference: where a separator would land in a row's last cell, SAELens writes a BOS there and
  this pads it; no kept row sees that cell (causal attention; BOS rows are dropped by the policy).
  Epoch 0's document order, ``np.random.default_rng((seed, 0)).permutation``, is the permutation
  ``datasets.Dataset.shuffle(seed=seed)`` draws (numpy seeds ``(seed, 0)`` and ``seed`` alike), so
  it runs the documents in the order SAELens's runner reads a dataset shuffled with that seed.
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
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset

from sae_core.config import WindowConfig

logger = logging.getLogger(__name__)

class Window(NamedTuple):
    """One item of :class:`WindowedTextDataset`."""

    input_ids: torch.Tensor  # (n,) int64, n <= max_text_length; empty if the text had no tokens
    doc_index: int
    window_start: int  # offset of the window in the document's tokens (before any BOS)
    bos: bool = False  # a BOS was prepended at position 0 (it is not one of the document's tokens)
    row: int = -1  # row of a packed batch, as the batch sampler laid it out (-1: the collate packs)
    joined: bool = False  # a piece of documents run together: its row attends across documents


WINDOWS_PER_DOCUMENT = ("one", "proportional", "run_together")


class DocumentPiece(NamedTuple):
    """Tokens ``[start, start + length)`` of document ``index``, a piece of a row of documents run
    together (``windows_per_document="run_together"``), after a BOS when the dataset prepends one."""

    index: int
    start: int
    length: int


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
        """Windows an epoch draws from a document of ``n_tokens`` tokens (see the module docstring; documents
        run together count one)."""
        if self.windows_per_document in ("one", "run_together"):
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

    def __getitem__(self, index: int | PackedIndex | WindowKey | DocumentPiece) -> Window:
        if isinstance(index, PackedIndex):
            return self[index.index]._replace(row=index.row)
        if isinstance(index, DocumentPiece):
            ids = [int(t) for t in self.token_ids(index.index)[index.start:index.start + index.length]]
            if len(ids) != index.length or index.length < 1:
                raise IndexError(f"document {index.index} has no {index.length} tokens from {index.start}")
            head = [self.tokenizer.bos_token_id] if self.prepend_bos else []
            return Window(torch.tensor(head + ids, dtype=torch.long), index.index, index.start, self.prepend_bos,
                          joined=True)
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
    joined: bool = False  # the windows of a row are documents run together: they attend to each other

    @property
    def n_windows(self) -> int:
        """Windows in the batch (non-empty texts)."""
        return int(self.doc_index.numel())

    def pin_memory(self) -> WindowBatch:
        def pin(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.pin_memory()

        return WindowBatch(self.input_ids.pin_memory(), self.attention_mask.pin_memory(),
                           self.doc_index.pin_memory(), self.window_start.pin_memory(), self.n_empty,
                           pin(self.bos), pin(self.segment), self.joined)

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


def run_together(order: Sequence[int], tokens: dict[int, int], width: int, bos: bool,
                 rows_per_batch: int) -> list[list[PackedIndex]]:
    """Documents ``order`` (``tokens[d]`` tokens each) run together into rows of ``width`` cells, BOS
    first in every row and before every document when ``bos``, cut into batches of ``rows_per_batch``
    rows: each batch a list of :class:`DocumentPiece` items naming their row (the last row may be short)."""
    head = int(bos)
    if width < head + 1:
        raise ValueError(f"rows of {width} cells hold no token after a BOS; raise max_text_length")
    batches: list[list[PackedIndex]] = [[]]
    row, room = 0, width
    for doc in order:
        start, left = 0, tokens[doc]
        while left > 0:
            if room < head + 1:  # a new row (SAELens writes a dangling separator here; this pads the cell)
                row, room = row + 1, width
                if row == rows_per_batch:
                    batches.append([])
                    row = 0
            take = min(left, room - head)
            batches[-1].append(PackedIndex(DocumentPiece(doc, start, take), row))
            start, left, room = start + take, left - take, room - head - take
    return [b for b in batches if b]


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
    (:class:`RowPacker`, longest first). Pieces of documents run together (``Window.joined``) always
    take the rows the sampler gave them, and the batch is ``joined``.
    """
    kept = [w for w in items if w.input_ids.numel() > 0]
    joined = any(w.joined for w in kept)
    if joined and not all(w.joined and w.row >= 0 for w in kept):
        raise ValueError("pieces of documents run together come with their rows and are not mixed with windows; "
                         "batch them with the training sampler (TokenBudgetBatchSampler)")
    pack = pack or joined
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
                       segment if pack else None, joined)


def windowed_dataset(texts: Any, tokenizer: Any, windows: WindowConfig, rank: int = 0, world_size: int = 1,
                     windows_per_document: str = "one") -> WindowedTextDataset | IterableWindowedTextDataset:
    """The random windows of ``windows`` over ``texts``: indexable for sized texts, streaming otherwise
    (``windows_per_document="proportional"``: the training sampler's many windows of long documents)."""
    args = (texts, tokenizer, windows.max_text_length, windows.seed, windows.prepend_bos, windows.text_field)
    if hasattr(texts, "__len__") and not isinstance(texts, IterableDataset):
        return WindowedTextDataset(*args, windows_per_document=windows_per_document)
    return IterableWindowedTextDataset(*args, rank, world_size)
