"""The activation store: numbered shards in a run folder, written atomically and resumable.

Layout: ``<store>/activations/<run_id>/`` holds ``meta.json`` and shards ``shard-00000.safetensors``,
``shard-00001.safetensors`` ... (``shard-r<rank>-00000...`` under data parallelism, one
``meta.rank<r>.json`` progress file per rank, merged into ``meta.json`` by rank 0).

Write protocol (:class:`ShardWriter`): a shard is written to a temporary file beside its final name,
fsync-ed, renamed into place, hashed, and only then appended to the shard list in the progress file
(itself replaced atomically). A crash at any point leaves either a complete, listed shard or an
unlisted file (a stale temp file, or a renamed shard whose listing never happened) that the next
start with the same run id deletes before rewriting it. On restart the listed shards are verified
(size, safetensors header, SHA-256) and a bad one raises naming the file. Resume relies on a
deterministic batch order (a pure function of the seed): each shard records the number of batches
consumed when it was flushed (shards end on batch boundaries: a shard is flushed once it holds
``>= shard_size`` rows), so resuming skips exactly those batches.

Formats: safetensors (default; one tensor per hook point, named by it, plus ``token_ids``,
``doc_index`` and ``position`` per row) or compressed NPZ chunks (``activations`` — or
``activations.<hook>`` with several hooks — ``attention_mask``, ``token_ids``, ``doc_index``,
``position``, padded ``(batch, pos, ...)``; there ``attention_mask`` marks the cells that hold a
kept row, so pad and excluded special tokens are 0). Whitening's two-pass extraction writes its
chunks with the same :class:`ShardWriter`. Every hook of a run lives in the same shard file: rows
align across hooks by construction and one rename commits all hooks at once, so no resume can see
hook A's shard without hook B's; reading one hook costs nothing extra (both formats read tensors
individually). ``position`` is the index in the document's tokens (tokenised without special
tokens), -1 for a prepended BOS.

Reading back (:class:`ActivationRun`): the whole run is one lazily concatenating view
(:class:`ShardedRows`) over ``np.memmap`` views of each shard's tensors (the safetensors header
gives the byte offsets; ``safe_open`` would hand out tensors read into memory), so nothing is
copied into RAM until rows are indexed. Rejected: a single preallocated ``.npy`` per hook finalized
at the end, which doubles the disk writes and leaves a partial or multi-rank run unreadable.

Extraction (:func:`save`) runs the windowed loader, :func:`~sae_core.activations.batch_activations`
and the writer in one loop. Data parallel under ``torchrun``: rank ``r`` takes documents
``r::world_size``, writes ``shard-r<r>-*`` and ``meta.rank<r>.json``; after a barrier rank 0 merges
them into ``meta.json``. Hand-written rather than SAELens's ``CacheActivationsRunner`` because that
writes one HF arrow dataset per hook, packs documents together into contexts, and cannot resume.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import itertools
import json
import logging
import os
import shutil
import struct
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from sae_core._io import (
    _json_default,
    atomic_path,
    atomic_write_json,
    cache_dir,
    ensure_writable_dir,
    read_json,
)
from sae_core.activations import ActivationBatch, TokenPolicy, batch_activations, select_positions
from sae_core.data import (
    IterableWindowedTextDataset,
    LoaderConfig,
    TextSourceConfig,
    WindowBatch,
    WindowedTextDataset,
    limit_texts,
    load_texts,
    make_dataloader,
    pad_id_of,
)
from sae_core.hooks import resolve_hook
from sae_core.model_loading import model_summary, resolve_dtype

logger = logging.getLogger(__name__)

META_FILENAME = "meta.json"
ACTIVATIONS_DIR = "activations"
SHARD_FORMATS = {"safetensors": ".safetensors", "npz": ".npz"}
FORMAT_VERSION = 1
# safetensors dtype tags -> numpy dtypes for memory mapping (bf16 is mapped as uint16, viewed by torch).
_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I64": np.int64,
              "I32": np.int32, "I16": np.int16, "U8": np.uint8, "I8": np.int8, "BOOL": np.bool_}


@dataclass(frozen=True)
class ShardRecord:
    """One completed shard, as listed in the progress file."""

    index: int
    """Shard number within its rank (0, 1, ...)."""
    file: str
    """File name inside the run folder."""
    rank: int
    """Data-parallel rank that wrote it (0 when single-process)."""
    rows: int
    """Rows it holds (activation rows; for padded chunks, kept token positions)."""
    batches_end: int
    """Batches consumed by this rank when the shard was flushed (resume skips these)."""
    nbytes: int
    """File size, checked on every read."""
    sha256: str
    """Content hash, checked on resume and by ``verify``."""
    counts: dict[str, int] = field(default_factory=dict)
    """Additive counters covered by this shard (samples, tokens, ...)."""

    @classmethod
    def from_json(cls, record: Mapping[str, Any]) -> ShardRecord:
        return cls(**record)


def _digest(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _pieces(value: Any) -> list[Tensor]:
    """A tensor, an array, or a list of them (consecutive row blocks of one tensor) as a list of tensors."""
    items = value if isinstance(value, (list, tuple)) else [value]
    return [v if isinstance(v, Tensor) else torch.from_numpy(np.ascontiguousarray(v)) for v in items]


_ST_TAGS = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
            torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
            torch.bool: "BOOL"}


def _write_safetensors(tensors: Mapping[str, list[Tensor]], path: Path) -> str:
    """Write a safetensors file from row blocks, hashing as it goes; returns the SHA-256.

    The format (8-byte header length, JSON header of dtype / shape / byte offsets, raw
    little-endian data) is written directly: ``safetensors.torch.save_file`` needs each tensor
    whole (one ``torch.cat`` copy per shard) and copies it again into one buffer, which cost about
    as much as the hashing and fsync together. Files read back with ``safetensors`` itself.
    """
    header: dict[str, Any] = {}
    offset = 0
    for name, blocks in tensors.items():
        first = blocks[0]
        if first.dtype not in _ST_TAGS or any(b.dtype != first.dtype or b.shape[1:] != first.shape[1:] for b in blocks):
            raise ValueError(f"tensor {name!r}: blocks must share one supported dtype and row shape")
        nbytes = sum(b.numel() * b.element_size() for b in blocks)
        shape = [sum(int(b.shape[0]) for b in blocks), *first.shape[1:]] if first.dim() else []
        header[name] = {"dtype": _ST_TAGS[first.dtype], "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
    digest = hashlib.sha256()
    with open(path, "wb") as fh:
        for chunk in (struct.pack("<Q", len(raw)), raw):
            fh.write(chunk)
            digest.update(chunk)
        for blocks in tensors.values():
            for block in blocks:
                data = memoryview(block.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
                fh.write(data)
                digest.update(data)
    return digest.hexdigest()


def _write_npz(tensors: Mapping[str, list[Tensor]], path: Path) -> str:
    """Write a compressed NPZ (blocks concatenated); returns the file's SHA-256."""
    if any(t.dtype == torch.bfloat16 for blocks in tensors.values() for t in blocks):
        raise ValueError("NPZ shards cannot hold bfloat16 (numpy has no such dtype); "
                         "use storage dtype float16/float32 or the safetensors format")
    with open(path, "wb") as fh:  # a file object: np.savez would otherwise append ".npz" to the name
        np.savez_compressed(fh, **{k: torch.cat(v).numpy() for k, v in tensors.items()})
    return _digest(path)


_WRITERS = {"safetensors": _write_safetensors, "npz": _write_npz}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _safetensors_layout(path: Path) -> tuple[int, dict[str, Any]]:
    """(data offset, header) of a safetensors file; raises naming the file if it is truncated."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > size:
                raise ValueError("header length beyond the end of the file")
            header = json.loads(fh.read(n))
        header.pop("__metadata__", None)
        end = max((info["data_offsets"][1] for info in header.values()), default=0)
    except (struct.error, ValueError, KeyError, UnicodeDecodeError) as err:
        raise ValueError(f"shard {path} is corrupted ({err}); delete the run or restore the file") from None
    if 8 + n + end != size:
        raise ValueError(f"shard {path} is truncated or corrupted: {size} bytes, header expects {8 + n + end}; "
                         "delete the run or restore the file")
    return 8 + n, header


def check_shard(path: Path, record: ShardRecord | None = None, full: bool = False) -> None:
    """Raise naming ``path`` if the shard is missing, truncated, of the wrong size or (``full``) hash."""
    if not path.exists():
        raise FileNotFoundError(f"shard {path} is listed in the run metadata but missing")
    if record is not None and path.stat().st_size != record.nbytes:
        raise ValueError(f"shard {path} is truncated or corrupted: {path.stat().st_size} bytes, "
                         f"{record.nbytes} recorded; delete the run or restore the file")
    if path.suffix == ".safetensors":
        _safetensors_layout(path)
    if full and record is not None and _digest(path) != record.sha256:
        raise ValueError(f"shard {path} is corrupted: its SHA-256 differs from the one recorded when it was written")


def load_shard(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Every tensor of one shard (safetensors or NPZ), read into memory."""
    path = Path(path)
    check_shard(path)
    try:
        if path.suffix == ".npz":
            with np.load(path) as data:
                return {k: torch.from_numpy(data[k]) for k in data.files}
        from safetensors.torch import load_file

        return load_file(str(path))
    except (OSError, ValueError, EOFError) as err:
        raise ValueError(f"shard {path} cannot be read ({err}); delete the run or restore the file") from None


_LOCAL_WRITERS: dict[str, ShardWriter] = {}  # lock file -> the writer of this process holding it


class ShardWriter:
    """Numbered shards in one run folder, written atomically; resumes from the last complete one.

    ``identity`` is what must not change across a resume (model, hooks, seed, batch size, ...):
    a restart whose identity differs raises naming the differing keys. ``header`` is descriptive
    metadata stored alongside. Single-process runs keep their progress in ``meta.json``; rank
    ``r`` of a data-parallel run in ``meta.rank<r>.json``.
    """

    def __init__(self, run_dir: str | os.PathLike[str], identity: Mapping[str, Any],
                 header: Mapping[str, Any] | None = None, shard_format: str = "safetensors",
                 rank: int = 0, world_size: int = 1, float_dtype: str | torch.dtype | None = None,
                 verify_hashes: bool = True) -> None:
        if shard_format not in SHARD_FORMATS:
            raise ValueError(f"unknown shard format {shard_format!r}; use one of {sorted(SHARD_FORMATS)}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.run_dir = ensure_writable_dir(run_dir)
        self.shard_format, self.rank, self.world_size = shard_format, rank, world_size
        self.float_dtype = None if float_dtype is None else resolve_dtype(float_dtype)
        self.prefix = "shard-" if world_size == 1 else f"shard-r{rank}-"
        self.progress_path = self.run_dir / (META_FILENAME if world_size == 1 else f"meta.rank{rank}.json")
        self.identity = json.loads(json.dumps({**identity, "shard_format": shard_format, "world_size": world_size},
                                              default=_json_default))
        self._lock_path = self.run_dir / f".writer-r{rank}.lock"
        self._take_lock()
        self.resumed = self.progress_path.exists()
        self._shards: list[ShardRecord] = []
        self._progress: dict[str, Any] = {}
        if self.resumed:
            self._resume(verify_hashes)
        for key, value in (header or {}).items():  # a resume keeps the original description (created, ...)
            self._progress.setdefault(key, value)
        self._progress.update({"format_version": FORMAT_VERSION, "run_id": self.run_dir.name,
                               "identity": self.identity, "shard_format": shard_format, "rank": rank,
                               "world_size": world_size, "complete": self._progress.get("complete", False)})
        self._remove_leftovers()
        self._save()

    def _take_lock(self) -> None:
        """Hold an exclusive ``flock`` on the run for this writer's lifetime.

        Another process on the same run (a restart while the first still runs) gets a clear error.
        In this process, a newer writer takes over from an older one (left alive by an exception,
        e.g. referenced by its traceback); the older one then refuses to write.
        """
        key = str(self._lock_path.resolve())
        previous = _LOCAL_WRITERS.get(key)
        if previous is not None and previous is not self:
            previous.close()
            previous._superseded = True
        self._superseded = False
        self._lock = open(self._lock_path, "w")  # noqa: SIM115 - held for the writer's lifetime
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise RuntimeError(f"run {self.run_dir.name} (rank {self.rank}) is being written by another "
                               "process; wait for it or stop it before resuming") from None
        _LOCAL_WRITERS[key] = self

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _resume(self, verify_hashes: bool) -> None:
        progress = read_json(self.progress_path)
        old = progress.get("identity", {})
        differ = sorted(k for k in set(old) | set(self.identity) if old.get(k) != self.identity.get(k))
        if differ:
            details = "; ".join(f"{k}: run has {old.get(k)!r}, now {self.identity.get(k)!r}" for k in differ)
            raise ValueError(f"cannot resume run {self.run_dir.name} with different settings ({details}); "
                             "use the original settings or a new run_id")
        self._shards = [ShardRecord.from_json(r) for r in progress.get("shards", [])]
        for record in self._shards:
            check_shard(self.run_dir / record.file, record, full=verify_hashes)
        self._progress = progress
        logger.info("resuming run %s from %d complete shards (%d batches)", self.run_dir.name,
                    len(self._shards), self.batches_done)

    def _remove_leftovers(self) -> None:
        """Delete this rank's temp files and shard files not in the shard list (a write cut short)."""
        listed = {r.file for r in self._shards}
        ext = SHARD_FORMATS[self.shard_format]
        leftovers = [p for p in self.run_dir.glob(f".{self.prefix}*.tmp")]
        leftovers += [p for p in self.run_dir.glob(f"{self.prefix}[0-9]*{ext}") if p.name not in listed]
        for path in leftovers:
            logger.warning("removing %s, left over by an interrupted write", path)
            path.unlink(missing_ok=True)

    def _save(self) -> None:
        self._progress["shards"] = [asdict(r) for r in self._shards]
        if not self._progress.get("complete"):
            self._progress["batch_count"] = self.batches_done
        atomic_write_json(self.progress_path, self._progress)

    @property
    def shards(self) -> list[ShardRecord]:
        """Completed shards, in order."""
        return list(self._shards)

    @property
    def batches_done(self) -> int:
        """Batches covered by the completed shards: a resumed run starts at this batch."""
        return self._shards[-1].batches_end if self._shards else 0

    @property
    def complete(self) -> bool:
        """True once :meth:`finish` has been called (possibly by an earlier process)."""
        return bool(self._progress.get("complete"))

    @property
    def progress(self) -> dict[str, Any]:
        """A copy of the progress file's content."""
        return json.loads(json.dumps(self._progress, default=_json_default))

    def totals(self) -> dict[str, int]:
        """Rows and every counter summed over the completed shards."""
        totals = {"rows": sum(r.rows for r in self._shards)}
        for record in self._shards:
            for key, value in record.counts.items():
                totals[key] = totals.get(key, 0) + value
        return totals

    def write(self, tensors: Mapping[str, Tensor | np.ndarray | Sequence[Tensor | np.ndarray]], batches_end: int,
              counts: Mapping[str, int] | None = None, rows: int | None = None) -> ShardRecord:
        """Write the next shard atomically, then list it; returns its record.

        Each value is a tensor / array, or a list of row blocks of one tensor (written one after
        the other, never concatenated in memory for safetensors). ``batches_end``: batches consumed
        so far (what a resume skips). ``rows`` defaults to the first tensor's length.
        """
        if batches_end < self.batches_done:
            raise ValueError(f"batches_end {batches_end} is before the last shard's {self.batches_done}")
        if self.complete:
            raise RuntimeError(f"run {self.run_dir.name} is already complete; start a new run_id")
        if self._superseded or self._lock.closed:
            raise RuntimeError(f"this writer of run {self.run_dir.name} was closed or replaced by a newer one")
        data = {k: _pieces(v) for k, v in tensors.items()}
        if self.float_dtype is not None:
            data = {k: [b.to(self.float_dtype) if b.is_floating_point() else b for b in v] for k, v in data.items()}
        index = len(self._shards)
        path = self.run_dir / f"{self.prefix}{index:05d}{SHARD_FORMATS[self.shard_format]}"
        with atomic_path(path) as tmp:
            digest = _WRITERS[self.shard_format](data, tmp)
        _fsync_dir(self.run_dir)
        n_rows = rows if rows is not None else (sum(len(b) for b in next(iter(data.values()))) if data else 0)
        record = ShardRecord(index, path.name, self.rank, int(n_rows), int(batches_end),
                             path.stat().st_size, digest, {k: int(v) for k, v in (counts or {}).items()})
        self._shards.append(record)
        self._save()
        return record

    def update(self, **fields: Any) -> None:
        """Store descriptive fields in the progress file (not the identity)."""
        self._progress.update(fields)
        self._save()

    def finish(self, **fields: Any) -> dict[str, Any]:
        """Mark the run (this rank's part) complete, storing ``fields``; returns the progress content."""
        if self._superseded:
            raise RuntimeError(f"this writer of run {self.run_dir.name} was replaced by a newer one")
        self._progress.update(fields)
        self._progress["complete"] = True
        self._save()
        self.close()
        return self.progress

    def close(self) -> None:
        """Release the run's write lock (done by :meth:`finish` and on leaving a ``with`` block)."""
        if not self._lock.closed:
            if self.complete and not self._superseded:
                self._lock_path.unlink(missing_ok=True)
            self._lock.close()
            key = str(self._lock_path.resolve())
            if _LOCAL_WRITERS.get(key) is self:
                del _LOCAL_WRITERS[key]


# --------------------------------------------------------------------------- reading


def _memmap_tensors(path: Path) -> dict[str, tuple[np.memmap, torch.dtype | None]]:
    """Zero-copy ``np.memmap`` views of every tensor of a safetensors shard (bf16 as uint16 + torch dtype)."""
    base, header = _safetensors_layout(path)
    views = {}
    for key, info in header.items():
        start, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if end == start:
            views[key] = (np.zeros(shape, dtype=_ST_DTYPES[info["dtype"]]), None)
            continue
        mm = np.memmap(path, dtype=_ST_DTYPES[info["dtype"]], mode="r", offset=base + start, shape=shape)
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


class ActivationRun:
    """A run folder written by :func:`save`: metadata, shards, activations and row origins."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not (self.path / META_FILENAME).exists():
            raise FileNotFoundError(f"{self.path} is not an activation run (no {META_FILENAME})")
        self.meta: dict[str, Any] = read_json(self.path / META_FILENAME)
        self.shards = [ShardRecord.from_json(r) for r in self.meta.get("shards", [])]
        for record in self.shards:
            check_shard(self.path / record.file, record)
        self._columns: dict[str, ShardedRows] = {}

    @classmethod
    def open(cls, store: str | os.PathLike[str], run_id: str) -> ActivationRun:
        """The run ``run_id`` of a store folder."""
        path = Path(store) / ACTIVATIONS_DIR / run_id
        if not path.exists():
            known = [r.run_id for r in list_runs(store)]
            raise FileNotFoundError(f"no run {run_id!r} in {Path(store) / ACTIVATIONS_DIR}; runs: {known}")
        return cls(path)

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
            paths = [self.path / r.file for r in self.shards]
            lengths = [r.rows for r in self.shards]
            if self.meta["shard_format"] == "npz":
                parts = [lambda p=p: _npz_rows(p, key) for p in paths]
                self._columns[key] = ShardedRows(parts, lengths)
            else:
                views = [_memmap_tensors(p)[key] for p in paths]
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
            if self.meta["shard_format"] == "npz":
                cols = {k: torch.from_numpy(_npz_rows(path, k))
                        for k in {*self.meta["tensor_keys"].values(), "token_ids", "doc_index", "position"}}
            else:
                cols = load_shard(path)
            acts = {h: cols[k] for h, k in self.meta["tensor_keys"].items()}
            yield ShardRows(record, acts, cols["token_ids"], cols["doc_index"], cols["position"])

    def verify(self) -> None:
        """Check every shard's size, header and SHA-256; raises naming the first bad file."""
        for record in self.shards:
            check_shard(self.path / record.file, record, full=True)


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


# --------------------------------------------------------------------------- extraction


@dataclass(frozen=True)
class StoreConfig:
    """How activations are collected and stored. Field values are a constant file's ``EXTRACTION`` section."""

    max_text_length: int = 128
    """Tokens per random window of a long document."""
    batch_size: int = 32
    """Windows per forward pass."""
    batch_tokens: int | None = None
    """Fill each forward pass up to this many padded token cells instead (e.g. 32 * 128): short
    documents then share a pass with many others, which costs less per token."""
    shard_size: int = 65536
    """Rows per shard: a shard is flushed at the first batch boundary where it holds at least this many."""
    forward_dtype: str = "float32"
    """Precision of the forward pass: float32, or bfloat16 / float16 under autocast."""
    storage_dtype: str = "float32"
    """Dtype of the stored activations (float32, float16, bfloat16)."""
    exclude_special_tokens: bool = True
    """Drop BOS / EOS / special-token rows (pad rows are always dropped). ``policy`` overrides it."""
    policy: TokenPolicy | None = None
    """A full token policy (default: from ``exclude_special_tokens``)."""
    sample_limit: int | None = None
    """Collect at most this many documents (None: all)."""
    random_sample: bool = False
    """Draw ``sample_limit`` documents at random (seeded) instead of the first ones."""
    seed: int = 0
    """Seed of windows, sampling and batch order."""
    prepend_bos: bool = False
    """Put BOS at position 0 of every window (recorded in the metadata)."""
    positions: str | tuple[int, ...] = "all"
    """Rows kept per window: ``"all"``, ``"last"`` (last kept token) or a tuple of window positions."""
    shard_format: str = "safetensors"
    """``safetensors`` (flat rows, memory-mappable) or ``npz`` (compressed padded chunks)."""
    group_by_length: bool = True
    """Batch documents of similar length together (less padding)."""
    num_dataloader_workers: int = 0
    """Tokenising worker processes (0: in the main process)."""
    pin_memory: bool = False
    """Pin batches in page-locked memory."""
    persistent_workers: bool = False
    """Keep workers alive between epochs."""
    text_field: str = "text"
    """Column holding the text in HF datasets."""

    def __post_init__(self) -> None:
        if self.batch_size <= 0 or self.shard_size <= 0:
            raise ValueError(f"batch_size and shard_size must be positive, got {self.batch_size} and {self.shard_size}")
        if self.shard_format not in SHARD_FORMATS:
            raise ValueError(f"unknown shard_format {self.shard_format!r}; use one of {sorted(SHARD_FORMATS)}")
        if self.storage_dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"storage_dtype must be float32, float16 or bfloat16, got {self.storage_dtype!r}")
        if self.forward_dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"forward_dtype must be float32, float16 or bfloat16, got {self.forward_dtype!r}")
        if self.shard_format == "npz" and self.storage_dtype == "bfloat16":
            raise ValueError("NPZ shards cannot hold bfloat16; use storage_dtype float16 or the safetensors format")
        if self.sample_limit is not None and self.sample_limit <= 0:
            raise ValueError(f"sample_limit must be positive or None, got {self.sample_limit}")
        if isinstance(self.positions, str):
            if self.positions not in ("all", "last"):
                raise ValueError(f"positions must be 'all', 'last' or a tuple of ints, got {self.positions!r}")
        else:
            object.__setattr__(self, "positions", tuple(int(p) for p in self.positions))
        self.loader()

    def token_policy(self) -> TokenPolicy:
        """The rows this run drops: ``policy``, else BOS / EOS / special tokens per ``exclude_special_tokens``."""
        if self.policy is not None:
            return self.policy
        flag = self.exclude_special_tokens
        return TokenPolicy(exclude_bos=flag, exclude_eos=flag, exclude_special=flag)

    def loader(self) -> LoaderConfig:
        """The DataLoader knobs of this config."""
        return LoaderConfig(self.batch_size, self.num_dataloader_workers, self.pin_memory, self.persistent_workers,
                            group_by_length=self.group_by_length, max_batch_tokens=self.batch_tokens)


def resolve_hooks(model: HookedTransformer, layer_signature: str | int | Sequence[str | int]) -> list[str]:
    """Hook names from a name, a layer index (its resid_post) or a list of them; order kept, duplicates dropped."""
    items = [layer_signature] if isinstance(layer_signature, (str, int)) else list(layer_signature)
    if not items:
        raise ValueError("no hook point given; pass a name such as 'blocks.10.hook_resid_post' or a layer index")
    return list(dict.fromkeys(resolve_hook(model, item) for item in items))


def _texts_of(dataset: Any, cfg: StoreConfig) -> tuple[Any, dict[str, Any]]:
    """(texts, JSON description) of a TextSourceConfig, a list of strings or an HF (iterable) dataset."""
    if dataset is None:
        dataset = TextSourceConfig()
    if isinstance(dataset, TextSourceConfig):
        description: dict[str, Any] = {k: v for k, v in asdict(dataset).items() if k != "texts"}
        texts = load_texts(dataset)
    elif isinstance(dataset, str):
        raise TypeError("pass TextSourceConfig(source='hf', name=...) for a dataset name, or a list of texts")
    else:
        description, texts = {"source": type(dataset).__name__}, dataset
    texts = limit_texts(list(texts) if isinstance(texts, tuple) else texts, cfg.sample_limit, cfg.random_sample, cfg.seed)
    if hasattr(texts, "__len__"):
        description.update(n_documents=len(texts), sha256=_content_digest(texts, cfg.text_field))
    else:
        description.update(streaming=True, info=str(getattr(texts, "info", None) and texts.info.dataset_name))
    if hasattr(texts, "__len__") and len(texts) == 0:
        raise ValueError("the dataset is empty; give at least one text")
    return texts, description


def _content_digest(texts: Any, text_field: str, most: int = 10_000) -> str:
    """SHA-256 of (at most ``most``, evenly spaced) documents: what a resume checks the texts against."""
    n = len(texts)
    index = list(range(n)) if n <= most else np.linspace(0, n - 1, most).astype(int).tolist()
    if isinstance(texts, list):
        chosen = [texts[i] for i in index]
    else:  # an HF Dataset: its fingerprint is random for in-memory datasets, so hash the content
        chosen = texts.select(index)[text_field]
    return hashlib.sha256("\x00".join(chosen).encode("utf-8")).hexdigest()


def _distributed() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _agree_run_id(run_id: str | None, world_size: int) -> str:
    if run_id is None:
        run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    if world_size > 1:
        holder = [run_id]
        torch.distributed.broadcast_object_list(holder, src=0)
        run_id = holder[0]
    if not run_id or "/" in run_id or run_id.startswith("."):
        raise ValueError(f"run_id {run_id!r} must be a plain folder name")
    return run_id


class _Buffer:
    """Rows waiting for the next shard, with the counters they cover."""

    def __init__(self, hooks: list[str], keys: dict[str, str], padded: bool, storage: torch.dtype) -> None:
        self.hooks, self.keys, self.padded, self.storage = hooks, keys, padded, storage
        self.reset()

    def reset(self) -> None:
        self.pieces: dict[str, list[Tensor]] = {k: [] for k in self.keys.values()}
        self.meta: dict[str, list[Tensor]] = {"token_ids": [], "doc_index": [], "position": []}
        if self.padded:
            self.meta["attention_mask"] = []
        self.rows = 0
        self.counts = {"samples": 0, "tokens": 0, "empty_texts": 0, "batches": 0}

    def add(self, acts: ActivationBatch, batch: WindowBatch, keep: Tensor) -> None:
        self.rows += len(acts.token_ids)
        for hook in self.hooks:
            rows = acts.acts[hook].to(device="cpu", dtype=self.storage)
            if self.padded:
                full = torch.zeros((*keep.shape, rows.shape[-1]), dtype=self.storage)  # (batch, pos, d)
                full[keep] = rows
                rows = full
            self.pieces[self.keys[hook]].append(rows)
        if self.padded:
            self.meta["token_ids"].append(batch.input_ids)
            self.meta["attention_mask"].append(keep.to(torch.uint8))
            self.meta["doc_index"].append(batch.doc_index)
            self.meta["position"].append(batch.token_positions())
        else:
            self.meta["token_ids"].append(acts.token_ids)
            self.meta["doc_index"].append(acts.doc_index)
            self.meta["position"].append(acts.position)

    def tensors(self, pad_id: int) -> dict[str, list[Tensor]]:
        out = {**self.pieces, **self.meta}
        if not self.padded:
            return out  # row blocks, streamed into the shard file one after the other
        width = max(t.shape[1] for t in self.meta["token_ids"])

        def pad(t: Tensor, value: int = 0) -> Tensor:
            if t.dim() == 1:
                return t
            spec = [0, 0] * (t.dim() - 2) + [0, width - t.shape[1]]
            return torch.nn.functional.pad(t, spec, value=value)

        return {k: [pad(t, pad_id if k == "token_ids" else 0) for t in v] for k, v in out.items()}


def _total_fields(totals: Mapping[str, int]) -> dict[str, int]:
    return {"sample_count": totals.get("samples", 0), "batch_count": totals.get("batches", 0),
            "row_count": totals.get("rows", 0), "token_count": totals.get("tokens", 0),
            "empty_text_count": totals.get("empty_texts", 0)}


def _merge_ranks(run_dir: Path, world_size: int) -> dict[str, Any]:
    """Rank 0, after a barrier: one ``meta.json`` listing every rank's shards and summed counts."""
    parts = [read_json(run_dir / f"meta.rank{r}.json") for r in range(world_size)]
    totals: dict[str, int] = {}
    for part in parts:
        for key, value in part["totals"].items():
            totals[key] = totals.get(key, 0) + value
    meta = {k: v for k, v in parts[0].items() if k not in ("rank", "shards", "totals")}
    meta.update(shards=[s for p in parts for s in p["shards"]], totals=totals, complete=True,
                ranks=[{"rank": p["rank"], **_total_fields(p["totals"])} for p in parts], **_total_fields(totals))
    atomic_write_json(run_dir / META_FILENAME, meta)
    return meta


def save(model: HookedTransformer, layer_signature: str | int | Sequence[str | int], dataset: Any = None,
         store: str | os.PathLike[str] | None = None, *, run_id: str | None = None,
         sample_limit: int | None = None, batch_size: int | None = None, shard_size: int | None = None,
         config: StoreConfig | None = None, progress: bool = True, **overrides: Any) -> str:
    """Collect activations at one or more hook points over a text source and store them; returns the run id.

    ``dataset``: a :class:`~sae_core.data.TextSourceConfig` (default: the fortunes corpus), a list
    of strings or an HF (streaming) dataset. Settings come from ``config`` (an
    :class:`StoreConfig`, e.g. ``StoreConfig(**constants.EXTRACTION)``), overridden by
    ``sample_limit`` / ``batch_size`` / ``shard_size`` and any other ``StoreConfig`` field
    given by keyword. With an existing ``run_id`` the run resumes after its last complete shard.
    Under ``torchrun`` (an initialised process group) each rank collects documents
    ``rank::world_size`` into rank-tagged shards and rank 0 merges the metadata.
    """
    named = {k: v for k, v in (("sample_limit", sample_limit), ("batch_size", batch_size),
                               ("shard_size", shard_size)) if v is not None}
    cfg = replace(config or StoreConfig(), **named, **overrides)
    hooks = resolve_hooks(model, layer_signature)
    texts, data_description = _texts_of(dataset, cfg)
    rank, world_size = _distributed()
    store = Path(store) if store is not None else cache_dir() / "store"
    ensure_writable_dir(store / ACTIVATIONS_DIR)
    run_id = _agree_run_id(run_id, world_size)
    run_dir = store / ACTIVATIONS_DIR / run_id
    policy, tokenizer = cfg.token_policy(), model.tokenizer
    streaming = not hasattr(texts, "__len__")
    keys = {h: h for h in hooks} if cfg.shard_format == "safetensors" else (
        {hooks[0]: "activations"} if len(hooks) == 1 else {h: f"activations.{h}" for h in hooks})
    identity = {"model": model.cfg.model_name, "d_model": model.cfg.d_model, "n_layers": model.cfg.n_layers,
                "hooks": hooks, "tokenizer": getattr(tokenizer, "name_or_path", None), "dataset": data_description,
                "token_policy": policy.to_json(tokenizer), **{k: v for k, v in asdict(cfg).items()
                                                             if k not in ("policy", "pin_memory", "persistent_workers", "num_dataloader_workers")}}
    if streaming:
        identity["num_dataloader_workers"] = cfg.num_dataloader_workers
    header = {"model": model_summary(model), "hooks": hooks, "d_model": model.cfg.d_model, "tensor_keys": keys,
              "forward_dtype": cfg.forward_dtype, "storage_dtype": cfg.storage_dtype, "dataset": data_description,
              "tokenizer": {"name": getattr(tokenizer, "name_or_path", None), "vocab_size": len(tokenizer),
                            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                            "pad_token_id": pad_id_of(tokenizer)},
              "token_policy": policy.to_json(tokenizer),
              "bos_policy": {"prepend_bos": cfg.prepend_bos, "bos_token_id": tokenizer.bos_token_id,
                             "bos_in_middle_of_window": False},
              "masking": "rows with attention_mask 0 (pad) always dropped; special tokens per token_policy",
              "seed": cfg.seed, "config": asdict(cfg), "package_version": _package_version(),
              "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if rank == 0 and world_size > 1:
        _check_world(run_dir, world_size)
        if not (run_dir / META_FILENAME).exists():
            atomic_write_json(run_dir / META_FILENAME, {**header, "identity": identity, "shards": [],
                                                        "shard_format": cfg.shard_format, "world_size": world_size,
                                                        "complete": False})
    writer = ShardWriter(run_dir, identity, header, cfg.shard_format, rank, world_size)
    try:
        if not writer.complete:
            _collect(model, hooks, texts, cfg, writer, keys, rank, world_size, progress)
    finally:
        writer.close()
    if world_size > 1:
        torch.distributed.barrier()
        if rank == 0:
            _merge_ranks(run_dir, world_size)
        torch.distributed.barrier()
    return run_id


def _check_world(run_dir: Path, world_size: int) -> None:
    if (run_dir / META_FILENAME).exists():
        old = read_json(run_dir / META_FILENAME).get("world_size", 1)
        if old != world_size:
            raise ValueError(f"run {run_dir.name} was started with {old} process(es), now {world_size}; "
                             "resume it with the same number of ranks or use a new run_id")


def _package_version() -> str | None:
    try:
        return importlib.metadata.version("sae_core")
    except importlib.metadata.PackageNotFoundError:
        return None


def _collect(model: HookedTransformer, hooks: list[str], texts: Any, cfg: StoreConfig, writer: ShardWriter,
             keys: dict[str, str], rank: int, world_size: int, show_progress: bool) -> None:
    """The extraction loop: batches -> kept rows -> shards, resuming after ``writer.batches_done``."""
    tokenizer, policy = model.tokenizer, cfg.token_policy()
    start = writer.batches_done
    if hasattr(texts, "__len__"):
        windows: Any = WindowedTextDataset(texts, tokenizer, cfg.max_text_length, cfg.seed, cfg.prepend_bos,
                                           cfg.text_field)
        share = range(rank, len(texts), world_size) if world_size > 1 else None
        loader = make_dataloader(windows, cfg.loader(), share, start_batch=start)
        batches: Any = enumerate(loader, start=start)
        total = None if cfg.batch_tokens else start + len(loader)  # a token budget knows no length up front
    else:
        windows = IterableWindowedTextDataset(texts, tokenizer, cfg.max_text_length, cfg.seed, cfg.prepend_bos,
                                              cfg.text_field, rank, world_size)
        batches = itertools.islice(enumerate(make_dataloader(windows, cfg.loader())), start, None)
        total = None
    buffer = _Buffer(hooks, keys, cfg.shard_format == "npz", resolve_dtype(cfg.storage_dtype))
    pad_id = pad_id_of(tokenizer)
    number = start - 1
    for number, batch in tqdm(batches, total=total, initial=start, disable=not show_progress,
                              desc=f"activations {writer.run_dir.name}"):
        buffer.counts["batches"] += 1
        buffer.counts["samples"] += batch.input_ids.shape[0] + batch.n_empty
        buffer.counts["empty_texts"] += batch.n_empty
        if batch.input_ids.numel() == 0:
            continue
        keep = select_positions(policy.keep_mask(batch.input_ids, batch.attention_mask, tokenizer), cfg.positions)
        acts = batch_activations(model, batch, hooks, policy, cfg.forward_dtype, cfg.positions, number)
        buffer.counts["tokens"] += acts.n_tokens_seen
        buffer.add(acts, batch, keep)
        if buffer.rows >= cfg.shard_size:
            writer.write(buffer.tensors(pad_id), number + 1, buffer.counts, rows=buffer.rows)
            buffer.reset()
    if buffer.rows:
        writer.write(buffer.tensors(pad_id), number + 1, buffer.counts, rows=buffer.rows)
        buffer.reset()
    totals = writer.totals()
    for key, value in buffer.counts.items():  # trailing batches that produced no rows
        totals[key] = totals.get(key, 0) + value
    if totals["rows"] == 0 and world_size == 1:
        if not writer.resumed:
            shutil.rmtree(writer.run_dir)  # created by this call and holding nothing
        raise ValueError(f"no activation rows were collected from {totals.get('samples', 0)} documents "
                         f"({totals.get('empty_texts', 0)} tokenised to nothing); check the texts and token policy")
    writer.finish(totals=totals, **_total_fields(totals))
    logger.info("run %s: %d rows from %d documents in %d shards", writer.run_dir.name, totals["rows"],
                totals.get("samples", 0), len(writer.shards))
