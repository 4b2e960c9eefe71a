"""Reading activation runs back: memory-mapped shards, one lazily concatenated view per hook, run listing.

Reading back (:class:`ActivationRun`): the whole run is one lazily concatenating view
(:class:`ShardedRows`) over ``np.memmap`` views of each shard's tensors (the safetensors header
gives the byte offsets; ``safe_open`` would hand out tensors read into memory), so nothing is
copied into RAM until rows are indexed. Rejected: a single preallocated ``.npy`` per hook finalized
at the end, which doubles the disk writes and leaves a partial or multi-rank run unreadable.

What a read checks. Opening a run checks, without reading any data: ``meta.json`` has the keys of
a run, the shards are numbered in order with each file listed once, every shard has its recorded
size, a well-formed safetensors header whose tensors hold the recorded row count in the recorded
storage dtype, and (complete runs) ``row_count`` equals the shards' rows. Before any value is
returned (the first column view, each shard of :meth:`ActivationRun.iter_shards`), every shard it
comes from is SHA-256 hashed once per :class:`ActivationRun`, so a flipped byte is an error, never a
wrong number. That costs one sequential read of the run, paid on the first access: on a 291 MiB run
(4 shards, the shared 2-core dev machine, warm page cache) opening took 0.3 ms, reading every row
1.18 s instead of 0.47 s, the first 4,096 random rows 0.59 s instead of 0.04 s (later reads cost
nothing extra), ``iter_shards`` 0.73 s instead of 0.002 s (safetensors maps the file lazily);
``check_hashes=False`` skips the hashes for a run already verified. :meth:`ActivationRun.verify`
re-does every check, hashes included, and counts the kept rows of NPZ chunks (which opening leaves
alone: it would decompress them). Not checked: that a shard was written by this run (a shard of
another run with the same size, rows and hash recorded would pass; only a rewritten meta.json can
do that). An incomplete run opens with a warning; whole-run statistics refuse it unless asked
(:meth:`ActivationRun.require_complete`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from sae_core.files import (
    read_json,
)
from sae_core.store.shards import (
    ACTIVATIONS_DIR,
    META_FILENAME,
    ST_DTYPES,
    ShardRecord,
    check_shard,
    load_shard,
    safetensors_layout,
)

logger = logging.getLogger(__name__)

def memmap_tensors(path: Path) -> dict[str, tuple[np.memmap, torch.dtype | None]]:
    """Zero-copy ``np.memmap`` views of every tensor of a safetensors shard (bf16 as uint16 + torch dtype)."""
    base, header = safetensors_layout(path)
    views = {}
    for key, info in header.items():
        start, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if end == start:
            views[key] = (np.zeros(shape, dtype=ST_DTYPES[info["dtype"]]), None)
            continue
        mm = np.memmap(path, dtype=ST_DTYPES[info["dtype"]], mode="r", offset=base + start, shape=shape)
        views[key] = (mm, torch.bfloat16 if info["dtype"] == "BF16" else None)
    return views


def _to_torch(array: np.ndarray, view_dtype: torch.dtype | None) -> Tensor:
    tensor = torch.from_numpy(np.array(array))  # copies only the rows asked for
    return tensor.view(view_dtype) if view_dtype is not None else tensor


class ShardedRows:
    """One column of a run (a hook's activations, or token ids), concatenated across shards lazily.

    ``len``, ``shape`` and indexing with an int, a slice or an array of ints; indexing returns a
    torch tensor holding only the rows asked for. Safetensors shards are read through ``np.memmap``
    (the OS pages rows in on demand); NPZ shards are decompressed one at a time (the last one cached).
    """

    def __init__(self, parts: Sequence[Any], lengths: Sequence[int], view_dtype: torch.dtype | None = None) -> None:
        self._parts = list(parts)  # arrays, or zero-argument callables returning one (loaded lazily)
        self._offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
        self._view_dtype = view_dtype
        self._cache: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def _part(self, i: int) -> np.ndarray:
        part = self._parts[i]
        if not callable(part):
            return part
        if self._cache is None or self._cache[0] != i:
            self._cache = (i, part())
        return self._cache[1]

    @property
    def shape(self) -> tuple[int, ...]:
        first = self._part(0) if self._parts else np.zeros((0,))
        return (len(self), *first.shape[1:])

    @property
    def shard_arrays(self) -> list[Any]:
        """The per-shard arrays (memory maps for safetensors; callables for NPZ)."""
        return list(self._parts)

    def __getitem__(self, key: int | slice | Sequence[int] | np.ndarray | Tensor) -> Tensor:
        n = len(self)
        if isinstance(key, (int, np.integer)):
            index = int(key) + n if key < 0 else int(key)
            if not 0 <= index < n:
                raise IndexError(f"row {key} out of range for {n} rows")
            shard = int(np.searchsorted(self._offsets, index, side="right") - 1)
            return _to_torch(self._part(shard)[index - self._offsets[shard]], self._view_dtype)
        if isinstance(key, slice):
            start, stop, step = key.indices(n)
            if step == 1:
                pieces = []
                for shard in range(len(self._parts)):
                    lo, hi = max(start, self._offsets[shard]), min(stop, self._offsets[shard + 1])
                    if lo < hi:
                        base = self._offsets[shard]
                        pieces.append(np.asarray(self._part(shard)[lo - base:hi - base]))
                if not pieces:
                    return _to_torch(np.asarray(self._part(0)[:0]), self._view_dtype) if self._parts else torch.empty(0)
                return _to_torch(np.concatenate(pieces), self._view_dtype)
            key = np.arange(start, stop, step)
        index = np.asarray(key.cpu() if isinstance(key, Tensor) else key, dtype=np.int64).reshape(-1)
        index = np.where(index < 0, index + n, index)
        if index.size and (index.min() < 0 or index.max() >= n):
            raise IndexError(f"row indices out of range for {n} rows")
        shards = np.searchsorted(self._offsets, index, side="right") - 1
        out: np.ndarray | None = None
        for shard in np.unique(shards):
            where = np.nonzero(shards == shard)[0]
            rows = np.asarray(self._part(int(shard))[index[where] - self._offsets[shard]])
            if out is None:
                out = np.empty((len(index), *rows.shape[1:]), dtype=rows.dtype)
            out[where] = rows
        if out is None:
            return self[0:0]
        return _to_torch(out, self._view_dtype)


class RowOrigin(NamedTuple):
    """Where an activation row comes from."""

    document: int
    position: int  # position in the document's tokens (window start + offset in the window)
    token_id: int


class ShardRows(NamedTuple):
    """The rows of one shard, read into memory."""

    record: ShardRecord
    acts: dict[str, Float[Tensor, "rows d"]]
    token_ids: Tensor
    doc_index: Tensor
    position: Tensor


def _npz_rows(path: Path, key: str) -> np.ndarray:
    """Kept rows of one padded NPZ chunk tensor: ``tensor[attention_mask]``, batch-major."""
    with np.load(path) as data:
        mask = data["attention_mask"].astype(bool)
        if key == "doc_index":
            return np.broadcast_to(data["doc_index"][:, None], mask.shape)[mask]
        return data[key][mask]


REQUIRED_META = ("hooks", "tensor_keys", "shard_format", "shards")


class ActivationRun:
    """A run folder written by :func:`save`: metadata, shards, activations and row origins.

    Opening checks every listed shard without reading its data (size, header, rows and dtype
    against the metadata, its index against its name); the first read of values (a column view,
    :meth:`iter_shards`) also checks each shard's SHA-256 once, unless ``check_hashes=False``.
    An interrupted run opens with a warning.
    """

    def __init__(self, path: str | os.PathLike[str], check_hashes: bool = True) -> None:
        self.path = Path(path)
        if not (self.path / META_FILENAME).exists():
            raise FileNotFoundError(f"{self.path} is not an activation run (no {META_FILENAME})")
        meta_path = self.path / META_FILENAME
        self.meta: dict[str, Any] = read_json(meta_path)
        missing = [k for k in REQUIRED_META if not isinstance(self.meta, dict) or k not in self.meta]
        if missing:
            raise ValueError(f"{meta_path} lacks {missing}: it is not the metadata of an activation run, or it "
                             "was damaged; restore it or delete the run and extract again")
        try:
            self.shards = [ShardRecord.from_json(r) for r in self.meta["shards"]]
        except TypeError as err:
            raise ValueError(f"{meta_path} lists a malformed shard ({err}); restore it or delete the run") from None
        _check_records(meta_path, self.shards)
        for record in self.shards:
            check_shard(self.path / record.file, record)
            if self.meta["shard_format"] == "safetensors":
                _check_layout(self.path / record.file, record, self.meta)
        if self.meta.get("complete") and "row_count" in self.meta and self.meta["row_count"] != len(self):
            raise ValueError(f"{meta_path} records row_count={self.meta['row_count']} but its shards hold "
                             f"{len(self)} rows; restore it or delete the run and extract again")
        if not self.meta.get("complete"):
            logger.warning("run %s is incomplete (interrupted?): %d shards so far; resume it with save(..., "
                           "run_id=%r)", self.path, len(self.shards), self.path.name)
        self.check_hashes = check_hashes
        self._hashed: set[str] = set()
        self._columns: dict[str, ShardedRows] = {}

    @property
    def complete(self) -> bool:
        return bool(self.meta.get("complete"))

    def require_complete(self, what: str) -> None:
        """Raise unless the run is complete (statistics over part of a run are refused unless asked for)."""
        if not self.complete:
            raise ValueError(f"{what} over run {self.path} would cover only the {len(self.shards)} shards written "
                             "before it was interrupted; resume the extraction first, or pass "
                             "allow_incomplete=True to use the partial run")

    def _hash_once(self, record: ShardRecord) -> None:
        if self.check_hashes and record.file not in self._hashed:
            check_shard(self.path / record.file, record, full=True)
            self._hashed.add(record.file)

    @classmethod
    def open(cls, store: str | os.PathLike[str], run_id: str, check_hashes: bool = True) -> ActivationRun:
        """The run ``run_id`` of a store folder."""
        path = Path(store) / ACTIVATIONS_DIR / run_id
        if not path.exists():
            known = [r.run_id for r in list_runs(store)]
            raise FileNotFoundError(f"no run {run_id!r} in {Path(store) / ACTIVATIONS_DIR}; runs: {known}")
        return cls(path, check_hashes)

    @property
    def run_id(self) -> str:
        return self.path.name

    @property
    def hooks(self) -> list[str]:
        return list(self.meta["hooks"])

    def __len__(self) -> int:
        return sum(r.rows for r in self.shards)

    def _column(self, key: str) -> ShardedRows:
        if key not in self._columns:
            for record in self.shards:
                self._hash_once(record)
            paths = [self.path / r.file for r in self.shards]
            lengths = [r.rows for r in self.shards]
            if self.meta["shard_format"] == "npz":
                parts = [lambda p=p: _npz_rows(p, key) for p in paths]
                self._columns[key] = ShardedRows(parts, lengths)
            else:
                views = [memmap_tensors(p)[key] for p in paths]
                self._columns[key] = ShardedRows([v[0] for v in views], lengths, views[0][1] if views else None)
        return self._columns[key]

    def activations(self, hook: str | None = None) -> ShardedRows:
        """Every row of ``hook`` (default: the only hook) as one lazily concatenated, memory-mapped view."""
        if hook is None:
            if len(self.hooks) != 1:
                raise ValueError(f"run {self.run_id} holds several hooks; name one of {self.hooks}")
            hook = self.hooks[0]
        if hook not in self.meta["tensor_keys"]:
            raise KeyError(f"run {self.run_id} has no hook {hook!r}; it holds {self.hooks}")
        return self._column(self.meta["tensor_keys"][hook])

    def token_ids(self) -> Tensor:
        """Token id of every row (read into memory: 8 bytes a row)."""
        return self._column("token_ids")[:]

    def doc_index(self) -> Tensor:
        """Document index of every row."""
        return self._column("doc_index")[:]

    def position(self) -> Tensor:
        """Position of every row in its document's tokens."""
        return self._column("position")[:]

    def row_origin(self, row: int) -> RowOrigin:
        """(document, position, token id) of one row."""
        return RowOrigin(int(self._column("doc_index")[row]), int(self._column("position")[row]),
                         int(self._column("token_ids")[row]))

    def iter_shards(self) -> Iterator[ShardRows]:
        """Each shard's rows in order (ranks in order, then shard number)."""
        for record in self.shards:
            path = self.path / record.file
            self._hash_once(record)
            if self.meta["shard_format"] == "npz":
                cols = {k: torch.from_numpy(_npz_rows(path, k))
                        for k in {*self.meta["tensor_keys"].values(), "token_ids", "doc_index", "position"}}
            else:
                cols = load_shard(path)
            acts = {h: cols[k] for h, k in self.meta["tensor_keys"].items()}
            yield ShardRows(record, acts, cols["token_ids"], cols["doc_index"], cols["position"])

    def verify(self) -> None:
        """Check every shard's size, header, rows, dtype and SHA-256; raises naming the first bad file."""
        for record in self.shards:
            check_shard(self.path / record.file, record, full=True)
            if self.meta["shard_format"] == "safetensors":
                _check_layout(self.path / record.file, record, self.meta)
            else:
                kept = int(np.load(self.path / record.file)["attention_mask"].astype(bool).sum())
                if kept != record.rows:
                    raise ValueError(f"shard {self.path / record.file} holds {kept} kept rows but the run metadata "
                                     f"records {record.rows}; restore meta.json or delete the run")
            self._hashed.add(record.file)


def _check_records(meta_path: Path, records: list[ShardRecord]) -> None:
    """Each rank's shards are numbered 0, 1, ... in order, each file listed once."""
    by_rank: dict[int, list[int]] = {}
    for record in records:
        by_rank.setdefault(record.rank, []).append(record.index)
    files = [r.file for r in records]
    if len(set(files)) != len(files) or any(v != list(range(len(v))) for v in by_rank.values()):
        raise ValueError(f"{meta_path} lists shards out of order or twice ({files}); restore it or delete the run")


def _check_layout(path: Path, record: ShardRecord, meta: dict[str, Any]) -> None:
    """Rows, dtype and width of a safetensors shard's tensors against what the run metadata records."""
    _, header = safetensors_layout(path)
    keys = {*meta["tensor_keys"].values(), "token_ids", "doc_index", "position"}
    storage = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}.get(meta.get("storage_dtype", ""))
    for key in sorted(keys):
        info = header.get(key)
        problem = None
        if info is None:
            problem = f"has no tensor {key!r}"
        elif not info["shape"] or info["shape"][0] != record.rows:
            problem = f"holds {info['shape'][:1]} rows of {key!r} but the run metadata records {record.rows}"
        elif key in meta["tensor_keys"].values() and storage is not None and info["dtype"] != storage:
            problem = f"stores {key!r} as {info['dtype']}, the run metadata says {meta['storage_dtype']}"
        if problem:
            raise ValueError(f"shard {path} {problem}; the shard or meta.json is corrupted: restore it, or delete "
                             "the run and extract again")


class RunSummary(NamedTuple):
    """One line of :func:`list_runs`."""

    run_id: str
    path: Path
    complete: bool
    model: str | None
    hooks: list[str]
    row_count: int
    sample_count: int | None
    shard_count: int


def list_runs(store: str | os.PathLike[str]) -> list[RunSummary]:
    """Runs of a store folder, sorted by run id (folders without a readable ``meta.json`` are skipped)."""
    root = Path(store) / ACTIVATIONS_DIR
    runs = []
    for meta_path in sorted(root.glob(f"*/{META_FILENAME}")):
        try:
            meta = read_json(meta_path)
        except ValueError as err:
            logger.warning("skipping %s: %s", meta_path.parent, err)
            continue
        shards = meta.get("shards", [])
        runs.append(RunSummary(meta_path.parent.name, meta_path.parent, bool(meta.get("complete")),
                               (meta.get("model") or {}).get("model_name"), list(meta.get("hooks", [])),
                               sum(s["rows"] for s in shards), meta.get("sample_count"), len(shards)))
    return runs
