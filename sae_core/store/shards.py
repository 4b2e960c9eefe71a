"""Shard files of an activation run: formats, integrity checks and the atomic, resumable writer.

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
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sae_core import checks
from sae_core.checks import differences
from sae_core.files import (
    FolderLock,
    atomic_path,
    atomic_write_json,
    ensure_writable_dir,
    file_sha256,
    json_default,
    read_json,
)
from sae_core.model_loading import resolve_dtype

logger = logging.getLogger(__name__)

META_FILENAME = "meta.json"
ACTIVATIONS_DIR = "activations"
SHARD_FORMATS = {"safetensors": ".safetensors", "npz": ".npz"}
FORMAT_VERSION = 1
# safetensors dtype tags -> numpy dtypes for memory mapping (bf16 is mapped as uint16, viewed by torch).
ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I64": np.int64,
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
    return file_sha256(path)


WRITERS = {"safetensors": _write_safetensors, "npz": _write_npz}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def safetensors_layout(path: Path) -> tuple[int, dict[str, Any]]:
    """(data offset, header) of a safetensors shard; raises naming the file if it is truncated."""
    return checks.safetensors_layout(path, "delete the run or restore the file", what="shard ")


def check_shard(path: Path, record: ShardRecord | None = None, full: bool = False) -> None:
    """Raise naming ``path`` if the shard is missing, truncated, of the wrong size or (``full``) hash."""
    if record is not None and (path.name != record.file or not record.file.split(".")[0].endswith(f"{record.index:05d}")):
        raise ValueError(f"shard {path} is listed as shard {record.index} of rank {record.rank} under the name "
                         f"{record.file!r}; the run metadata is corrupted, delete the run or restore meta.json")
    if not path.exists():
        raise FileNotFoundError(f"shard {path} is listed in the run metadata but missing")
    if record is not None and path.stat().st_size != record.nbytes:
        raise ValueError(f"shard {path} is truncated or corrupted: {path.stat().st_size} bytes, "
                         f"{record.nbytes} recorded; delete the run or restore the file")
    if path.suffix == ".safetensors":
        safetensors_layout(path)
    if full and record is not None and file_sha256(path) != record.sha256:
        raise ValueError(f"shard {path} is corrupted: its SHA-256 differs from the one recorded when it was written; "
                         "restore the file, or delete the run and extract again")


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
                                              default=json_default))
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
        self._lock = FolderLock(self._lock_path, f"run {self.run_dir.name} (rank {self.rank}) is being written by "
                                "another process; wait for it or stop it before resuming").acquire()
        _LOCAL_WRITERS[key] = self

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _resume(self, verify_hashes: bool) -> None:
        progress = read_json(self.progress_path)
        old = progress.get("identity", {})
        differ = differences(old, self.identity)
        if differ:
            details = "; ".join(differ)
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
        leftovers += list(self.run_dir.glob(f".{self.progress_path.name}.*.tmp"))  # a cut-short meta.json write
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
        return json.loads(json.dumps(self._progress, default=json_default))

    def totals(self) -> dict[str, int]:
        """Rows and every counter summed over the completed shards."""
        totals = {"rows": sum(r.rows for r in self._shards)}
        for record in self._shards:
            for key, value in record.counts.items():
                totals[key] = totals.get(key, 0) + value
        return totals

    def write(self, tensors: Mapping[str, Tensor | np.ndarray | Sequence[Tensor | np.ndarray]], batches_end: int,
              counts: Mapping[str, int] | None = None, rows: int | None = None,
              progress_fields: Mapping[str, Any] | None = None) -> ShardRecord:
        """Write the next shard atomically, then list it; returns its record.

        Each value is a tensor / array, or a list of row blocks of one tensor (written one after
        the other, never concatenated in memory for safetensors). ``batches_end``: batches consumed
        so far (what a resume skips). ``rows`` defaults to the first tensor's length.
        ``progress_fields`` are stored in the progress file in the same write that lists the shard.
        """
        if batches_end < self.batches_done:
            raise ValueError(f"batches_end {batches_end} is before the last shard's {self.batches_done}")
        if self.complete:
            raise RuntimeError(f"run {self.run_dir.name} is already complete; start a new run_id")
        if self._superseded or not self._lock.held:
            raise RuntimeError(f"this writer of run {self.run_dir.name} was closed or replaced by a newer one")
        data = {k: _pieces(v) for k, v in tensors.items()}
        if self.float_dtype is not None:
            data = {k: [b.to(self.float_dtype) if b.is_floating_point() else b for b in v] for k, v in data.items()}
        index = len(self._shards)
        path = self.run_dir / f"{self.prefix}{index:05d}{SHARD_FORMATS[self.shard_format]}"
        with atomic_path(path) as tmp:
            digest = WRITERS[self.shard_format](data, tmp)
        _fsync_dir(self.run_dir)
        n_rows = rows if rows is not None else (sum(len(b) for b in next(iter(data.values()))) if data else 0)
        record = ShardRecord(index, path.name, self.rank, int(n_rows), int(batches_end),
                             path.stat().st_size, digest, {k: int(v) for k, v in (counts or {}).items()})
        self._shards.append(record)
        self._progress.update(progress_fields or {})
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
        if self._lock.held:
            self._lock.release(remove=self.complete and not self._superseded)
            key = str(self._lock_path.resolve())
            if _LOCAL_WRITERS.get(key) is self:
                del _LOCAL_WRITERS[key]
