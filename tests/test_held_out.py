"""The analysis reads held-out windows drawn as training draws them (``sae_core.held_out``)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sae_core.held_out import analysis_loader
from sae_core.models import load_run_config
from sae_core.sae_folders import write_split
from sae_core.texts import DocumentSplit

SHORT, LONG = 24, 3  # documents of one window, and documents of many


def corpus() -> list[str]:
    short = [f"Short note {i}: the cat sat on mat number {i}." for i in range(SHORT)]
    long = [" ".join(f"Chapter {i} line {j} tells of rivers and hills." for j in range(40 + 25 * i)) for i in range(LONG)]
    return short + long


@pytest.fixture
def split_folder(tmp_path):
    texts = corpus()
    held_out = list(range(0, SHORT, 2)) + list(range(SHORT, SHORT + LONG))  # half the short ones, every long one
    train = [i for i in range(len(texts)) if i not in held_out]
    write_split(tmp_path, DocumentSplit(train, held_out, len(texts), DocumentSplit.of(texts, 1, 0).corpus_sha256, 0))
    return tmp_path, texts, held_out


def windows_by_document(loader) -> dict[int, int]:
    counts: dict[int, int] = {}
    for batch in loader:
        for doc in batch.doc_index.tolist():
            counts[doc] = counts.get(doc, 0) + 1
    return counts


@pytest.mark.parametrize("how", ["proportional", "one", "run_together"])
def test_analysis_windows_follow_training_windows_per_document(tiny_model, split_folder, how):
    """Every held-out window training would draw (counted from the tokenizer's own token counts), and
    only held-out documents: a long document gives ceil(tokens / room) windows when training draws
    in proportion to length, one when training draws one a document; in proportion to length, one
    document a row, when training runs documents together."""
    folder, texts, held_out = split_folder
    run = load_run_config("tiny_random", [f"training.windows_per_document={how}", "analysis.n_windows=100000"])
    loader, record = analysis_loader(tiny_model.tokenizer, texts, run, folder)
    room = run.windows.max_text_length - int(run.windows.prepend_bos)
    tokens = {d: len(tiny_model.tokenizer(texts[d], add_special_tokens=False)["input_ids"]) for d in held_out}
    expected = {d: (math.ceil(n / room) if how != "one" else 1) for d, n in tokens.items()}
    assert max(tokens.values()) > 10 * room  # the long documents span many windows
    assert windows_by_document(loader) == expected
    assert record["windows"] == record["windows_available"] == sum(expected.values())
    assert record["documents"] == held_out and record["documents_drawn"] == held_out
    bos = int(run.windows.prepend_bos)
    assert record["window_tokens"] == sum((min(n, room) + bos) * expected[d] for d, n in tokens.items())
    assert record["origin"].startswith(f"held out: the {len(held_out)} documents of") and record["windows_per_document"] == how.replace("run_together", "proportional")


def test_analysis_takes_a_seeded_sample_of_the_windows(tiny_model, split_folder):
    """``n_windows`` below what is available: that many windows, the same ones for the same seed,
    others for another seed, long documents in proportion to their windows (not one each)."""
    folder, texts, held_out = split_folder
    overrides = ["training.windows_per_document=proportional", "analysis.n_windows=20"]
    first = windows_by_document(analysis_loader(tiny_model.tokenizer, texts, load_run_config("tiny_random", overrides), folder)[0])
    again = windows_by_document(analysis_loader(tiny_model.tokenizer, texts, load_run_config("tiny_random", overrides), folder)[0])
    other_seed = load_run_config("tiny_random", [*overrides, "windows.seed=5"])
    other = windows_by_document(analysis_loader(tiny_model.tokenizer, texts, other_seed, folder)[0])
    assert sum(first.values()) == 20 and first == again and other != first
    assert set(first) <= set(held_out)
    long_windows = sum(n for d, n in first.items() if d >= SHORT)
    assert long_windows > LONG  # one window a document would give each long document at most one


def test_analysis_contexts_do_not_join_windows(tiny_model, tmp_path):
    """End to end with proportional, packed windows: every top example's context is one stretch of
    consecutive tokens of one document (two windows of a document packed side by side stay apart),
    and its tokens are the document's own tokens at those positions."""
    from sae_core import pipeline

    texts = corpus()  # nine held-out strata of three documents: the longest holds the three long ones
    run = load_run_config("tiny_random", ["training.windows_per_document=proportional", "evaluation.held_out_documents=9",
                                          "analysis.n_windows=64", "training.total_training_tokens=1024"])
    pipeline.train_saes(tiny_model, texts, run, tmp_path)
    analysis = pipeline.analyse(tiny_model, pipeline.load_saes(tiny_model, run, tmp_path), texts, run, tmp_path,
                                run.hook_points[0], browser=False)
    csr, checked = analysis.csr, 0
    ids = {d: tiny_model.tokenizer(texts[d], add_special_tokens=False)["input_ids"] for d in set(csr.doc_index.tolist())}
    for examples in analysis.examples.values():
        for ex in examples:
            start = ex.position - ex.focus
            assert list(ex.context_token_ids) == ids[ex.doc][start:start + len(ex.context_token_ids)]
            checked += 1
    assert checked > 0
    doc, position = np.asarray(csr.doc_index), np.asarray(csr.position)
    same_doc_jump = (doc[1:] == doc[:-1]) & (position[1:] != position[:-1] + 1)
    assert same_doc_jump.any()  # windows of one document do sit side by side here
