"""Batches of windows: length-grouped (optionally packed) batch samplers and the DataLoader.

:func:`make_dataloader` batches documents of similar length together (less padding); the batch
list is a pure function of (documents, seed, epoch), and ``start_batch`` skips batches without
tokenising them, which is how an interrupted extraction resumes. With ``LoaderConfig.batch_tokens``
a batch is filled up to that many padded token cells; with ``pack_windows`` a length group's
windows are packed into shared rows (:class:`~sae_core.data.RowPacker`) first.

:func:`prefetched` makes the batches of a loader ahead in a thread, for loaders without worker
processes (training: tokenising, window drawing and collation then overlap the forward pass).
A thread rather than a worker process by default because a worker costs a process start per
epoch and a copy of every batch through shared memory; a thread needs neither, and the
tokeniser (Rust) and the forward (ATen kernels) both run outside the GIL.

Progress (:func:`document_progress`) is counted in documents, not batches: with a token budget the
number of batches is only known after measuring every window (a second tokenisation of the whole
corpus, which ``len(loader)`` would trigger), while the number of documents is known up front.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from sae_core.config import LoaderConfig
from sae_core.data import (
    IterableWindowedTextDataset,
    PackedIndex,
    PadCollate,
    RowPacker,
    WindowedTextDataset,
    pad_id_of,
)

logger = logging.getLogger(__name__)


def packed_shape(batch_tokens: int | None, max_text_length: int, packed: bool) -> tuple[int, int] | None:
    """The (rows, width) a packed (or run-together) token-budget loader fills its batches to: the compiled
    forward's static shape for them. None (shapes vary from batch to batch) without packing or a budget."""
    if not packed or batch_tokens is None or batch_tokens < max_text_length:
        return None
    return batch_tokens // max_text_length, max_text_length


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


PREFETCH_BATCHES = 4  # window batches the prefetch thread keeps ready (each a few hundred KB)


class _Failure(NamedTuple):
    error: BaseException


def prefetched(items: Iterable[Any], depth: int = PREFETCH_BATCHES) -> Iterator[Any]:
    """``items`` produced by a background thread up to ``depth`` ahead, in the same order.

    The thread stops when the consumer stops (this generator closed or collected); an error in
    the thread is raised in the consumer. The producer's Python work (tokenising is in Rust and
    releases the GIL) interleaves with the forward's, which spends its time in ATen kernels.
    """
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop, done = threading.Event(), object()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(done)
        except BaseException as error:  # noqa: BLE001 - handed to the consumer, which raises it
            put(_Failure(error))

    thread = threading.Thread(target=produce, name="sae_core-prefetch", daemon=True)
    thread.start()
    try:
        while (item := ready.get()) is not done:
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join(timeout=10)


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
    if getattr(dataset, "windows_per_document", "one") != "one":
        raise NotImplementedError(f"make_dataloader draws one window a document; windows_per_document="
                                  f"{dataset.windows_per_document!r} is drawn by the training sampler "
                                  "(ModelActivationSource); use windows_per_document='one' here")
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


def loader_documents(loader: DataLoader, start_batch: int = 0) -> tuple[int | None, int]:
    """(documents a :func:`make_dataloader` loader reads in all, documents in its first ``start_batch``
    batches); the total is None for a streaming dataset (no length up front). Counting the skipped
    documents walks the first ``start_batch`` batches of the sampler (resumes only)."""
    sampler = getattr(loader.batch_sampler, "batch_sampler", None)  # SkipBatches' inner sampler
    if sampler is None:
        return None, 0
    total = len(sampler.indices) if isinstance(sampler, LengthGroupedBatchSampler) else len(sampler.sampler)
    skipped = sum(len(batch) for batch in itertools.islice(iter(sampler), start_batch)) if start_batch else 0
    return total, skipped


def document_progress(loader: DataLoader, desc: str, start_batch: int = 0, **tqdm_kwargs: Any) -> Iterator[Any]:
    """The batches of ``loader`` (made with this ``start_batch``) under a bar counting documents, so
    it shows a total and an ETA even with a token budget (see the module docstring)."""
    total, done = loader_documents(loader, start_batch)
    with tqdm(total=total, initial=done, unit="doc", desc=desc, **tqdm_kwargs) as bar:
        for batch in loader:
            yield batch
            bar.update(batch.n_windows + batch.n_empty)  # one window a document, or an empty text


__all__ = ["LengthGroupedBatchSampler", "SkipBatches", "document_progress", "loader_documents", "make_dataloader",
           "prefetched"]
