"""The activation store: runs of numbered shards with ``meta.json``, written atomically and resumable.

* :mod:`.shards` — the shard files (safetensors rows or NPZ padded chunks) and :class:`ShardWriter`
  (atomic shard + metadata writes, the run lock, resume after the last complete shard).
* :mod:`.runs` — reading runs back: :class:`ActivationRun`, memory-mapped rows, row origins.
* :mod:`.collect` — :func:`save`: windows -> one forward to every hook -> kept rows -> shards.
"""

from sae_core.store.collect import ShardBuffer, resolve_hooks, save
from sae_core.store.runs import (
    ActivationRun,
    RowOrigin,
    RunSummary,
    ShardedRows,
    ShardRows,
    list_runs,
    memmap_tensors,
)
from sae_core.store.shards import (
    ACTIVATIONS_DIR,
    FORMAT_VERSION,
    META_FILENAME,
    SHARD_FORMATS,
    ShardRecord,
    ShardWriter,
    check_shard,
    load_shard,
)

__all__ = ["ACTIVATIONS_DIR", "FORMAT_VERSION", "META_FILENAME", "SHARD_FORMATS", "ActivationRun", "RowOrigin",
           "RunSummary", "ShardBuffer", "ShardRecord", "ShardWriter", "ShardRows", "ShardedRows", "check_shard", "list_runs",
           "load_shard", "memmap_tensors", "resolve_hooks", "save"]
