"""The activation store: numbered shards in a run folder, written atomically and resumable.

Layout: ``<store>/activations/<run_id>/`` holds ``meta.json`` and shards ``shard-00000.safetensors``,
``shard-00001.safetensors`` ... (``shard-r<rank>-00000...`` under data parallelism, one
``meta.rank<r>.json`` progress file per rank, merged into ``meta.json`` by rank 0).

Extraction (:func:`save`) runs the windowed loader, :func:`~sae_core.activations.batch_activations`
and the writer in one loop. Data parallel under ``torchrun``: rank ``r`` takes documents
``r::world_size``, writes ``shard-r<r>-*`` and ``meta.rank<r>.json``; after a barrier rank 0 merges
them into ``meta.json``. Hand-written rather than SAELens's ``CacheActivationsRunner`` because that
writes one HF arrow dataset per hook, runs documents together in shared contexts (each attends to
the ones before it), and cannot resume. With ``pack_windows`` our windows share rows too, but
masked apart, so every window's activations are the ones it has alone.

The shard files and their writer live in :mod:`sae_core.store.shards`, reading runs back in
:mod:`sae_core.store.runs`.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import shutil
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from sae_core.activations import ActivationBatch, batch_activations, select_positions
from sae_core.checks import (
    StreamDigest,
    check_against_model,
    check_positions,
    check_texts,
    model_fingerprint,
    texts_digest,
)
from sae_core.config import StoreConfig, TextSourceConfig, to_json, with_overrides
from sae_core.data import WindowBatch, WindowedTextDataset, pad_id_of, windowed_dataset
from sae_core.files import (
    atomic_write_json,
    cache_dir,
    ensure_writable_dir,
    read_json,
)
from sae_core.hooks import resolve_hook
from sae_core.loader import document_progress, make_dataloader, packed_shape
from sae_core.model_loading import model_summary, resolve_dtype
from sae_core.precision import resolve_forward
from sae_core.store.shards import ACTIVATIONS_DIR, META_FILENAME, ShardWriter
from sae_core.texts import limit_texts, load_texts

logger = logging.getLogger(__name__)

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
        texts = load_texts(dataset, cfg.windows.text_field)
    elif isinstance(dataset, str):
        raise TypeError("pass TextSourceConfig(source='hf', name=...) for a dataset name, or a list of texts")
    else:
        description, texts = {"source": type(dataset).__name__}, dataset
    texts = limit_texts(list(texts) if isinstance(texts, tuple) else texts, cfg.sample_limit, cfg.random_sample,
                        cfg.windows.seed)
    if hasattr(texts, "__len__"):
        check_texts(texts, cfg.windows.text_field)
        description.update(n_documents=len(texts), sha256=texts_digest(texts, cfg.windows.text_field))
    else:
        description.update(streaming=True, info=str(getattr(texts, "info", None) and texts.info.dataset_name))
    if hasattr(texts, "__len__") and len(texts) == 0:
        raise ValueError("the dataset is empty; give at least one text")
    return texts, description


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


class ShardBuffer:
    """Rows waiting for the next shard, with the counters they cover: flat rows, or (``padded``) whole
    windows with ``attention_mask`` marking the kept rows (the NPZ chunk layout)."""

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
         config: StoreConfig | None = None, progress: bool = True, **overrides: Any) -> str:
    """Collect activations at one or more hook points over a text source and store them; returns the run id.

    ``dataset``: a :class:`~sae_core.config.TextSourceConfig` (default: the fortunes corpus), a list
    of strings or an HF (streaming) dataset. Settings come from ``config`` (a run's
    ``RunConfig.store``), overridden by any knob of it given by keyword, flat
    (``sample_limit=1000, batch_size=4, max_text_length=64``: each goes to the section that owns it).
    With an existing ``run_id`` the run resumes after its last complete shard.
    Under ``torchrun`` (an initialised process group) each rank collects documents
    ``rank::world_size`` into rank-tagged shards and rank 0 merges the metadata.
    """
    cfg = resolve_forward(with_overrides(config or StoreConfig(), "save", **overrides), model.cfg.device)
    hooks = resolve_hooks(model, layer_signature)
    texts, data_description = _texts_of(dataset, cfg)
    rank, world_size = _distributed()
    store = Path(store) if store is not None else cache_dir() / "store"
    ensure_writable_dir(store / ACTIVATIONS_DIR)
    run_id = _agree_run_id(run_id, world_size)
    run_dir = store / ACTIVATIONS_DIR / run_id
    policy, tokenizer = cfg.windows.policy, model.tokenizer
    streaming = not hasattr(texts, "__len__")
    keys = {h: h for h in hooks} if cfg.shard_format == "safetensors" else (
        {hooks[0]: "activations"} if len(hooks) == 1 else {h: f"activations.{h}" for h in hooks})
    check_against_model(model, cfg.windows.max_text_length, "StoreConfig")
    check_positions(cfg.positions, cfg.windows.max_text_length, "StoreConfig")
    identity = {"model": model.cfg.model_name, "d_model": model.cfg.d_model, "n_layers": model.cfg.n_layers,
                "model_fingerprint": model_fingerprint(model),
                "hooks": hooks, "tokenizer": getattr(tokenizer, "name_or_path", None), "dataset": data_description,
                "token_policy": policy.to_json(tokenizer), **_identity_knobs(cfg, streaming)}
    header = {"model": model_summary(model), "hooks": hooks, "d_model": model.cfg.d_model, "tensor_keys": keys,
              "forward_dtype": cfg.forward.dtype, "storage_dtype": cfg.storage_dtype, "dataset": data_description,
              "tokenizer": {"name": getattr(tokenizer, "name_or_path", None), "vocab_size": len(tokenizer),
                            "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                            "pad_token_id": pad_id_of(tokenizer)},
              "token_policy": policy.to_json(tokenizer),
              "bos_policy": {"prepend_bos": cfg.windows.prepend_bos, "bos_token_id": tokenizer.bos_token_id,
                             "bos_in_middle_of_window": False},
              "masking": "rows with attention_mask 0 (pad) always dropped; special tokens per token_policy",
              "seed": cfg.windows.seed, "config": to_json(cfg), "package_version": _package_version(),
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


def _identity_knobs(cfg: StoreConfig, streaming: bool) -> dict[str, Any]:
    """The settings that change what a run stores (workers and pinning only matter when streaming)."""
    loader = to_json(cfg.loader)
    for key in ("pin_memory", "persistent_workers", "extra") + (() if streaming else ("num_dataloader_workers",)):
        loader.pop(key)
    windows = {k: v for k, v in to_json(cfg.windows).items() if k != "policy"}  # the policy is recorded resolved
    return {"windows": windows, "loader": loader, "forward_dtype": cfg.forward.dtype,
            **{k: v for k, v in to_json(cfg).items() if k not in ("windows", "loader", "forward")}}


def _digested(batches: Any, start: int, writer: ShardWriter, digest: StreamDigest) -> Any:
    """Streamed ``(number, batch)`` after the first ``start``, hashing every batch read (skipped ones too).

    A resume re-reads the batches its shards cover; when the hash of the first ones differs from
    the one recorded with the last shard, or the stream ends before them, the texts have changed.
    """
    expected = writer.progress.get("stream_digest")
    fix = "resume with the same texts in the same order, or pass a new run_id to start fresh"
    for number, batch in batches:
        digest.update(batch.input_ids, batch.doc_index)
        digest.check(expected, f"cannot resume run {writer.run_dir.name}", fix)
        if number >= start:
            yield number, batch
    if digest.count < start:
        raise ValueError(f"cannot resume run {writer.run_dir.name}: the text stream ended after {digest.count} "
                         f"batches but the run's shards already cover {start}; {fix}")


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
    tokenizer, policy = model.tokenizer, cfg.windows.policy
    start = writer.batches_done
    windows = windowed_dataset(texts, tokenizer, cfg.windows, rank, world_size)
    static_shape = None  # a stream's batches are not filled to a token budget: the dynamic-shape graph serves them
    if isinstance(windows, WindowedTextDataset):
        static_shape = packed_shape(cfg.loader.batch_tokens, cfg.windows.max_text_length, cfg.loader.pack_windows)
        share = range(rank, len(texts), world_size) if world_size > 1 else None
        loader = make_dataloader(windows, cfg.loader, share, start_batch=start)
        batches: Any = enumerate(document_progress(loader, f"activations {writer.run_dir.name}", start,
                                                   disable=not show_progress), start=start)
    else:  # a stream has no length up front: the bar counts batches
        digest = StreamDigest()
        batches = tqdm(_digested(enumerate(make_dataloader(windows, cfg.loader)), start, writer, digest),
                       initial=start, disable=not show_progress, desc=f"activations {writer.run_dir.name}")
    digest_of = (lambda: {"stream_digest": digest.state()}) if not hasattr(texts, "__len__") else dict
    buffer = ShardBuffer(hooks, keys, cfg.shard_format == "npz", resolve_dtype(cfg.storage_dtype))
    pad_id = pad_id_of(tokenizer)
    number = start - 1
    for number, batch in batches:
        buffer.counts["batches"] += 1
        buffer.counts["samples"] += batch.n_windows + batch.n_empty
        buffer.counts["empty_texts"] += batch.n_empty
        if batch.input_ids.numel() == 0:
            continue
        keep = select_positions(policy.keep_mask(batch.input_ids, batch.attention_mask, tokenizer), cfg.positions,
                                batch)
        acts = batch_activations(model, batch, hooks, policy, cfg.forward.dtype, cfg.positions, number,
                                 cfg.forward.compile, static_shape)
        buffer.counts["tokens"] += acts.n_tokens_seen
        buffer.add(acts, batch, keep)
        if buffer.rows >= cfg.shard_size:
            writer.write(buffer.tensors(pad_id), number + 1, buffer.counts, rows=buffer.rows,
                         progress_fields=digest_of())
            buffer.reset()
    if buffer.rows:
        writer.write(buffer.tensors(pad_id), number + 1, buffer.counts, rows=buffer.rows, progress_fields=digest_of())
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
