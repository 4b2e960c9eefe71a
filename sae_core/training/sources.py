"""Activation streams for SAE training: model forward passes or stored rows, shuffled into batches.

A *source* yields chunks ``{hook: (rows, d)}`` of activations, each with its *position* (how far into the stream it
ends), forever (cycling epochs), starting from any position:

* :class:`ModelActivationSource` runs the model over ``sae_core.data`` windows (batched by token length up to a token
  budget, :class:`TokenBudgetBatchSampler`; padded by ``pad_collate``) and keeps the rows of the recorded
  :class:`~sae_core.activations.TokenPolicy` (``batch_activations``: pad rows never, BOS / EOS / special rows by
  policy), one forward pass for every hook, stopped after the last needed block. Its position counts loader batches;
  epoch ``e`` re-draws the windows of long documents and re-shuffles the document order (both pure functions of
  ``(seed, e)``), so a position pins the data exactly and resuming skips batches without tokenising them. It runs the
  store's forward: compiled (``ForwardConfig.compile``, eager fallback) and on packed rows
  (``LoaderConfig.pack_windows``: each length group packed whole, windows masked apart, so the rows are those of the
  unpacked stream, regrouped); the next window batches are tokenised and collated meanwhile, by DataLoader workers or
  a prefetch thread (:func:`~sae_core.loader.prefetched`), so the forward does not wait for them. Its
  :class:`StepProfile` records where the time goes (``profile.json`` of a run).
* :class:`TensorChunkSource` wraps any re-iterable of ``(rows, d)`` tensors or ``{hook: tensor}`` dicts, e.g. the
  shards of a stored (possibly whitened) activation run: ``TensorChunkSource(lambda: (s.acts for s in
  run.iter_shards()), run.hooks)``. Its position counts chunks; resuming re-opens the iterable and skips the chunks
  already used.

Under data parallelism each rank reads its own share: every ``world``-th document (model) or chunk (stored rows),
offset by its rank.

:class:`BlockShuffler` mixes tokens across windows: it collects ``batches_per_block x batch_rows`` rows, permutes them
with its own seeded generator and serves them as ``batches_per_block`` batches; rows beyond the block wait
(unshuffled) for the next one. Every block serves the same number of batches on every rank, so data-parallel ranks
stay in step. Its whole state (the rows of the current block not yet served, the waiting rows, the generator and the
source position) is saved in a checkpoint, so a resumed run sees exactly the batches an uninterrupted one would; at a
block boundary that is only the waiting rows (less than one forward batch), which is why periodic checkpoints are
taken there. Rejected: SAELens's mixing buffer (serves half the buffer and keeps half, so an exact resume has to store
the whole buffer at any step; and ranks serve different batch counts); a reservoir drawing random rows one batch at a
time (same checkpoint-size issue).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from sae_core.activations import batch_activations, run_to_hooks
from sae_core.checks import StreamDigest
from sae_core.config import LoaderConfig, TokenPolicy
from sae_core.data import (
    PackedIndex,
    PadCollate,
    RowPacker,
    WindowBatch,
    WindowedTextDataset,
    WindowKey,
    pad_id_of,
    run_together,
)
from sae_core.loader import packed_shape, prefetched

logger = logging.getLogger(__name__)

Chunk = dict[str, Tensor]  # hook -> (rows, d) activations, rows aligned across hooks


class ActivationSource(Protocol):
    """Anything that streams activation chunks from a position (see the module docstring)."""

    hooks: list[str]

    def chunks(self, position: int) -> Iterator[tuple[Chunk, int]]:
        """Chunks after ``position``, forever, each with the position just past it."""
        ...


def rank_and_world() -> tuple[int, int]:
    """This process's data-parallel rank and the world size (0, 1 without ``torch.distributed``)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class TokenBudgetBatchSampler(torch.utils.data.Sampler):
    """Batches of windows of equal token length, as many as fit in ``batch_tokens`` tokens.

    Every document's window length (``min(tokens, room)`` plus BOS) is read once, with one batched tokeniser call
    per 1,024 documents, and kept: it does not depend on where the window falls. Each epoch takes the documents in
    a seeded random order, cuts them into groups of ``group_documents``, sorts each group by window length and
    packs it, longest first, into batches of ``batch_tokens // width`` windows, whose order inside the group is
    then shuffled (so a shuffle block mixes long and short windows). The batches are a pure function of
    (documents, seed, epoch). Why: ``sae_core.data.LengthGroupedBatchSampler`` sorts by character count and
    batches a fixed number of windows; on the default corpus (short documents) that spent 23% of the forward pass
    on padding (2% here) and ran many forward passes of a few hundred tokens, which use the CPU's matmuls poorly.
    Cost: each document is tokenised twice (~2 s per 14k). With the dataset's
    ``windows_per_document="proportional"`` the items are each document's windows
    (:class:`~sae_core.data.WindowKey`), permuted, grouped and batched the same way. With ``pack`` each sorted
    group is packed whole into rows as wide as its longest window (:class:`~sae_core.data.RowPacker`, as the
    extraction loader does) and cut into batches of ``batch_tokens // width`` rows; items then come as
    :class:`~sae_core.data.PackedIndex` naming their row in the batch, and padding falls to the last rows of a
    group (<1% on the fortunes). With ``windows_per_document="run_together"`` the permuted documents run together
    into rows of ``max_text_length`` (:func:`~sae_core.data.run_together`), ``batch_tokens // max_text_length`` a
    batch.
    """

    def __init__(self, dataset: WindowedTextDataset, documents: Sequence[int], batch_tokens: int,
                 group_documents: int, pack: bool = False) -> None:
        self.dataset, self.documents = dataset, list(documents)
        self.batch_tokens, self.group, self.pack, self.tokens = batch_tokens, group_documents, pack, {}  # tokens: each document's count
        lengths, windows = self._window_lengths(self.documents)
        self.lengths = dict(zip(self.documents, lengths, strict=True))
        # what an epoch draws: each document once, or (proportional) each of its windows
        self.joined = dataset.windows_per_document == "run_together"
        self.items: list[Any] = (self.documents if dataset.windows_per_document != "proportional" else
                                 [WindowKey(d, j) for d, n in zip(self.documents, windows, strict=True) for j in range(n)])

    def restricted(self, items: Sequence[Any], pack: bool | None = None) -> TokenBudgetBatchSampler:
        """The same sampler drawing only ``items`` (some of :attr:`items`), packed or not."""
        out = copy.copy(self)
        out.items, out.pack = list(items), self.pack if pack is None else pack
        return out

    def _window_lengths(self, documents: list[int]) -> tuple[list[int], list[int]]:
        """(window length, windows an epoch) of each document; its token count goes to :attr:`tokens`."""
        ds, lengths, windows = self.dataset, [], []
        room = ds.max_text_length - int(ds.prepend_bos)
        for start in range(0, len(documents), 1024):
            ids = ds.tokenise(documents[start:start + 1024])
            lengths += [min(len(t), room) + int(ds.prepend_bos and len(t) > 0) for t in ids]
            windows += [ds.windows_of(len(t)) for t in ids]
            self.tokens.update(zip(documents[start:start + 1024], map(len, ids), strict=True))
        return lengths, windows

    def _length(self, item: int | WindowKey) -> int:
        return self.lengths[item.index if isinstance(item, WindowKey) else item]

    def batches(self, epoch: int) -> list[list[Any]]:
        """The batches (lists of document indices or :class:`~sae_core.data.WindowKey`) of epoch ``epoch``."""
        rng = np.random.default_rng((self.dataset.seed, epoch))
        order = [self.items[i] for i in rng.permutation(len(self.items))]
        if self.joined:
            width = self.dataset.max_text_length
            return run_together(order, self.tokens, width, self.dataset.prepend_bos, max(1, self.batch_tokens // width))
        out: list[list[Any]] = []
        for start in range(0, len(order), self.group):
            ranked = sorted(order[start:start + self.group], key=lambda d: (-self._length(d), d))
            group = self._packed(ranked) if self.pack else self._padded(ranked)
            out += [group[i] for i in rng.permutation(len(group))]
        return out

    def _padded(self, ranked: list[Any]) -> list[list[Any]]:
        """Batches of ``batch_tokens // width`` windows each, longest first (one window a row)."""
        group: list[list[Any]] = []
        while ranked:
            count = max(1, self.batch_tokens // max(self._length(ranked[0]), 1))
            group.append(ranked[:count])
            ranked = ranked[count:]
        return group

    def _packed(self, ranked: list[Any]) -> list[list[PackedIndex]]:
        """The whole group packed into rows as wide as its longest window, cut into batches of rows."""
        packer = RowPacker(max(self._length(ranked[0]), 1))
        for position, item in enumerate(ranked):
            packer.add(position, self._length(item))
        per_batch = max(1, self.batch_tokens // packer.width)
        return [[PackedIndex(ranked[i], row) for row, items in enumerate(packer.rows[b:b + per_batch]) for i in items]
                for b in range(0, len(packer.rows), per_batch)]

    def __len__(self) -> int:
        return len(self.batches(self.dataset.epoch))

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches(self.dataset.epoch))


class StepProfile:
    """Wall seconds a training run spends per part: ``forward``, ``data``, ``step`` (and, by
    difference with the run's wall time, ``other``: shuffling, checks, logging, checkpoints).

    ``data`` is the time the forward waits for its next batch (tokenising, window drawing and collation run ahead
    in a thread or DataLoader workers, so it should be ~0), or for the next stored chunk. On a GPU the parts are
    not synchronised, so there they say where the host waits.
    """

    PARTS = ("forward", "data", "step")

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(self.PARTS, 0.0)

    @classmethod
    def of(cls, source: Any) -> StepProfile:
        """The profile ``source`` times its forward / data in (a new one if it has none), zeroed."""
        profile = getattr(source, "profile", None) or cls()
        profile.seconds = dict.fromkeys(cls.PARTS, 0.0)
        return profile

    @contextlib.contextmanager
    def timed(self, part: str) -> Iterator[None]:
        """Add the wall time of the ``with`` body to ``part``."""
        began = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[part] += time.perf_counter() - began

    def summary(self, wall_seconds: float, steps: int) -> dict[str, Any]:
        """Seconds, seconds per step and share of the wall time of each part, ``other`` included."""
        parts = {**self.seconds, "other": max(0.0, wall_seconds - sum(self.seconds.values()))}
        return {"steps": steps, "wall_seconds": wall_seconds, "seconds": parts,
                "seconds_per_step": {k: v / steps if steps else float("nan") for k, v in parts.items()},
                "share": {k: v / wall_seconds if wall_seconds > 0 else float("nan") for k, v in parts.items()}}


class ModelActivationSource:
    """Activations of ``hooks`` from forward passes over windows of ``documents`` (this rank's share).

    ``batch_tokens`` bounds each forward pass (token cells, padding included); ``group_documents`` documents are
    sorted by length together (:class:`TokenBudgetBatchSampler`); ``loader`` gives the DataLoader's workers /
    pinning and ``pack_windows`` (short windows share rows, masked apart: the same activations, almost no
    padding); ``compile`` runs the forward through ``torch.compile`` (``ForwardConfig.compile``; eager fallback),
    as extraction does. Window batches are made ahead of the forward: by ``num_dataloader_workers`` worker
    processes, or, with none, by a prefetch thread (:func:`prefetched`). :attr:`profile` times the forward and the
    waits for data.
    """

    def __init__(self, model: HookedTransformer, dataset: WindowedTextDataset, hooks: Sequence[str],
                 policy: TokenPolicy, forward_dtype: str | torch.dtype, documents: Sequence[int] | None = None,
                 batch_tokens: int = 4096, group_documents: int = 8192, loader: LoaderConfig | None = None,
                 compile: bool = False) -> None:
        rank, world = rank_and_world()
        documents = range(len(dataset)) if documents is None else documents
        share = list(documents)[rank::world]
        if not share:
            raise ValueError(f"rank {rank} of {world} has no training documents; give at least {world} documents")
        self.model, self.dataset, self.hooks = model, dataset, list(hooks)
        self.loader_config, self.policy, self.forward_dtype = loader or LoaderConfig(), policy, forward_dtype
        self.compile, self.profile = compile, StepProfile()
        self.sampler = TokenBudgetBatchSampler(dataset, share, batch_tokens, group_documents,
                                               self.loader_config.pack_windows)
        # packed or run-together batches fill (rows, width): the compiled forward's static-shape graph runs them
        self.static_shape = packed_shape(batch_tokens, dataset.max_text_length,
                                         self.loader_config.pack_windows or self.sampler.joined)

    def loader(self, start_batch: int = 0, epoch: int | None = None) -> DataLoader:
        """Epoch ``epoch``'s (default: the dataset's) padded or packed window batches, without the first
        ``start_batch``. It reads a copy of the dataset set to that epoch, so a prefetch thread running
        ahead into the next epoch never changes the windows anyone else draws from ``self.dataset``."""
        cfg = self.loader_config
        dataset = copy.copy(self.dataset)
        dataset.set_epoch(self.dataset.epoch if epoch is None else epoch)
        return DataLoader(dataset, batch_sampler=self.sampler.batches(dataset.epoch)[start_batch:],
                          collate_fn=PadCollate(pad_id_of(self.dataset.tokenizer), cfg.pack_windows),
                          num_workers=cfg.num_dataloader_workers, pin_memory=cfg.pin_memory,
                          persistent_workers=cfg.persistent_workers, **cfg.extra)

    def _locate(self, position: int) -> tuple[int, int]:
        """(epoch, batch within it) of the ``position``-th batch of the stream."""
        epoch = 0
        while position >= (count := len(self.sampler.batches(epoch))):
            position -= count
            epoch += 1
        return epoch, position

    def _window_batches(self, epoch: int, start: int) -> Iterator[tuple[int, WindowBatch]]:
        """``(epoch, batch)`` for every loader batch from batch ``start`` of ``epoch`` on, forever."""
        while True:
            for batch in self.loader(start, epoch):
                yield epoch, batch
            epoch, start = epoch + 1, 0

    def chunks(self, position: int) -> Iterator[tuple[Chunk, int]]:
        epoch, start = self._locate(position)
        stream = self._window_batches(epoch, start)
        if self.loader_config.num_dataloader_workers == 0:
            stream = prefetched(stream)
        rows, whole = 0, start == 0  # rows of the current epoch; whether it is read from its start
        while True:
            with self.profile.timed("data"):
                batch_epoch, batch = next(stream)
            if batch_epoch != epoch:
                self._check_rows(rows, whole)
                epoch, rows, whole = batch_epoch, 0, True
            position += 1
            if batch.input_ids.numel() == 0:
                continue
            with self.profile.timed("forward"):
                acts = batch_activations(self.model, batch, self.hooks, self.policy, self.forward_dtype,
                                         batch_number=position - 1, compile=self.compile,
                                         static_shape=self.static_shape)
            rows += len(acts.token_ids)
            yield acts.acts, position

    def _check_rows(self, rows: int, whole: bool) -> None:
        if rows == 0 and whole:  # a whole epoch without a row: every later one is the same
            raise ValueError(
                f"a whole epoch over {len(self.sampler.documents)} training documents gave no activation rows: "
                f"every window is empty or holds only tokens the token policy drops ({self.policy}); give texts "
                "with ordinary tokens, or keep special-token rows (exclude_special_tokens=False)")


class TensorChunkSource:
    """Rows from a re-iterable of tensors / ``{hook: tensor}`` dicts (``open()`` starts it over)."""

    def __init__(self, open_chunks: Callable[[], Iterable[Tensor | Chunk]], hooks: Sequence[str]) -> None:
        if not hooks:
            raise ValueError("name the hook point(s) the rows come from (hooks=[...])")
        self.open, self.hooks, self.profile = open_chunks, list(hooks), StepProfile()
        self.expected_digest: dict[str, Any] | None = None  # what a checkpoint recorded of the stream
        self.digest_state: dict[str, Any] | None = None  # the stream up to the last chunk yielded

    def _as_chunk(self, item: Tensor | Chunk, number: int) -> Chunk:
        if isinstance(item, Tensor):
            if len(self.hooks) != 1:
                raise ValueError(f"chunk {number} is a bare tensor but {len(self.hooks)} hooks were named; "
                                 "yield {hook: tensor} dicts")
            item = {self.hooks[0]: item}
        missing = [h for h in self.hooks if h not in item]
        if missing:
            raise KeyError(f"chunk {number} has no rows for {missing}; it holds {sorted(item)}")
        for hook in self.hooks:
            if item[hook].ndim != 2:
                raise ValueError(f"chunk {number} of {hook} has shape {tuple(item[hook].shape)}; give (rows, d)")
        return {h: item[h] for h in self.hooks}

    def chunks(self, position: int) -> Iterator[tuple[Chunk, int]]:
        """Chunks after ``position``; every chunk read (skipped ones too) goes into a running digest,
        checked against :attr:`expected_digest` (set by a resumed run) once the stream passes it."""
        rank, world = rank_and_world()
        index = 0  # chunk number in the whole stream, across epochs
        digest = StreamDigest()
        while True:
            start, rows, items = index, 0, iter(self.open())
            while True:
                with self.profile.timed("data"):
                    item = next(items, None)
                if item is None:
                    break
                chunk = self._as_chunk(item, index)
                digest.update(*chunk.values())
                index += 1
                digest.check(self.expected_digest, "cannot resume training",
                             "resume on the same activation rows in the same order, or delete the checkpoint "
                             "folder (or pass resume=False) to start over")
                if (index - 1) % world == rank:
                    rows += _rows(chunk)
                    if index > position:
                        self.digest_state = digest.state()
                        yield chunk, index
            if index == start:
                raise ValueError("the activation source yielded no chunks; check the run / iterable")
            if rows == 0:
                raise ValueError(f"a whole pass over the activation source ({index - start} chunks) gave rank {rank} "
                                 "no rows (every chunk has 0 rows); check the run / iterable")


def _rows(chunk: Chunk) -> int:
    return next(iter(chunk.values())).shape[0]


def _cat(chunks: list[Chunk]) -> Chunk:
    return {hook: torch.cat([c[hook] for c in chunks]) for hook in chunks[0]}


class BlockShuffler:
    """Fixed-size batches from a source: blocks of ``batches_per_block`` batches, permuted inside.

    With ``passes`` > 1 a block holds each of its source rows ``passes`` times (the copies spread by
    the block's permutation), so the source gives ``1 / passes`` of the rows served. Filling a block
    of more than one batch shows its own bar (``progress``): the first training step waits for it.
    """

    def __init__(self, batch_rows: int, batches_per_block: int, shuffle: bool, seed: int, passes: int = 1,
                 progress: bool = True) -> None:
        if batch_rows <= 0 or batches_per_block <= 0 or passes <= 0:
            raise ValueError(f"batch_rows ({batch_rows}), batches_per_block ({batches_per_block}) and passes "
                             f"({passes}) must be positive")
        self.batch_rows, self.batches_per_block, self.shuffle, self.passes = batch_rows, batches_per_block, shuffle, passes
        self.progress = progress
        self.generator = torch.Generator().manual_seed(seed)
        self.position = 0  # source position after the last chunk taken in
        self.block: Chunk = {}  # permuted rows of the current block not yet served
        self.waiting: Chunk = {}  # rows taken in, not yet in a block

    def at_block_boundary(self) -> bool:
        """True when the current block is used up (checkpoints are small here)."""
        return not self.block or _rows(self.block) == 0

    def _next_block(self, stream: Iterator[tuple[Chunk, int]], batches: int) -> None:
        serve = self.batch_rows * batches
        need = -(-serve // self.passes)  # source rows of this block
        parts = [self.waiting] if self.waiting else []
        have = _rows(self.waiting) if self.waiting else 0
        with tqdm(total=need, initial=min(have, need), unit="row", unit_scale=True, desc="fill shuffle buffer",
                  leave=False, disable=not self.progress or need <= self.batch_rows) as bar:
            while have < need:
                chunk, self.position = next(stream)
                parts.append(chunk)
                bar.update(min(_rows(chunk), need - have))
                have += _rows(chunk)
        rows = _cat(parts)
        copies = torch.arange(need).repeat(self.passes)
        order = copies[torch.randperm(copies.numel(), generator=self.generator)] if self.shuffle else copies
        self.block = {hook: t[:need][order[:serve]] for hook, t in rows.items()}
        self.waiting = {hook: t[need:].clone() for hook, t in rows.items()}

    def batches(self, source: ActivationSource, count: int) -> Iterator[Chunk]:
        """The next ``count`` batches of exactly ``batch_rows`` rows, continuing from the current state.

        A block never reaches past the last batch asked for, so no rows are computed in vain.
        """
        stream = source.chunks(self.position)
        for served in range(count):
            if self.at_block_boundary():
                self._next_block(stream, min(self.batches_per_block, count - served))
            batch = {hook: t[: self.batch_rows] for hook, t in self.block.items()}
            self.block = {hook: t[self.batch_rows:] for hook, t in self.block.items()}
            yield batch

    def state_tensors(self) -> dict[str, Tensor]:
        """Everything needed to continue exactly (rows are copied out of their views)."""
        state = {"generator": self.generator.get_state(), "position": torch.tensor(self.position)}
        for name, part in (("block", self.block), ("waiting", self.waiting)):
            state.update({f"{name}.{hook}": t.contiguous() for hook, t in part.items()})
        return state

    def load_state_tensors(self, state: dict[str, Tensor]) -> None:
        """Restore :meth:`state_tensors`."""
        self.generator.set_state(state["generator"])
        self.position = int(state["position"])
        self.block = {k.removeprefix("block."): v for k, v in state.items() if k.startswith("block.")}
        self.waiting = {k.removeprefix("waiting."): v for k, v in state.items() if k.startswith("waiting.")}


def hook_widths(model: HookedTransformer, hooks: Sequence[str]) -> dict[str, int]:
    """Activation width of each hook point, from a two-token forward pass."""
    acts = run_to_hooks(model, hooks, torch.zeros((1, 2), dtype=torch.long))
    for hook, act in acts.items():
        if act.ndim != 3:
            raise NotImplementedError(f"{hook} has per-head activations {tuple(act.shape)}; train on a hook of "
                                      "shape (batch, pos, d) such as hook_resid_post or hook_attn_out")
    return {hook: int(act.shape[-1]) for hook, act in acts.items()}

