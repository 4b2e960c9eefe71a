"""A static feature browser: a dashboard for every latent, built from disk, opened from ``file://``.

:func:`build_browser` writes ``index.html`` (a sortable, filterable table of every latent, search by
token or id, a clustered decoder-similarity heatmap) and ``latent.html#<id>`` (one latent's
density, histogram, top and quantile examples with every token shaded, logit lens, nearest and
co-occurring latents, steering dose-response). The numbers come from :mod:`sae_core.browser.data`.

Decisions:
- Data files are ``<script>`` chunks that call ``SAEB.register(name, payload)``: Chromium blocks
  ``fetch()`` of ``file://`` URLs, scripts it loads. One chunk holds ``chunk_latents`` latents
  (512 by default: 9 files for 4,608 latents, 128 for 65,536), so a view loads one chunk, never
  one huge page, and a big SAE never means one file per latent. The page loads a chunk on demand
  by inserting its script tag.
- Token strings are stored once (``data/vocab.js``); examples carry token ids. Values are rounded
  to 5 decimals (activations) so the chunks stay small; the tests compare at that precision.
- The site is built in a staging folder beside ``out_dir`` and moved into place at the end, so an
  interrupted build leaves the previous browser (or none), never half of one.
- :func:`read_data` reads a data file back (the tests and the Neuronpedia export use the same
  records as the pages).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from sae_core.browser.data import (
    BrowserConfig,
    ChunkColumns,
    chunk_stats,
    example_ranks,
    gather_contexts,
    histograms,
    partition_by_latent,
    top_tokens,
    window_starts,
)
from sae_core.browser.export import NeuronpediaWriter
from sae_core.browser.relations import (
    cooccurrence_neighbours,
    decoder_neighbours,
    logit_lens,
    residual_directions,
    unit_rows,
)
from sae_core.files import atomic_write_text
from sae_core.latents import LatentCSR, as_host_array
from sae_core.similarity import Neighbours

logger = logging.getLogger(__name__)

ASSETS = ("index.html", "latent.html", "browser.js", "browser.css")
DATA_DIR = "data"
OUT_OF_RANGE_TOKEN = "<|outofrange|>"


def chunk_file(chunk: int) -> str:
    """Relative path of a latent chunk's data file."""
    return f"{DATA_DIR}/chunk_{chunk:04d}.js"


def _write_data(folder: Path, relative: str, name: str, payload: Any) -> None:
    text = json.dumps(payload, separators=(",", ":"), allow_nan=False)
    atomic_write_text(folder / relative, f"SAEB.register({json.dumps(name)},\n{text}\n);\n")


def read_data(path: str | os.PathLike[str]) -> Any:
    """The payload of a browser data file (``data/*.js``)."""
    text = Path(path).read_text(encoding="utf-8")
    head, _, rest = text.partition("\n")
    if not head.startswith("SAEB.register("):
        raise ValueError(f"{path} is not a browser data file (it does not start with SAEB.register)")
    return json.loads(rest.rsplit("\n);", 1)[0])


def vocab_strings(tokenizer: Any, size: int) -> list[str]:
    """Decoded string of every token id below ``size`` (``tokenizer``: HF tokenizer or a list of strings)."""
    if isinstance(tokenizer, Sequence) and not isinstance(tokenizer, str):
        strings = [str(s) for s in tokenizer[:size]]
    else:
        known = min(size, len(tokenizer))
        strings = _decode_each(tokenizer, known)
    return strings + [OUT_OF_RANGE_TOKEN] * (size - len(strings))


def _decode_each(tokenizer: Any, known: int) -> list[str]:
    """``tokenizer.decode([i])`` for every id below ``known``.

    A fast tokenizer decodes the batch in Rust directly (``decode_batch``), which skips the Python
    conversion of 49k one-element lists that makes ``batch_decode`` take ~2 s; the same strings
    when the tokenizer does no clean-up of spaces (checked on the first ids, else the slow path).
    """
    ids = [[i] for i in range(known)]
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        strings = backend.decode_batch(ids, skip_special_tokens=False)
        probe = range(0, known, max(1, known // 64))
        if all(strings[i] == tokenizer.decode([i]) for i in probe):
            return list(strings)
    return list(tokenizer.batch_decode(ids))


def _r(x: Any, digits: int = 5) -> Any:
    """``x`` rounded to ``digits`` decimals as JSON-ready Python numbers (a float, or nested lists)."""
    if np.ndim(x) == 0:  # the common case, per record: Python's round is ~50x cheaper than numpy's on a scalar
        return round(float(x), digits)
    return np.round(np.asarray(x, np.float64), digits).tolist()


def _pair_rows(ids: Any, values: Any, digits: int = 5) -> list[list[list[Any]]]:
    """``[[id, value], ...]`` of the finite values of each row of (rows, k) arrays (rounded once per chunk)."""
    values = np.asarray(values, np.float64)
    rounded, keep = np.round(values, digits).tolist(), np.isfinite(values).tolist()
    return [[[i, v] for i, v, ok in zip(row_ids, row_values, row_keep, strict=True) if ok]
            for row_ids, row_values, row_keep in zip(np.asarray(ids, np.int64).tolist(), rounded, keep, strict=True)]


def summary_line(record: dict[str, Any], vocab: list[str], n_rows: int) -> str:
    """One line: how often it fires, the tokens it fires on, the tokens it promotes."""
    if record["count"] == 0:
        return f"dead: never fires on these {n_rows:,} tokens"
    tokens = " ".join(repr(vocab[t]) for t, _ in record["top_tokens"][:3])
    promotes = " ".join(repr(vocab[t]) for t, _ in record["logits"]["pos"][:3])
    return f"fires on {record['density']:.3%} of tokens: {tokens}; promotes {promotes}"


class _Tables:
    """The whole-SAE tables a chunk's records draw from (neighbours, logit lens inputs, contexts)."""

    def __init__(self, csr: LatentCSR, directions: np.ndarray, W_U: np.ndarray, config: BrowserConfig,
                 neighbours: Any, jaccard: Any, pmi: Any, steering: Mapping[int, Any]) -> None:
        self.csr, self.directions, self.W_U, self.config = csr, directions, W_U, config
        self.neighbours, self.jaccard, self.pmi, self.steering = neighbours, jaccard, pmi, steering
        self.starts = window_starts(csr)


def _examples(cols: ChunkColumns, tables: _Tables, picks: list[tuple[int, int]]) -> list[dict[str, Any]]:
    """Example dicts for (local latent, rank) picks: context token ids and the latent's value on each."""
    if not picks:
        return []
    local, rank = (np.asarray(x, np.int64) for x in zip(*picks, strict=True))
    at = cols.indptr[local] + rank
    rows, values = cols.rows_value[at], cols.vals_value[at]
    csr = tables.csr
    ctx = gather_contexts(rows, tables.starts, csr.n_rows, tables.config.context_window)
    owner = np.repeat(local, np.diff(ctx.offsets))
    tokens = np.asarray(csr.token_ids[ctx.flat], np.int64).tolist()
    acts = _r(cols.values_of(owner, ctx.flat))
    docs, positions = np.asarray(csr.doc_index[rows]).tolist(), np.asarray(csr.position[rows]).tolist()
    out = []
    for e, (row, value) in enumerate(zip(rows.tolist(), _r(values), strict=True)):
        span = slice(int(ctx.offsets[e]), int(ctx.offsets[e + 1]))
        out.append({"row": row, "doc": docs[e], "position": positions[e], "value": value,
                    "focus": int(ctx.focus[e]), "tokens": tokens[span], "acts": acts[span]})
    return out


def _chunk_records(cols: ChunkColumns, tables: _Tables, vocab: list[str]) -> list[dict[str, Any]]:
    """The browser record of every latent of one chunk."""
    config, n_rows = tables.config, tables.csr.n_rows
    stats = chunk_stats(cols, n_rows)
    counts = cols.counts
    lo = np.minimum(stats["min"], 0.0)
    owner = np.repeat(np.arange(counts.size), counts)
    hist = histograms(cols.vals_value, owner, lo, stats["max"], config.n_bins)
    lens = logit_lens(tables.directions[cols.start:cols.stop], tables.W_U, config.n_logits, config.n_bins)
    tokens = top_tokens(cols, tables.csr.token_ids, config.n_top_tokens)
    picks, layout = [], []
    for j, count in enumerate(counts.tolist()):
        top, groups = example_ranks(count, config)
        layout.append((len(picks), top, groups))
        picks += [(j, r) for r in top] + [(j, r) for _, _, ranks in groups for r in ranks]
    examples = _examples(cols, tables, picks)
    latents = slice(cols.start, cols.stop)
    pairs = {"pos": _pair_rows(lens.top.indices, lens.top.values), "neg": _pair_rows(lens.bottom.indices, lens.bottom.values),
             **{name: _pair_rows(np.asarray(table.indices[latents]), np.asarray(table.values[latents]))
                for name, table in (("neighbours", tables.neighbours), ("jaccard", tables.jaccard), ("pmi", tables.pmi))}}
    records = []
    for j, (first, top, groups) in enumerate(layout):
        latent, count = cols.start + j, int(counts[j])
        at = first + len(top)
        quantiles = []
        for g_first, g_stop, ranks in groups:
            values = cols.vals_value[cols.indptr[j] + np.array([g_stop - 1, g_first])]
            quantiles.append({"lo": _r(values[0]), "hi": _r(values[1]), "share": _r((g_stop - g_first) / count),
                              "examples": examples[at:at + len(ranks)]})
            at += len(ranks)
        record = {
            "id": latent, "count": count, "density": _r(stats["density"][j], 8), "max": _r(stats["max"][j]),
            "min": _r(stats["min"][j]), "mean": _r(stats["mean"][j]),
            "hist": {"lo": _r(lo[j]), "hi": _r(stats["max"][j]), "counts": hist[j].tolist()},
            "logit_hist": {"lo": _r(lens.hist_lo[j]), "hi": _r(lens.hist_hi[j]), "counts": lens.hist_counts[j].tolist()},
            "top": examples[first:first + len(top)], "quantiles": quantiles,
            "logits": {"pos": pairs["pos"][j], "neg": pairs["neg"][j]},
            "neighbours": pairs["neighbours"][j], "jaccard": pairs["jaccard"][j], "pmi": pairs["pmi"][j],
            "top_tokens": [[t, _r(v)] for t, v in tokens[j]],
            "steering": [dict(r) for r in tables.steering.get(latent, [])] or None,
        }
        record["summary"] = summary_line(record, vocab, n_rows)
        records.append(record)
    return records


def heatmap_latents(max_activation: np.ndarray, counts: np.ndarray, neighbours: Neighbours, size: int) -> np.ndarray:
    """Latents for the heatmap: the most strongly firing live latents, each followed by its live neighbours."""
    alive = np.flatnonzero(counts > 0)
    seeds = alive[np.argsort(-max_activation[alive], kind="stable")]
    chosen: dict[int, None] = {}
    per_seed = min(3, neighbours.indices.shape[1])
    for seed in seeds.tolist():
        if len(chosen) >= size:
            break
        for latent in [seed, *np.asarray(neighbours.indices[seed, :per_seed]).tolist()]:
            if len(chosen) < size and counts[latent] > 0:
                chosen.setdefault(int(latent))
    return np.asarray(list(chosen), np.int64)


def cluster_order(sub: np.ndarray) -> np.ndarray:
    """Average-linkage leaf order of a similarity submatrix (distance ``1 - similarity``)."""
    from scipy.cluster.hierarchy import leaves_list, linkage
    from scipy.spatial.distance import squareform

    if sub.shape[0] < 3:
        return np.arange(sub.shape[0])
    dist = np.clip(1.0 - (sub + sub.T) / 2, 0.0, None)
    np.fill_diagonal(dist, 0.0)
    return leaves_list(linkage(squareform(dist, checks=False), "average", optimal_ordering=True))


class Scratch:
    """A temporary folder beside the output (same filesystem), removed on exit."""

    def __init__(self, parent: Path) -> None:
        parent.mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix=".browser-scratch.", dir=parent))

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, *exc: object) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def _heatmap(W_dec: np.ndarray, stats: dict[str, np.ndarray], neighbours: Any, size: int,
             similarity_path: str | os.PathLike[str] | None) -> dict[str, Any]:
    ids = heatmap_latents(stats["max"], stats["count"], neighbours, size)
    if ids.size == 0:
        return {"ids": [], "values": [], "metric": "cosine"}
    if similarity_path is not None:
        matrix = np.load(similarity_path, mmap_mode="r")
        order = np.argsort(ids)
        sub = np.empty((ids.size, ids.size))
        sub[order] = np.asarray(matrix[ids[order]], np.float64)[:, ids]  # rows read in ascending order
        metric = Path(similarity_path).stem.removeprefix("similarity_")
    else:
        unit = unit_rows(W_dec[ids])
        sub, metric = unit @ unit.T, "cosine"
    leaves = cluster_order(sub)
    return {"ids": ids[leaves].tolist(), "values": _r(sub[np.ix_(leaves, leaves)], 3), "metric": metric}


def _publish(staging: Path, out_dir: Path) -> None:
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(staging, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def _check_inputs(csr: LatentCSR, W_dec: np.ndarray, W_U: np.ndarray) -> None:
    if W_dec.ndim != 2 or W_dec.shape[0] != csr.n_features:
        raise ValueError(f"W_dec has shape {W_dec.shape} but the store has {csr.n_features} latents; "
                         "pass the decoder of the SAE that encoded this store, (d_sae, d_in)")
    if W_U.ndim != 2 or W_U.shape[0] != W_dec.shape[1]:
        raise ValueError(f"W_U has shape {W_U.shape}; it must be (d_model, d_vocab) with d_model = {W_dec.shape[1]} "
                         "(model.W_U)")
    if csr.n_rows == 0:
        raise ValueError(f"{csr.folder} holds no rows; encode some tokens before building a browser")


def _write_chunks(staging: Path, scratch: Path, n_chunks: int, tables: _Tables, vocab: list[str],
                  W_dec: np.ndarray, writer: NeuronpediaWriter | None, progress: bool) -> dict[str, list[Any]]:
    """Write every chunk's records (and Neuronpedia batch); return the index table's columns."""
    from tqdm.auto import tqdm

    csr, size = tables.csr, tables.config.chunk_latents
    index: dict[str, list[Any]] = {key: [] for key in ("count", "density", "max", "mean", "top_tokens", "summary")}
    for chunk in tqdm(range(n_chunks), desc="browser chunks", disable=not progress):
        start = chunk * size
        cols = ChunkColumns.load(scratch, chunk, start, min(start + size, csr.n_features), csr.n_rows)
        records = _chunk_records(cols, tables, vocab)
        _write_data(staging, chunk_file(chunk), f"chunk:{chunk}", records)
        if writer is not None:
            writer.write_batch(records, vocab, W_dec)
        for record in records:
            for key in index:
                index[key].append(record[key])
    if writer is not None:
        writer.close()
    return index


def build_browser(out_dir: str | os.PathLike[str], csr: LatentCSR, W_dec: Any, W_U: Any, tokenizer: Any, *,
                  similarity_path: str | os.PathLike[str] | None = None,
                  cooccurrence_path: str | os.PathLike[str] | None = None, cooccurrence_metric: str | None = None,
                  neighbours_path: str | os.PathLike[str] | None = None, whitener: Any = None,
                  steering: Mapping[int, Sequence[Mapping[str, float]]] | None = None,
                  config: BrowserConfig | None = None, neuronpedia: Mapping[str, Any] | None = None,
                  title: str | None = None, progress: bool = True) -> Path:
    """Write the feature browser of ``csr``'s latents to ``out_dir``; returns ``out_dir / "index.html"``.

    ``W_dec`` (d_sae, d_in) and ``W_U`` (d_model, d_vocab) are arrays or CPU tensors; with
    ``whitener`` (the SAE was trained on whitened activations) decoder rows are mapped back to the
    residual stream before the logit lens. ``cooccurrence_path``: a stored co-occurrence memmap
    (metric from ``cooccurrence_metric`` or the file name; otherwise counts come from the CSR).
    ``neighbours_path``: a stored ``*_indices.npy`` of decoder neighbours (else computed).
    ``similarity_path``: the stored similarity memmap the heatmap reads (else cosine of ``W_dec``).
    ``steering``: latent -> records ``{coefficient, concept_score, perplexity, distinct_fraction}``, shown as given.
    ``neuronpedia``: keyword arguments of :class:`~sae_core.browser.export.NeuronpediaWriter`
    (``model_id``, ``layer``, ``sae_set``, ...) to also write ``out_dir / "neuronpedia"``.
    """
    config, out_dir, started = config or BrowserConfig(), Path(out_dir), time.perf_counter()
    W_dec, W_U = as_host_array(W_dec, np.float32, "W_dec"), as_host_array(W_U, np.float32, "W_U")
    _check_inputs(csr, W_dec, W_U)
    vocab = vocab_strings(tokenizer, max(W_U.shape[1], int(np.max(csr.token_ids)) + 1))
    neighbours = decoder_neighbours(W_dec, config.n_neighbours, neighbours_path)
    jaccard, pmi = cooccurrence_neighbours(csr, config.n_neighbours, config.pmi_min_count, cooccurrence_path,
                                           cooccurrence_metric, progress)
    tables = _Tables(csr, residual_directions(W_dec, whitener), W_U, config, neighbours, jaccard, pmi,
                     {int(k): v for k, v in (steering or {}).items()})
    with Scratch(out_dir.parent) as scratch:
        staging = scratch / "site"
        (staging / DATA_DIR).mkdir(parents=True)
        writer = NeuronpediaWriter(staging / "neuronpedia", **neuronpedia) if neuronpedia else None
        sizes = partition_by_latent(csr, config.chunk_latents, scratch, config.nnz_block, progress)
        index = _write_chunks(staging, scratch, len(sizes), tables, vocab, W_dec, writer, progress)
        stats = {"count": np.asarray(index["count"]), "max": np.asarray(index["max"])}
        meta = {"title": title or f"Feature browser ({csr.meta.get('hook') or csr.folder.name})",
                "n_features": csr.n_features, "n_rows": csr.n_rows, "chunk_latents": config.chunk_latents,
                "n_chunks": len(sizes), "hook": csr.meta.get("hook"), "model": csr.meta.get("model"),
                "whitened": whitener is not None, "has_steering": bool(steering),
                "built_seconds": round(time.perf_counter() - started, 2)}
        _write_data(staging, f"{DATA_DIR}/meta.js", "meta", meta)
        _write_data(staging, f"{DATA_DIR}/vocab.js", "vocab", vocab)
        _write_data(staging, f"{DATA_DIR}/index.js", "index", {
            **index, "heatmap": _heatmap(W_dec, stats, neighbours, config.heatmap_latents, similarity_path)})
        assets = resources.files("sae_core.browser") / "assets"
        for name in ASSETS:
            atomic_write_text(staging / name, (assets / name).read_text(encoding="utf-8"))
        _publish(staging, out_dir)
    logger.info("wrote the feature browser of %d latents to %s in %.1f s", csr.n_features, out_dir,
                time.perf_counter() - started)
    return out_dir / "index.html"
