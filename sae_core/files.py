"""Atomic file writes, JSON helpers and the user cache folder.

Every artifact sae_core writes goes through here so that an interrupted run never leaves a
half-written file under its final name: data is written to a temporary file in the same folder,
flushed and fsync-ed, then moved into place with ``os.replace`` (atomic on POSIX). Folders are
published the same way (build in ``<name>.tmp-<pid>``, then rename). Also: the folder lock the store and
training share (:class:`FolderLock`), and 1-D ``.npy`` files written by appends (:class:`NpyAppender`).

Hand-written because neither the standard library nor our dependencies offer an atomic writer
that covers bytes, JSON, numpy arrays and safetensors alike.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

CACHE_ENV = "SAE_CORE_CACHE"


def cache_dir() -> Path:
    """The user cache folder: ``$SAE_CORE_CACHE``, else ``$XDG_CACHE_HOME/sae_core``, else ``~/.cache/sae_core``."""
    if os.environ.get(CACHE_ENV):
        path = Path(os.environ[CACHE_ENV])
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
        path = base / "sae_core"
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success move it onto ``path`` atomically.

    The caller writes the file at the yielded path by any means (``np.save``, ``save_file``, ...).
    On an exception the temporary file is removed and ``path`` is left untouched.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "__dataclass_fields__"):
        import dataclasses

        return dataclasses.asdict(obj)
    return str(obj)


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically (paths, arrays, dataclasses allowed)."""
    return atomic_write_text(path, json.dumps(obj, indent=2, default=json_default) + "\n")


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in blocks."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def read_json(path: str | os.PathLike[str]) -> Any:
    """Read a JSON file, naming the file in the error if it is missing or corrupt."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); delete it or restore it") from None


def publish_dir(final: str | os.PathLike[str], build: Callable[[Path], None]) -> Path:
    """Build a folder with ``build(tmp_dir)`` and rename it to ``final`` atomically.

    If ``final`` appears meanwhile (another process won the race), the new copy is discarded.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        build(tmp)
        try:
            os.replace(tmp, final)
        except OSError:
            if not final.exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def ensure_writable_dir(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` if needed and check that files can be written in it."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check."):
            pass
    except OSError as err:
        raise PermissionError(
            f"cannot write to {path} ({err.strerror}); choose a writable output folder"
        ) from None
    return path


class FolderLock:
    """An exclusive ``flock`` on ``path``, held from :meth:`acquire` until :meth:`release`.

    Another process (or another open of the same file in this one) that tries to take it gets a
    ``RuntimeError`` with ``busy_message``. The kernel drops the lock when the holder dies, so a
    ``kill -9`` leaves nothing to clean up but the (harmless) lock file. Used by the store's shard
    writer and by training, one lock file per output folder.
    """

    def __init__(self, path: str | os.PathLike[str], busy_message: str) -> None:
        self.path, self.busy_message = Path(path), busy_message
        self._fh: Any = None

    @property
    def held(self) -> bool:
        return self._fh is not None and not self._fh.closed

    def acquire(self) -> FolderLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "w")  # noqa: SIM115 - held until release()
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            raise RuntimeError(self.busy_message) from None
        self._fh = fh
        return self

    def release(self, remove: bool = False) -> None:
        """Drop the lock (and delete the lock file if ``remove``)."""
        if self.held:
            if remove:
                self.path.unlink(missing_ok=True)
            self._fh.close()

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release(remove=True)


def remove_temp_files(folder: str | os.PathLike[str], *names: str) -> list[Path]:
    """Delete the temporary files :func:`atomic_path` leaves beside ``names`` when cut short; returns them."""
    removed = []
    for name in names:
        for path in Path(folder).glob(f".{name}.*.tmp"):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed
class NpyAppender:
    """A 1-D ``.npy`` file written by appends; the header gets its final length at :meth:`close`."""

    def __init__(self, path: Path, dtype: Any) -> None:
        self.path, self.dtype, self.length = path, np.dtype(dtype), 0
        self.fh = open(path, "wb")  # noqa: SIM115 - closed in close()
        self.header_len = self._write_header()

    def _write_header(self) -> int:
        self.fh.seek(0)
        np.lib.format.write_array_header_1_0(self.fh, {"descr": np.lib.format.dtype_to_descr(self.dtype),
                                                       "fortran_order": False, "shape": (self.length,)})
        return self.fh.tell()

    def append(self, values: np.ndarray) -> None:
        values = np.ascontiguousarray(values, dtype=self.dtype)
        self.fh.write(memoryview(values).cast("B"))
        self.length += values.size

    def close(self) -> None:
        end = self.fh.tell()
        if self._write_header() != self.header_len:  # numpy pads 1-D headers to a fixed length
            raise RuntimeError(f"the .npy header of {self.path} changed length; cannot finalise it in place")
        self.fh.seek(end)
        self.fh.close()


def retype_npy(path: Path, dtype: Any, block: int = 1 << 24) -> None:
    """Rewrite a 1-D ``.npy`` file with another dtype, ``block`` entries at a time."""
    source = np.load(path, mmap_mode="r")
    target = NpyAppender(path.with_name(path.name + ".retype"), dtype)
    for start in range(0, source.shape[0], block):
        target.append(source[start:start + block])
    target.close()
    del source
    os.replace(target.path, path)


