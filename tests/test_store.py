"""The activation store (sae_core.store): contents against independent forwards, resume, bad input."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from sae_core import files as store_files
from sae_core.config import LoaderConfig, StoreConfig, TextSourceConfig, TokenPolicy
from sae_core.data import WindowedTextDataset
from sae_core.loader import make_dataloader
from sae_core.store import (
    ActivationRun,
    ShardedRows,
    ShardWriter,
    list_runs,
    load_shard,
    save,
)

HOOK = "blocks.1.hook_resid_post"
SMALL = dict(batch_size=4, shard_size=64, max_text_length=24, progress=False)


@pytest.fixture(scope="module")
def texts(corpus_texts):
    return list(corpus_texts[:40])


def _hashes(run: ActivationRun) -> list[str]:
    return [hashlib.sha256((run.path / r.file).read_bytes()).hexdigest() for r in run.shards]


def test_stored_rows_equal_independent_forwards(tiny_model, texts, tmp_path):
    # windows of 24 tokens: the row at document position p is the window's own position p - start;
    # compare with the document's window run alone, unpadded.
    hooks = [HOOK, "blocks.0.hook_resid_pre"]
    run_id = save(tiny_model, hooks, texts, tmp_path, **SMALL)
    run = ActivationRun.open(tmp_path, run_id)
    assert run.hooks == hooks
    acts, ids, docs, pos = run.activations(HOOK), run.token_ids(), run.doc_index(), run.position()
    assert acts.shape == (len(run), tiny_model.cfg.d_model) == (len(ids), 32)
    rng = np.random.default_rng(0)
    tok = tiny_model.tokenizer
    for row in rng.choice(len(run), size=12, replace=False):
        doc, p = int(docs[row]), int(pos[row])
        full = tok(texts[doc], add_special_tokens=False)["input_ids"]
        start = int(pos[docs == doc].min())  # window start: the first text token (BOS rows are dropped)
        window = [tok.bos_token_id] + full[start:start + 23]  # the default prepends BOS
        with torch.no_grad():
            _, cache = tiny_model.run_with_cache(torch.tensor([window]), names_filter=lambda n: n in hooks)
        for hook in hooks:
            torch.testing.assert_close(run.activations(hook)[int(row)], cache[hook][0, p - start + 1],
                                       rtol=1e-5, atol=1e-5)
        assert int(ids[row]) == full[p]
        assert run.row_origin(int(row)) == (doc, p, full[p])
    # every non-special token of every document is there exactly once
    expected = {(d, s + i) for d in range(len(texts))
                for s in [int(pos[docs == d].min())] if (docs == d).any()
                for i in range(min(23, len(tok(texts[d], add_special_tokens=False)["input_ids"])))}  # BOS + 23
    got = list(zip(docs.tolist(), pos.tolist(), strict=True))
    assert len(got) == len(set(got)) and set(got) == expected
    assert run.activations("blocks.0.hook_resid_pre").shape == (len(run), 32)
    with pytest.raises(ValueError, match="several hooks"):
        run.activations()


def test_meta_and_shard_boundaries(tiny_model, texts, tmp_path):
    run_id = save(tiny_model, HOOK, texts, tmp_path, **SMALL)
    run = ActivationRun.open(tmp_path, run_id)
    meta = run.meta
    for key in ("model", "hooks", "d_model", "forward_dtype", "storage_dtype", "tokenizer", "token_policy",
                "bos_policy", "sample_count", "batch_count", "row_count", "token_count", "shards", "seed",
                "config", "package_version", "empty_text_count"):
        assert key in meta, key
    assert meta["complete"] and meta["sample_count"] == len(texts) and meta["batch_count"] == 10
    assert meta["row_count"] == len(run) == sum(r.rows for r in run.shards)
    assert meta["hooks"] == [HOOK] and meta["d_model"] == 32
    ends = [r.batches_end for r in run.shards]
    assert ends == sorted(ends) and ends[-1] == meta["batch_count"]
    assert all(r.rows >= 64 for r in run.shards[:-1]) and all(r.rows < 64 + 4 * 24 for r in run.shards)
    assert meta["token_count"] >= meta["row_count"]
    assert [r.run_id for r in list_runs(tmp_path)] == [run_id]
    run.verify()


def test_npz_format_and_storage_dtypes_hold_the_same_rows(tiny_model, texts, tmp_path):
    base = ActivationRun.open(tmp_path, save(tiny_model, HOOK, texts, tmp_path, **SMALL))
    reference = base.activations()[:]
    npz = ActivationRun.open(tmp_path, save(tiny_model, HOOK, texts, tmp_path, shard_format="npz", **SMALL))
    assert torch.equal(npz.activations()[:], reference)
    assert torch.equal(npz.position(), base.position()) and torch.equal(npz.doc_index(), base.doc_index())
    chunk = load_shard(npz.path / npz.shards[0].file)
    assert {"activations", "attention_mask", "token_ids"} <= set(chunk)
    assert chunk["activations"].dim() == 3 and int(chunk["attention_mask"].sum()) == npz.shards[0].rows
    for dtype in (torch.float16, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        run = ActivationRun.open(tmp_path, save(tiny_model, HOOK, texts, tmp_path, storage_dtype=name, **SMALL))
        got = run.activations()[:]
        assert got.dtype == dtype and torch.equal(got, reference.to(dtype))
    with pytest.raises(ValueError, match="bfloat16"):
        StoreConfig(shard_format="npz", storage_dtype="bfloat16")


def test_sharded_rows_indexing_against_concatenation(tmp_path):
    rng = np.random.default_rng(0)
    parts = [rng.normal(size=(n, 3)).astype(np.float32) for n in (5, 1, 7, 4)]
    rows = ShardedRows(parts, [len(p) for p in parts])
    full = torch.from_numpy(np.concatenate(parts))
    assert len(rows) == 17 and rows.shape == (17, 3)
    for key in (0, 16, -1, 5, slice(3, 14), slice(None), slice(2, 15, 3), [16, 0, 5, 5, 12], np.array([6, -2])):
        assert torch.equal(rows[key], full[torch.as_tensor(key) if not isinstance(key, (int, slice)) else key]), key
    with pytest.raises(IndexError):
        rows[17]


def test_positions_last_keeps_one_row_per_document(tiny_model, texts, tmp_path):
    run = ActivationRun.open(tmp_path, save(tiny_model, HOOK, texts, tmp_path, positions="last", **SMALL))
    assert sorted(run.doc_index().tolist()) == list(range(len(texts)))


def test_bos_policy_is_applied_and_recorded(tiny_model, texts, tmp_path):
    bos = tiny_model.tokenizer.bos_token_id
    kept = save(tiny_model, HOOK, texts, tmp_path, prepend_bos=True, policy=TokenPolicy(exclude_bos=False),
                **SMALL)
    dropped = save(tiny_model, HOOK, texts, tmp_path, prepend_bos=True, **SMALL)
    kept_run, dropped_run = ActivationRun.open(tmp_path, kept), ActivationRun.open(tmp_path, dropped)
    assert int((kept_run.token_ids() == bos).sum()) == len(texts)
    assert int((dropped_run.token_ids() == bos).sum()) == 0
    assert len(kept_run) == len(dropped_run) + len(texts)
    assert kept_run.meta["bos_policy"]["prepend_bos"] is True
    assert dropped_run.meta["token_policy"]["excluded_ids"] == TokenPolicy().excluded_ids(tiny_model.tokenizer)
    assert set(kept_run.position()[kept_run.token_ids() == bos].tolist()) == {-1}
    # a document's rows: BOS at -1, then its tokens from the window start, as in a BOS-prefixed forward
    tok = tiny_model.tokenizer
    for run in (kept_run, dropped_run):
        doc = int(run.doc_index()[0])
        rows = torch.nonzero(run.doc_index() == doc).flatten()
        positions = run.position()[rows].tolist()
        start = min(p for p in positions if p >= 0)
        window = [bos, *tok(texts[doc], add_special_tokens=False)["input_ids"][start:start + 23]]
        with torch.no_grad():
            _, cache = tiny_model.run_with_cache(torch.tensor([window]), names_filter=lambda n: n == HOOK)
        offsets = [0 if p == -1 else p - start + 1 for p in positions]
        assert run.token_ids()[rows].tolist() == [window[o] for o in offsets]
        torch.testing.assert_close(run.activations()[rows], cache[HOOK][0, offsets], rtol=1e-5, atol=1e-5)


def test_text_source_config_and_empty_texts_are_counted(tiny_model, tmp_path):
    docs = ("a first document", "", "third", "", "the fifth and last one")
    run = ActivationRun.open(tmp_path, save(tiny_model, HOOK, TextSourceConfig(source="list", texts=docs),
                                            tmp_path, **SMALL))
    assert run.meta["empty_text_count"] == 2 and run.meta["sample_count"] == 5
    assert set(run.doc_index().tolist()) == {0, 2, 4}
    with pytest.raises(ValueError, match="no activation rows"):
        save(tiny_model, HOOK, ["", ""], tmp_path, **SMALL)
    with pytest.raises(ValueError, match="empty"):
        save(tiny_model, HOOK, [], tmp_path, **SMALL)


def test_streaming_dataset_end_to_end(tiny_model, texts, tmp_path):
    import datasets

    stream = datasets.Dataset.from_dict({"text": texts}).to_iterable_dataset()
    streamed = ActivationRun.open(tmp_path, save(tiny_model, HOOK, stream, tmp_path, **SMALL))
    mapped = ActivationRun.open(tmp_path, save(tiny_model, HOOK, texts, tmp_path, **SMALL))

    def by_origin(run):
        order = np.lexsort((run.position().numpy(), run.doc_index().numpy()))
        return run.activations()[order], run.token_ids()[order]

    (a, ta), (b, tb) = by_origin(streamed), by_origin(mapped)
    assert torch.equal(ta, tb)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert streamed.meta["sample_count"] == len(texts)
    # an in-memory HF Dataset (random fingerprint) is recognised by content on resume
    for _ in range(2):
        hf_run = save(tiny_model, HOOK, datasets.Dataset.from_dict({"text": texts}), tmp_path, run_id="hf", **SMALL)
    assert _hashes(ActivationRun.open(tmp_path, hf_run)) == _hashes(mapped)


def test_bad_input_raises_clear_errors(tiny_model, texts, tmp_path):
    with pytest.raises(KeyError, match="closest valid names"):
        save(tiny_model, "blocks.1.hook_resid_pots", texts, tmp_path, **SMALL)
    with pytest.raises(ValueError, match="batch_size must be positive, got 0"):
        save(tiny_model, HOOK, texts, tmp_path, **{**SMALL, "batch_size": 0})
    with pytest.raises(ValueError, match="shard_size must be positive, got -1"):
        save(tiny_model, HOOK, texts, tmp_path, **{**SMALL, "shard_size": -1})
    with pytest.raises(ValueError, match="unknown key 'batchsize'; closest valid keys: batch_size"):
        save(tiny_model, HOOK, texts, tmp_path, **{**SMALL, "batchsize": 4})
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(PermissionError, match="writable"):
        save(tiny_model, HOOK, texts, blocker / "store", **SMALL)
    assert not list(tmp_path.glob("activations/*"))


def test_non_finite_activations_stop_the_run_and_keep_written_shards(tiny_model, texts, tmp_path):
    calls = {"n": 0}

    def poison_late(tensor, hook):  # the 6th forward pass goes wrong
        calls["n"] += 1
        return tensor * float("nan") if calls["n"] == 6 else tensor

    with tiny_model.hooks(fwd_hooks=[("blocks.0.hook_resid_mid", poison_late)]):
        with pytest.raises(FloatingPointError, match=r"blocks\.1\.hook_resid_post in batch 5"):
            save(tiny_model, HOOK, texts, tmp_path, run_id="nan", **SMALL)
    partial = ActivationRun(tmp_path / "activations" / "nan")
    assert not partial.meta["complete"] and partial.shards and partial.shards[-1].batches_end <= 5
    partial.verify()


def test_store_config_of_every_constant_file_shares_the_run_sections():
    from sae_core.models import known_models, load_run_config

    for name in known_models():
        run = load_run_config(name)
        assert isinstance(run.store, StoreConfig) and run.store.windows is run.windows, name
        assert run.store.windows.policy.exclude_bos and run.store.windows.prepend_bos, name


def test_resume_refuses_another_model_or_hook(tiny_model, texts, tmp_path):
    save(tiny_model, HOOK, texts, tmp_path, run_id="r", **SMALL)
    with pytest.raises(ValueError, match="hooks"):
        save(tiny_model, "blocks.0.hook_resid_post", texts, tmp_path, run_id="r", **SMALL)
    with pytest.raises(ValueError, match="batch_size"):
        save(tiny_model, HOOK, texts, tmp_path, run_id="r", **{**SMALL, "batch_size": 8})
    original = tiny_model.cfg.model_name
    try:
        tiny_model.cfg.model_name = "another-model"
        with pytest.raises(ValueError, match="model"):
            save(tiny_model, HOOK, texts, tmp_path, run_id="r", **SMALL)
    finally:
        tiny_model.cfg.model_name = original
    assert save(tiny_model, HOOK, texts, tmp_path, run_id="r", **SMALL) == "r"  # complete: nothing to do


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("where", ["before_write", "after_rename"])
def test_interrupted_run_resumes_to_the_same_shards(tiny_model, texts, tmp_path, monkeypatch, where):
    reference = ActivationRun.open(tmp_path, save(tiny_model, HOOK, texts, tmp_path, run_id="full", **SMALL))
    calls = {"n": 0}
    if where == "before_write":
        original = ShardWriter.write

        def failing(self, *args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 3:
                raise Interrupt
            return original(self, *args, **kwargs)

        monkeypatch.setattr(ShardWriter, "write", failing)
    else:  # the shard file is renamed into place, but the process dies before listing it
        original_save = ShardWriter._save

        def failing_save(self):
            if len(self._shards) == 3:
                raise Interrupt
            return original_save(self)

        monkeypatch.setattr(ShardWriter, "_save", failing_save)
    with pytest.raises(Interrupt):
        save(tiny_model, HOOK, texts, tmp_path, run_id="cut", **SMALL)
    monkeypatch.undo()
    partial = ActivationRun(tmp_path / "activations" / "cut")
    assert len(partial.shards) == 2 and not partial.meta["complete"]
    save(tiny_model, HOOK, texts, tmp_path, run_id="cut", **SMALL)
    resumed = ActivationRun.open(tmp_path, "cut")
    assert _hashes(resumed) == _hashes(reference)
    assert [r.batches_end for r in resumed.shards] == [r.batches_end for r in reference.shards]
    for key in ("sample_count", "batch_count", "row_count", "token_count"):
        assert resumed.meta[key] == reference.meta[key], key
    assert sorted(p.name for p in resumed.path.iterdir()) == sorted(p.name for p in reference.path.iterdir())


CHILD = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from sae_core import store
    from sae_core.corpora import fortunes_corpus
    from sae_core.store import shards
    from sae_core.model_loading import load_model

    out, signal_file = Path(sys.argv[1]), Path(sys.argv[2])
    real = shards.WRITERS["safetensors"]
    calls = [0]

    def slow_write(tensors, path):
        calls[0] += 1
        if calls[0] == 3:  # write half of the third shard, then hang until killed
            real(tensors, path)
            data = Path(path).read_bytes()
            Path(path).write_bytes(data[: len(data) // 2])
            signal_file.write_text("mid-write")
            time.sleep(600)
        return real(tensors, path)

    shards.WRITERS["safetensors"] = slow_write
    model = load_model("tiny_random")
    store.save(model, "blocks.1.hook_resid_post", fortunes_corpus()[:40], out, run_id="killed",
               batch_size=4, shard_size=64, max_text_length=24, progress=False)
""")


@pytest.mark.slow  # a subprocess (cold interpreter + imports)
def test_kill_9_in_the_middle_of_a_shard_write_then_resume(tiny_model, texts, tmp_path):
    from _subprocess import kill_9_when_signalled

    reference = ActivationRun.open(tmp_path, save(tiny_model, HOOK, texts, tmp_path, run_id="full", **SMALL))
    signal_file = tmp_path / "signal"
    kill_9_when_signalled(CHILD, [str(tmp_path), str(signal_file)], signal_file, "the third shard", timeout_s=120)
    run_dir = tmp_path / "activations" / "killed"
    assert any(p.name.endswith(".tmp") for p in run_dir.iterdir())  # the half-written shard
    assert len(ActivationRun(run_dir).shards) == 2
    save(tiny_model, HOOK, texts, tmp_path, run_id="killed", **SMALL)
    resumed = ActivationRun(run_dir)
    assert _hashes(resumed) == _hashes(reference)
    assert not any(p.name.endswith(".tmp") for p in run_dir.iterdir())


def test_corrupted_or_truncated_shards_are_named(tiny_model, texts, tmp_path):
    save(tiny_model, HOOK, texts, tmp_path, run_id="r", **{**SMALL, "shard_size": 10_000})
    save(tiny_model, HOOK, texts, tmp_path, run_id="s", **SMALL)
    shard = tmp_path / "activations" / "s" / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    shard.write_bytes(bytes(data[:-100]))
    with pytest.raises(ValueError, match="shard-00001.safetensors"):
        ActivationRun.open(tmp_path, "s")
    with pytest.raises(ValueError, match="shard-00001.safetensors"):
        save(tiny_model, HOOK, texts, tmp_path, run_id="s", **SMALL)
    data[-5] ^= 0xFF  # same size, flipped bits: caught by the hash on resume and verify()
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="shard-00001.safetensors.*SHA-256"):
        ActivationRun.open(tmp_path, "s").verify()
    with pytest.raises(ValueError, match="shard-00001.safetensors"):
        ShardWriter(shard.parent, ActivationRun.open(tmp_path, "s").meta["identity"])
    shard.unlink()
    with pytest.raises(FileNotFoundError, match="shard-00001.safetensors"):
        ActivationRun.open(tmp_path, "s")
    with pytest.raises(FileNotFoundError, match="runs"):
        ActivationRun.open(tmp_path, "nope")


def test_shard_writer_npz_chunks_for_two_pass_extraction(tmp_path):
    rng = np.random.default_rng(0)
    writer = ShardWriter(tmp_path / "chunks", {"purpose": "whitened"}, shard_format="npz", float_dtype="float16")
    chunks = []
    for batch in range(3):
        chunk = {"activations": rng.normal(size=(2, 5, 4)).astype(np.float32),
                 "attention_mask": (rng.random((2, 5)) > 0.3).astype(np.int64),
                 "token_ids": rng.integers(0, 100, (2, 5))}
        chunks.append(chunk)
        writer.write(chunk, batches_end=batch + 1, counts={"tokens": int(chunk["attention_mask"].sum())},
                     rows=int(chunk["attention_mask"].sum()))
    (tmp_path / "chunks" / "shard-00007.npz").write_bytes(b"orphan")
    (tmp_path / "chunks" / ".shard-00003.npz.x.tmp").write_bytes(b"temp")
    # a newer writer in this process takes the run over from ``writer`` (left alive, as after an exception)
    again = ShardWriter(tmp_path / "chunks", {"purpose": "whitened"}, shard_format="npz", float_dtype="float16")
    with pytest.raises(RuntimeError, match="replaced"):
        writer.write(chunks[0], batches_end=4)
    assert again.resumed and again.batches_done == 3 and len(again.shards) == 3
    assert sorted(p.name for p in (tmp_path / "chunks").iterdir() if p.name != ".writer-r0.lock") == [
        "meta.json", "shard-00000.npz", "shard-00001.npz", "shard-00002.npz"]
    assert again.totals()["tokens"] == sum(int(c["attention_mask"].sum()) for c in chunks)
    for record, chunk in zip(again.shards, chunks, strict=True):
        got = load_shard(tmp_path / "chunks" / record.file)
        assert got["activations"].dtype == torch.float16
        np.testing.assert_array_equal(got["activations"].numpy(), chunk["activations"].astype(np.float16))
        np.testing.assert_array_equal(got["token_ids"].numpy(), chunk["token_ids"])
    again.finish(note="done")
    with pytest.raises(RuntimeError, match="complete"):
        again.write(chunks[0], batches_end=4)
    assert store_files.read_json(tmp_path / "chunks" / "meta.json")["note"] == "done"
    assert not (tmp_path / "chunks" / ".writer-r0.lock").exists()


@pytest.mark.slow
@pytest.mark.parametrize("pack_windows,compile_forward", [(False, False), (True, False), (True, True)])
def test_stored_activations_equal_an_hf_forward_hook(smollm2, smollm2_hf, corpus_texts, tmp_path, pack_windows,
                                                     compile_forward):
    layer = 10
    hook = f"blocks.{layer}.hook_resid_post"
    docs = list(corpus_texts[:6]) + sorted(corpus_texts[6:100], key=len)[:6]  # long ones, and short ones to pack
    if pack_windows:  # short windows do share rows
        rows = sum(b.input_ids.shape[0] for b in make_dataloader(
            WindowedTextDataset(docs, smollm2.tokenizer, 64), LoaderConfig(batch_size=4, pack_windows=True)))
        assert rows < len(docs)
    run = ActivationRun.open(tmp_path, save(smollm2, hook, docs, tmp_path, batch_size=4, shard_size=128,
                                            max_text_length=64, dtype="float32", progress=False,
                                            pack_windows=pack_windows, compile=compile_forward))
    if compile_forward:  # the compiled forward did run (it falls back to the eager one when it cannot)
        from sae_core.activations import compiled_forward

        assert compiled_forward(smollm2).compiled_calls > 0 and compiled_forward(smollm2).disabled is None
    acts, ids, doc_index, position = run.activations(), run.token_ids(), run.doc_index(), run.position()
    tok = smollm2.tokenizer
    special = set(tok.all_special_ids)
    captured = {}
    handle = smollm2_hf.model.layers[layer].register_forward_hook(
        lambda module, args, output: captured.__setitem__("x", output[0] if isinstance(output, tuple) else output))
    try:
        for doc, text in enumerate(docs):
            full = tok(text, add_special_tokens=False)["input_ids"]
            rows = torch.nonzero(doc_index == doc).flatten()
            start = int(position[rows].min())
            window = [tok.bos_token_id] + full[start:start + 63]  # the default prepends BOS, as the model saw it
            with torch.no_grad():
                smollm2_hf(torch.tensor([window]))
            reference = captured["x"][0]
            keep = [p for p, t in enumerate(window) if t not in special]  # the BOS row is dropped
            assert position[rows].tolist() == [start + p - 1 for p in keep]
            assert ids[rows].tolist() == [window[p] for p in keep]
            # to 1e-4 of each row's scale: every SmolLM2 residual row holds one entry of ~40-110 (a
            # massive-activation dimension), where float32 rounding through 11 layers reaches a few 1e-4
            error = (acts[rows] - reference[keep]).abs().amax(dim=-1)
            scale = reference[keep].abs().amax(dim=-1)
            assert bool((error <= 1e-4 * scale).all()), f"document {doc}: {(error / scale).max():.2e}"
    finally:
        handle.remove()


def test_shard_writer_safetensors_blocks_read_back_with_safetensors(tmp_path):
    from safetensors import safe_open

    from sae_core.store import memmap_tensors

    blocks = [torch.randn(3, 5), torch.randn(0, 5), torch.randn(4, 5)]
    ids = [torch.arange(3), torch.arange(0), torch.arange(4)]
    writer = ShardWriter(tmp_path / "run", {"k": 1})
    record = writer.write({"acts": [b.to(torch.bfloat16) for b in blocks], "ids": ids, "flag": torch.tensor([True])},
                          batches_end=1)
    path = tmp_path / "run" / record.file
    with safe_open(str(path), framework="pt") as fh:  # the library's own reader is the reference
        assert torch.equal(fh.get_tensor("acts"), torch.cat(blocks).to(torch.bfloat16))
        assert torch.equal(fh.get_tensor("ids"), torch.cat(ids))
        assert fh.get_tensor("flag").tolist() == [True]
    assert record.rows == 7 and record.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    mapped, view = memmap_tensors(path)["acts"]
    assert isinstance(mapped, np.memmap) and view == torch.bfloat16
    assert torch.equal(ShardedRows([mapped], [7], view)[:], torch.cat(blocks).to(torch.bfloat16))


@pytest.mark.parametrize("pack", [False, True])
def test_token_budget_batches_hold_the_same_rows_and_resume(tiny_model, texts, corpus_texts, tmp_path, monkeypatch,
                                                            pack):
    small = {**SMALL, "max_text_length": 48} if pack else SMALL
    if pack:  # short documents too, so that windows do share rows
        texts = texts[:20] + sorted(corpus_texts, key=len)[:20]
        rows = sum(b.input_ids.shape[0] for b in make_dataloader(
            WindowedTextDataset(texts, tiny_model.tokenizer, 48),
            LoaderConfig(batch_size=4, batch_tokens=192, pack_windows=True)))
        assert rows < len(texts)
    by_windows = ActivationRun.open(tmp_path, save(tiny_model, HOOK, texts, tmp_path, **small))
    budget = {**small, "batch_tokens": 4 * small["max_text_length"], "pack_windows": pack}
    full = ActivationRun.open(tmp_path, save(tiny_model, HOOK, texts, tmp_path, run_id="tok", **budget))
    order_a = np.lexsort((by_windows.position().numpy(), by_windows.doc_index().numpy()))
    order_b = np.lexsort((full.position().numpy(), full.doc_index().numpy()))
    assert torch.equal(by_windows.token_ids()[order_a], full.token_ids()[order_b])
    torch.testing.assert_close(by_windows.activations()[order_a], full.activations()[order_b], rtol=1e-5, atol=1e-5)
    original, calls = ShardWriter.write, {"n": 0}

    def failing(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise Interrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ShardWriter, "write", failing)
    with pytest.raises(Interrupt):
        save(tiny_model, HOOK, texts, tmp_path, run_id="tok-cut", **budget)
    monkeypatch.undo()
    assert len(ActivationRun(tmp_path / "activations" / "tok-cut").shards) == 1  # one shard survived the cut
    resumed = ActivationRun.open(tmp_path, save(tiny_model, HOOK, texts, tmp_path, run_id="tok-cut", **budget))
    assert _hashes(resumed) == _hashes(full)
    for key in ("sample_count", "batch_count", "row_count", "token_count"):
        assert resumed.meta[key] == full.meta[key], key


@pytest.mark.slow  # a subprocess (cold interpreter + imports)
def test_a_run_written_by_another_process_is_refused(tmp_path):
    code = ("import sys, time\n"
            "from sae_core.store import ShardWriter\n"
            "w = ShardWriter(sys.argv[1], {'k': 1})\n"
            "print('locked', flush=True)\n"
            "time.sleep(600)\n")
    child = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "run")], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(RuntimeError, match="another process"):
            ShardWriter(tmp_path / "run", {"k": 1})
    finally:
        child.kill()
        child.wait()
    with ShardWriter(tmp_path / "run", {"k": 1}) as writer:  # the lock died with the process
        assert writer.resumed
