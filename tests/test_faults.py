"""Nothing silent: bad inputs, mismatched resumes and damaged files are clear errors (issue 19).

Each test asserts the error type, that the message names the problem and the fix, and that what
was already written is unchanged (the bytes of every file of the run / checkpoint). The fault
injection test at the end corrupts every kind of artifact in several ways and checks that each
read either raises or returns exactly the values of the undamaged artifact (the reference).
Everything runs on the tiny random model or synthetic rows; loops that used to hang run under
pytest-timeout so that a regression fails instead of hanging.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sae_core.checks import model_fingerprint
from sae_core.config import TrainingConfig, build_flat, to_json
from sae_core.latents import CSRBuilder, LatentCSR
from sae_core.sae_folders import load_sae_folder, write_sae_folder
from sae_core.store import ActivationRun, ShardWriter, save
from sae_core.training import build_training_sae, train_from_activations, train_from_model
from sae_core.training import state as training_state
from sae_core.training.sources import BlockShuffler
from sae_core.whitening import IncrementalWhitener, Whitener, statistics_from_run

HOOK = "blocks.1.hook_resid_post"
SMALL = dict(batch_size=4, shard_size=64, max_text_length=24, progress=False)


class Interrupt(Exception):
    pass


def _snapshot(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under ``folder`` (what must survive a refused call unchanged)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.endswith(".lock")}


def _chunks(n: int = 12, rows: int = 64, d: int = 16, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, d, generator=gen) + 1.0 for _ in range(n)]


def _cfg(**overrides) -> TrainingConfig:
    base = dict(hook_points=(HOOK,), d_sae=32, k=4, lr=1e-2, total_training_tokens=64 * 10,
                train_batch_size_tokens=64, shuffle_buffer_tokens=128, checkpoint_every_tokens=128,
                log_every_steps=1, lr_decay_fraction=0.0, dead_window_tokens=512, sae_dtype="float32")
    return build_flat(TrainingConfig, "training", **{**base, **overrides})


def _model_cfg(**overrides) -> TrainingConfig:
    base = dict(hook_points=(HOOK,), d_sae=64, k=4, total_training_tokens=128 * 6, train_batch_size_tokens=128,
                shuffle_buffer_tokens=256, max_text_length=32, batch_tokens=256, held_out_documents=4,
                dtype="float32", checkpoint_every_tokens=256, log_every_steps=1)
    return build_flat(TrainingConfig, "training", **{**base, **overrides})


def _interrupt_step(monkeypatch, at: int) -> None:
    original, calls = training_state.SAEState.step, {"n": 0}

    def step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == at:
            raise Interrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(training_state.SAEState, "step", step)


@pytest.fixture(scope="module")
def texts(corpus_texts):
    return list(corpus_texts[:40])


@pytest.fixture(scope="module")
def other_model(tiny_model):
    """Same name, width and depth as ``tiny_model``; one weight matrix differs."""
    model = copy.deepcopy(tiny_model)
    with torch.no_grad():
        model.blocks[0].attn.W_Q.mul_(1.01)
    return model


@pytest.fixture(scope="module")
def bf16_model(tiny_model):
    """The same weights as ``tiny_model`` in bfloat16."""
    return copy.deepcopy(tiny_model).to(torch.bfloat16)


# --- hang -----------------------------------------------------------------------------------------

@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["empty strings", "only special tokens"])
def test_texts_without_a_kept_row_raise_instead_of_hanging(tiny_model, tmp_path, kind):
    special = tiny_model.tokenizer.eos_token
    texts = [""] * 12 if kind == "empty strings" else [special * 3] * 12
    with pytest.raises(ValueError, match="whole epoch.*no activation rows.*(give texts|exclude_special_tokens=False)"):
        train_from_model(tiny_model, texts, _model_cfg(), tmp_path)
    assert not (tmp_path / HOOK).exists()


@pytest.mark.timeout(60)
def test_activation_chunks_without_rows_raise_instead_of_hanging(tmp_path):
    empty = [torch.zeros(0, 16) for _ in range(3)]
    with pytest.raises(ValueError, match="no rows.*check the run"):
        train_from_activations(lambda: empty, _cfg(), tmp_path)
    assert not (tmp_path / HOOK).exists()


# --- identity of resumable artifacts ----------------------------------------------------------------

def test_fingerprint_tells_models_of_one_name_apart(tiny_model, other_model, bf16_model):
    prints = [model_fingerprint(m) for m in (tiny_model, other_model, bf16_model)]
    assert prints[0] == model_fingerprint(copy.deepcopy(tiny_model))
    assert prints[0]["weights_sha256"] != prints[1]["weights_sha256"]
    assert prints[0]["dtype"] == "float32" and prints[2]["dtype"] == "bfloat16"


def _cut_run(model, texts, tmp_path, monkeypatch, run_id="r", at=3):
    original, calls = ShardWriter.write, {"n": 0}

    def write(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == at:
            raise Interrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ShardWriter, "write", write)
    with pytest.raises(Interrupt):
        save(model, HOOK, texts, tmp_path, run_id=run_id, **SMALL)
    monkeypatch.undo()
    return tmp_path / "activations" / run_id


@pytest.mark.parametrize("which", ["other weights", "bfloat16"])
def test_store_resume_refuses_a_model_of_the_same_name(tiny_model, other_model, bf16_model, texts, tmp_path,
                                                       monkeypatch, which):
    run_dir = _cut_run(tiny_model, texts, tmp_path, monkeypatch)
    before = _snapshot(run_dir)
    model = other_model if which == "other weights" else bf16_model
    with pytest.raises(ValueError, match="cannot resume run r.*model_fingerprint.*new run_id"):
        save(model, HOOK, texts, tmp_path, run_id="r", **SMALL)
    assert _snapshot(run_dir) == before


@pytest.mark.parametrize("change", ["other", "fewer"])
def test_store_resume_refuses_other_texts(tiny_model, texts, tmp_path, monkeypatch, change):
    run_dir = _cut_run(tiny_model, texts, tmp_path, monkeypatch)
    before = _snapshot(run_dir)
    new = [texts[0] + " changed", *texts[1:]] if change == "other" else texts[:-1]
    key = "dataset.sha256" if change == "other" else "dataset.n_documents"
    with pytest.raises(ValueError, match=f"cannot resume run r.*{key}.*new run_id"):
        save(tiny_model, HOOK, new, tmp_path, run_id="r", **SMALL)
    assert _snapshot(run_dir) == before


def test_streamed_texts_are_digested_and_checked_on_resume(tiny_model, texts, tmp_path, monkeypatch):
    full = ActivationRun.open(tmp_path, save(tiny_model, HOOK, (t for t in texts), tmp_path, run_id="full", **SMALL))
    run_dir = _cut_run(tiny_model, (t for t in texts), tmp_path, monkeypatch, run_id="s")
    before = _snapshot(run_dir)
    other = (texts[-1] if i == 1 else t for i, t in enumerate(texts))  # (a change outside every window is none)
    with pytest.raises(ValueError, match="cannot resume run s.*differ.*same texts in the same order.*new run_id"):
        save(tiny_model, HOOK, other, tmp_path, run_id="s", **SMALL)
    assert _snapshot(run_dir) == before
    with pytest.raises(ValueError, match="stream ended after .* batches.*new run_id"):
        save(tiny_model, HOOK, (t for t in texts[:4]), tmp_path, run_id="s", **SMALL)
    assert _snapshot(run_dir) == before
    save(tiny_model, HOOK, (t for t in texts), tmp_path, run_id="s", **SMALL)  # the same stream resumes
    resumed = ActivationRun(run_dir)
    assert [r.sha256 for r in resumed.shards] == [r.sha256 for r in full.shards]


def _cut_training(model, texts, tmp_path, monkeypatch):
    _interrupt_step(monkeypatch, at=5)  # after the checkpoint at step 4
    with pytest.raises(Interrupt):
        train_from_model(model, texts, _model_cfg(), tmp_path)
    monkeypatch.undo()
    checkpoints = tmp_path / "checkpoints"
    assert (checkpoints / HOOK / "latest.json").exists()
    return checkpoints


@pytest.mark.parametrize("change", ["other weights", "bfloat16", "other texts", "fewer texts"])
def test_training_resume_refuses_another_model_or_texts(tiny_model, other_model, bf16_model, corpus_texts, tmp_path,
                                                        monkeypatch, change):
    texts = list(corpus_texts[:48])
    checkpoints = _cut_training(tiny_model, texts, tmp_path, monkeypatch)
    before = _snapshot(checkpoints)
    model = {"other weights": other_model, "bfloat16": bf16_model}.get(change, tiny_model)
    new = {"other texts": [texts[0] + " changed", *texts[1:]], "fewer texts": texts[:-1]}.get(change, texts)
    key = "texts" if "texts" in change else "model_fingerprint"
    with pytest.raises(ValueError, match=f"other inputs or settings.*identity.{key}.*delete the checkpoint folder"):
        train_from_model(model, new, _model_cfg(), tmp_path)
    assert _snapshot(checkpoints) == before
    train_from_model(tiny_model, texts, _model_cfg(), tmp_path)  # the original inputs still resume
    assert (tmp_path / HOOK / "cfg.json").exists()


@pytest.mark.parametrize("change", ["other rows", "fewer chunks"])
def test_training_resume_refuses_another_activation_stream(tmp_path, monkeypatch, change):
    chunks = _chunks()
    _interrupt_step(monkeypatch, at=6)
    with pytest.raises(Interrupt):
        train_from_activations(lambda: chunks, _cfg(), tmp_path)
    monkeypatch.undo()
    before = _snapshot(tmp_path / "checkpoints")
    new = _chunks(seed=1) if change == "other rows" else chunks[:2]
    with pytest.raises(ValueError, match="cannot resume training.*differ.*delete the checkpoint folder"):
        train_from_activations(lambda: new, _cfg(), tmp_path)
    assert _snapshot(tmp_path / "checkpoints") == before
    assert not (tmp_path / HOOK).exists()
    straight = train_from_activations(lambda: chunks, _cfg(), tmp_path / "straight")
    resumed = train_from_activations(lambda: chunks, _cfg(), tmp_path)  # the same rows resume exactly
    for name, value in straight.saes[HOOK].sae.state_dict().items():
        assert torch.equal(value, resumed.saes[HOOK].sae.state_dict()[name]), name


# --- reads check what they read -----------------------------------------------------------------

@pytest.fixture
def run_dir(tiny_model, texts, tmp_path):
    return tmp_path / "activations" / save(tiny_model, HOOK, texts, tmp_path, run_id="r", **SMALL)


def _edit_meta(run_dir: Path, edit) -> None:
    meta = json.loads((run_dir / "meta.json").read_text())
    edit(meta)
    (run_dir / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize(("edit", "message"), [
    (lambda m: m["shards"][1].update(rows=m["shards"][1]["rows"] + 1), "shard-00001.*rows.*records"),
    (lambda m: m.update(storage_dtype="float16"), "shard-00000.*F32.*float16"),
    (lambda m: m["shards"].reverse(), "out of order"),
    (lambda m: m["shards"][0].update(file=m["shards"][1]["file"]), "shard 0 .*shard-00001|out of order"),
    (lambda m: m.update(row_count=m["row_count"] + 5), "row_count"),
    (lambda m: m.clear(), "meta.json lacks"),
])
def test_metadata_that_disagrees_with_the_shards_is_refused(run_dir, edit, message):
    _edit_meta(run_dir, edit)
    with pytest.raises(ValueError, match=message) as err:
        ActivationRun(run_dir)
    assert "restore" in str(err.value) or "delete the run" in str(err.value)


def test_a_flipped_byte_is_caught_before_any_value_is_returned(run_dir):
    reference = ActivationRun(run_dir).activations()[:]
    shard = run_dir / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x40  # inside the activations
    shard.write_bytes(bytes(data))
    run = ActivationRun(run_dir)  # opening reads no data
    for read in (lambda: run.activations()[:], lambda: list(run.iter_shards()), run.verify):
        with pytest.raises(ValueError, match="shard-00001.safetensors.*SHA-256"):
            read()
    unchecked = ActivationRun(run_dir, check_hashes=False).activations()[:]  # the documented opt-out
    assert not torch.equal(unchecked, reference)


def test_an_interrupted_run_warns_and_its_statistics_are_refused(tiny_model, texts, tmp_path, monkeypatch, caplog):
    run_dir = _cut_run(tiny_model, texts, tmp_path, monkeypatch)
    (run_dir / ".meta.json.abc123.tmp").write_text("{")  # a meta.json write cut short
    with caplog.at_level("WARNING"):
        ActivationRun(run_dir)
    assert "incomplete" in caplog.text and "resume it" in caplog.text
    with pytest.raises(ValueError, match="interrupted.*resume the extraction first.*allow_incomplete=True"):
        statistics_from_run(run_dir)
    assert statistics_from_run(run_dir, allow_incomplete=True).n == len(ActivationRun(run_dir))
    save(tiny_model, HOOK, texts, tmp_path, run_id="r", **SMALL)
    assert not list(run_dir.glob(".meta.json.*.tmp"))  # cleaned on resume


# --- finite numbers or an error ------------------------------------------------------------------

@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e30])
def test_non_finite_or_huge_rows_stop_training_naming_hook_and_step(tmp_path, bad):
    chunks = _chunks()
    chunks[7] = chunks[7].clone()
    chunks[7][5, 3] = bad
    with pytest.raises(FloatingPointError, match=f"{HOOK}.*step \\d+") as err:
        train_from_activations(lambda: chunks, _cfg(shuffle_buffer_tokens=0), tmp_path)
    assert "fix or drop" in str(err.value) or "scale or whiten" in str(err.value)
    assert "Checkpoints are unchanged" in str(err.value) or "checkpoints are unchanged" in str(err.value)
    assert not (tmp_path / HOOK).exists()
    latest = json.loads((tmp_path / "checkpoints" / HOOK / "latest.json").read_text())
    assert latest["step"] < 7 and not latest["complete"]  # the last good checkpoint is kept


def test_infinite_lr_is_refused_and_a_huge_one_stops_at_the_first_update(tmp_path):
    with pytest.raises(ValueError, match="lr must be finite and positive, got inf"):
        _cfg(lr=float("inf"))
    with pytest.raises(FloatingPointError, match=f"parameters of the SAE for {HOOK}.*step 0.*lower lr"):
        train_from_activations(lambda: _chunks(), _cfg(lr=1e38), tmp_path)
    assert not (tmp_path / HOOK).exists()


def test_whitening_update_refuses_non_finite_rows_and_keeps_its_statistics():
    stats = IncrementalWhitener(4)
    stats.update(torch.randn(10, 4))
    n, mean, m2 = stats.n, stats.mean.clone(), stats.m2.clone()
    rows = torch.randn(6, 4)
    rows[2, 1] = float("nan")
    with pytest.raises(FloatingPointError, match="1 of 6 rows.*row 2.*unchanged.*fix or drop"):
        stats.update(rows)
    assert stats.n == n and torch.equal(stats.mean, mean) and torch.equal(stats.m2, m2)


def test_a_saved_sae_with_non_finite_weights_is_refused(tmp_path):
    sae = build_training_sae(_cfg(), 16, HOOK, 0)
    inference = training_state.to_inference_sae(sae)
    with torch.no_grad():
        inference.W_dec[3, 2] = float("nan")
    write_sae_folder(inference, tmp_path / "sae")
    with pytest.raises(ValueError, match="sae_weights.safetensors.*W_dec.*non-finite.*train / save the SAE again"):
        load_sae_folder(tmp_path / "sae", "cpu")


@pytest.fixture(scope="module")
def steering(tiny_model):
    from sae_core.saes import SAEManager
    from sae_core.steering import ModelSteering

    manager = SAEManager(tiny_model)
    manager.add(HOOK, training_state.to_inference_sae(build_training_sae(_cfg(), 32, HOOK, 0)))
    return ModelSteering(tiny_model, manager)


@pytest.mark.parametrize("coefficient", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_steering_coefficients_are_refused(steering, coefficient):
    with pytest.raises(ValueError, match="coefficient.*finite number"):
        steering.steer(HOOK, 0, coefficient)
    assert steering.active_steers == []


def test_steering_layer_out_of_range_lists_the_valid_range(steering):
    with pytest.raises(IndexError, match="layer 5 is out of range.*0..1"):
        steering.steer(5, 0, 1.0)
    assert steering.steer(-1, 0, 1.0).steers[0].hook == HOOK  # -1 is the last layer, by design
    steering.clear_steering()


def test_steering_positions_outside_every_prompt_are_an_error(steering):
    from sae_core.steering import Steer

    with pytest.raises(ValueError, match="positions \\[50\\].*0..\\d+.*more max_new_tokens"):
        steering.generate_with_steering("Hello there", [Steer(HOOK, 0, 4.0, positions=(50,))], max_new_tokens=3)
    with steering.steer(HOOK, 0, 4.0, positions=[50]), pytest.raises(ValueError, match="positions \\[50\\]"):
        steering.model(steering.model.to_tokens("Hello there"))
    assert steering.active_steers == []


# --- errors from inside dependencies, caught at the stage entry ------------------------------------

def test_k_above_d_sae_is_refused_before_any_step(tmp_path):
    with pytest.raises(ValueError, match=r"k \(40\) must not exceed d_sae \(32\)"):
        _cfg(k=40)
    # d_sae from the hook's width (16 x 2): only the training entry can check it
    with pytest.raises(ValueError, match="k=40 .*d_sae=32.*set 1 <= k <= 32"):
        train_from_activations(lambda: _chunks(), _cfg(k=40, d_sae=None, expansion_factor=2.0), tmp_path)
    assert not (tmp_path / "checkpoints").exists()


def test_windows_longer_than_the_context_are_refused(tiny_model, texts, tmp_path):
    n_ctx = tiny_model.cfg.n_ctx
    with pytest.raises(ValueError, match=f"max_text_length={n_ctx + 1} exceeds.*set max_text_length <= {n_ctx}"):
        save(tiny_model, HOOK, texts, tmp_path, run_id="long", **{**SMALL, "max_text_length": n_ctx + 1})
    with pytest.raises(ValueError, match=f"max_text_length={n_ctx + 1} exceeds"):
        train_from_model(tiny_model, texts, _model_cfg(max_text_length=n_ctx + 1), tmp_path)
    assert not (tmp_path / "activations" / "long").exists() and not (tmp_path / "checkpoints").exists()


def test_store_positions_outside_every_window_are_refused(tiny_model, texts, tmp_path):
    with pytest.raises(ValueError, match="positions \\[30\\] fall outside every window.*-24..23"):
        save(tiny_model, HOOK, texts, tmp_path, run_id="p", positions=(0, 30), **SMALL)


@pytest.mark.parametrize("bad", [3, None, {"body": "x"}])
def test_a_text_that_is_not_a_str_is_named(tiny_model, texts, tmp_path, bad):
    broken = [texts[0], bad, *texts[2:]]
    with pytest.raises(TypeError, match="text 1 is .*not a str; give a list of strings"):
        save(tiny_model, HOOK, broken, tmp_path, run_id="t", **SMALL)
    with pytest.raises(TypeError, match="text 1 is"):
        train_from_model(tiny_model, broken, _model_cfg(), tmp_path)


def test_zero_batch_size_is_a_config_error_not_a_zero_division():
    with pytest.raises(ValueError, match="train_batch_size_tokens must be positive, got 0"):
        _cfg(train_batch_size_tokens=0)


# --- the training lock ----------------------------------------------------------------------------

def test_a_second_training_into_one_folder_is_refused(tmp_path, monkeypatch):
    chunks = _chunks()
    original, seen = training_state.SAEState.step, []

    def step(self, *args, **kwargs):  # while the first training runs, start a second one into the same folder
        if not seen:
            seen.append(1)
            with pytest.raises(RuntimeError, match="being trained into by another training.*wait for it"):
                train_from_activations(lambda: chunks, _cfg(), tmp_path)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(training_state.SAEState, "step", step)
    train_from_activations(lambda: chunks, _cfg(), tmp_path)
    assert seen and (tmp_path / HOOK / "cfg.json").exists()

    code = ("import fcntl, sys, time\n"  # another process holds the lock (plain flock, not our code)
            "fh = open(sys.argv[1], 'w'); fcntl.flock(fh, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(600)")
    (tmp_path / "b").mkdir()
    child = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "b" / ".training.lock")],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(RuntimeError, match="another training"):
            train_from_activations(lambda: chunks, _cfg(), tmp_path / "b")
    finally:
        child.kill()
        child.wait()
    train_from_activations(lambda: chunks, _cfg(), tmp_path / "b")  # the lock died with the process


def test_leftover_temp_files_of_a_checkpoint_are_cleaned_on_resume(tmp_path, monkeypatch):
    _interrupt_step(monkeypatch, at=6)
    with pytest.raises(Interrupt):
        train_from_activations(lambda: _chunks(), _cfg(), tmp_path)
    monkeypatch.undo()
    directory = tmp_path / "checkpoints" / HOOK
    (directory / ".latest.json.x1.tmp").write_text("{")
    folder = directory / json.loads((directory / "latest.json").read_text())["folder"]
    (folder / ".state.json.x2.tmp").write_text("{")
    train_from_activations(lambda: _chunks(), _cfg(), tmp_path)
    assert not list(directory.rglob(".*.tmp"))


# --- fault injection ------------------------------------------------------------------------------

def _flip(offset_fraction: float):
    def corrupt(path: Path) -> None:
        data = bytearray(path.read_bytes())
        data[min(int(len(data) * offset_fraction), len(data) - 1)] ^= 0x10
        path.write_bytes(bytes(data))
    return corrupt


CORRUPTIONS = {
    "truncate half": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "truncate 1 byte": lambda p: p.write_bytes(p.read_bytes()[:-1]),
    "empty file": lambda p: p.write_bytes(b""),
    "flip header byte": _flip(0.002),
    "flip middle byte": _flip(0.5),
    "flip last byte": _flip(1.0),
    "wrong header": lambda p: p.write_bytes(b"\xff" * 8 + p.read_bytes()[8:]),
    "empty json": lambda p: p.write_text("{}"),
}
JSON_CORRUPTIONS = ["truncate half", "empty file", "empty json", "flip middle byte"]
BINARY_CORRUPTIONS = ["truncate half", "truncate 1 byte", "empty file", "flip header byte", "flip middle byte",
                      "flip last byte", "wrong header"]


def _build_artifacts(root: Path, model, texts) -> dict[str, tuple[Path, list[str], object]]:
    """Each kind of artifact: (folder, files to corrupt, reader returning its values as tensors)."""
    save(model, HOOK, texts, root / "store", run_id="r", **SMALL)
    run = root / "store" / "activations" / "r"

    def read_run(folder):
        opened = ActivationRun(folder)
        return {"acts": opened.activations()[:], "ids": opened.token_ids(),
                "shards": torch.cat([s.acts[HOOK] for s in opened.iter_shards()])}

    cfg = _cfg()
    sae = training_state.to_inference_sae(build_training_sae(cfg, 16, HOOK, 0))
    write_sae_folder(sae, root / "sae")

    train_from_activations(lambda: _chunks(), cfg, root / "train")
    checkpoints = root / "train" / "checkpoints" / HOOK
    step = json.loads((checkpoints / "latest.json").read_text())["folder"]

    def read_checkpoint(folder):
        states = [training_state.SAEState(HOOK, build_training_sae(cfg, 16, HOOK, cfg.seed), cfg)]
        shuffler = BlockShuffler(64, cfg.batches_per_block, True, 0)
        config = {**to_json(cfg), "identity": {"widths": {HOOK: 16}}}
        training_state.load_checkpoint(folder, states, shuffler, config)
        return {**states[0].state_tensors(), **shuffler.state_tensors()}

    rows = torch.randn(200, 8, dtype=torch.float64) @ torch.randn(8, 8, dtype=torch.float64)
    stats = IncrementalWhitener(8)
    stats.update(rows)
    stats.to_whitener(hook=HOOK).save(root / "whitening")

    builder = CSRBuilder(n_features=40, workdir=root)
    latents = torch.relu(torch.randn(50, 40) - 1.0)
    builder.add(latents, torch.arange(50), torch.zeros(50, dtype=torch.long), torch.arange(50))
    builder.finish(root / "csr")

    def read_csr(folder):
        csr = LatentCSR.load(folder)
        arrays = {n: torch.from_numpy(np.array(getattr(csr, n))) for n in ("indptr", "indices", "data", "token_ids")}
        return {**arrays, "n_features": csr.n_features}

    return {
        "shard": (run, ["shard-00001.safetensors"], read_run),
        "meta.json": (run, ["meta.json"], read_run),
        "SAE safetensors": (root / "sae", ["sae_weights.safetensors"], lambda f: load_sae_folder(f, "cpu")[0].state_dict()),
        "cfg.json": (root / "sae", ["cfg.json"], lambda f: load_sae_folder(f, "cpu")[0].state_dict()),
        "checkpoint": (checkpoints, [f"{step}/sae-0.safetensors", f"{step}/data-rank0.safetensors"], read_checkpoint),
        "checkpoint json": (checkpoints, ["latest.json", f"{step}/state.json"], read_checkpoint),
        "whitening file": (root / "whitening", ["whitening.safetensors"],
                           lambda f: dict(vars(Whitener.load(f)).items())),
        "CSR arrays": (root / "csr", ["indptr.npy", "indices.npy", "data.npy", "token_ids.npy"], read_csr),
        "CSR meta.json": (root / "csr", ["meta.json"], read_csr),
    }


@pytest.fixture(scope="module")
def artifacts(tiny_model, texts, tmp_path_factory):
    root = tmp_path_factory.mktemp("artifacts")
    built = _build_artifacts(root, tiny_model, texts)
    return {kind: (folder, files, reader, reader(folder)) for kind, (folder, files, reader) in built.items()}


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return a == b


CASES = [(kind, corruption) for kind in ("shard", "SAE safetensors", "checkpoint", "whitening file", "CSR arrays")
         for corruption in BINARY_CORRUPTIONS]
CASES += [(kind, corruption) for kind in ("meta.json", "cfg.json", "checkpoint json", "CSR meta.json")
          for corruption in JSON_CORRUPTIONS]


@pytest.mark.parametrize(("kind", "corruption"), CASES)
def test_no_read_of_a_corrupted_artifact_returns_wrong_values(artifacts, tmp_path, kind, corruption):
    folder, files, reader, reference = artifacts[kind]
    for name in files:
        copy_dir = tmp_path / f"copy-{files.index(name)}"
        shutil.copytree(folder, copy_dir)
        CORRUPTIONS[corruption](copy_dir / name)
        try:
            values = reader(copy_dir)
        except (ValueError, FileNotFoundError) as err:
            assert str(copy_dir) in str(err), f"{name}: the error does not name the file: {err}"
            assert any(w in str(err) for w in ("restore", "delete", "rebuild", "again", "start over")), str(err)
        else:
            assert _equal(reference, values), f"{name} ({corruption}) read back wrong values silently"
