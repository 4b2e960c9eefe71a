"""SAEManager / SAEAnalyzer on the tiny random model, against references computed by hand (numpy / raw SAELens)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sae_lens import SAE, StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig

from sae_core.saes import HubUnavailableError, SAEAnalyzer, SAEManager
from sae_core.whitening import Whitener

HOOK = "blocks.1.hook_resid_post"
TEXTS = ["The quick brown fox jumps over the lazy dog.", "Time flies like an arrow; fruit flies like a banana.",
         "A journey of a thousand miles begins with a single step.", "To be or not to be, that is the question.",
         "All that glitters is not gold, and not all who wander are lost."]


def make_whitener(acts: torch.Tensor) -> Whitener:
    """ZCA whitening of real activations (sae_core.whitening); tests check it through its raw matrices."""
    x = acts.double()
    return Whitener.from_statistics(x.mean(0), torch.cov(x.T), x.shape[0], method="zca", eps=1e-4, hook=HOOK)


def whitening_arrays(w: Whitener) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, transform, reverse_transform) as float64 numpy arrays: the independent reference."""
    return w.mean.numpy(), w.transform.numpy(), w.reverse_transform.numpy()


def hook_activations(model, texts=TEXTS, hook=HOOK) -> torch.Tensor:
    """Real activations of the tiny model at ``hook`` on real sentences, (rows, d_model)."""
    rows = []
    with torch.no_grad():
        for text in texts:
            _, cache = model.run_with_cache(text, names_filter=[hook])
            rows.append(cache[hook][0])
    return torch.cat(rows)


def make_sae(kind: str, d_in: int = 32, seed: int = 0) -> SAE:
    torch.manual_seed(seed)
    if kind == "topk":
        sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=64, k=4))
    else:
        sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=64))
        with torch.no_grad():
            sae.b_enc.normal_(0.0, 0.1)
            sae.b_dec.normal_(0.0, 0.1)
    sae.cfg.metadata.hook_name = HOOK
    return sae


@pytest.fixture(scope="module")
def acts(tiny_model):
    return hook_activations(tiny_model)


@pytest.fixture(scope="module")
def whitener(acts):
    return make_whitener(acts)


@pytest.mark.parametrize("kind", ["topk", "standard"])
def test_load_from_disk_equals_original(tiny_model, acts, tmp_path, kind):
    sae = make_sae(kind)
    sae.save_model(tmp_path / "sae")
    manager = SAEManager(tiny_model)
    entry = manager.load_from_disk(tmp_path / "sae", device="cpu", dtype="float32")
    assert entry.hook == HOOK and entry.whitener is None and manager.hooks == [HOOK]
    with torch.no_grad():
        expected = sae.encode(acts)
        got = manager.encode(HOOK, acts)
    assert (expected != 0).any()
    assert torch.equal(got, expected)
    assert torch.equal(manager.decode(HOOK, got), sae.decode(expected))


def test_save_round_trip(tiny_model, acts, tmp_path):
    manager = SAEManager(tiny_model)
    manager.add(HOOK, make_sae("topk", seed=3))
    manager.save(HOOK, tmp_path / "saved")
    with pytest.raises(FileExistsError):
        manager.save(HOOK, tmp_path / "saved")
    reloaded = SAE.load_from_disk(tmp_path / "saved")
    with torch.no_grad():
        assert torch.equal(manager.encode(HOOK, acts), reloaded.encode(acts))


def test_missing_folder_and_hook_errors(tiny_model, tmp_path):
    manager = SAEManager(tiny_model)
    with pytest.raises(FileNotFoundError, match="cfg.json"):
        manager.load_from_disk(tmp_path)
    with pytest.raises(KeyError, match="no SAE loaded"):
        manager.encode(HOOK, torch.zeros(2, 32))
    with pytest.raises(KeyError, match="closest valid names"):
        manager.add("blocks.1.hook_resid_pots", make_sae("topk"))


def test_whitening_applied(tiny_model, acts, whitener):
    sae = make_sae("standard")
    manager = SAEManager(tiny_model)
    manager.add(HOOK, sae, whitener=whitener)
    mean, transform, reverse = whitening_arrays(whitener)
    whitened = torch.tensor((acts.double().numpy() - mean) @ transform, dtype=torch.float32)
    with torch.no_grad():
        expected = sae.encode(whitened)
        got = manager.encode(HOOK, acts)
        assert (expected > 0).any()
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
        decoded = sae.decode(expected).double().numpy() @ reverse + mean
        torch.testing.assert_close(manager.decode(HOOK, expected).double(), torch.tensor(decoded), atol=1e-4, rtol=1e-4)
        # latent directions live in the un-whitened space: W_dec[i] @ reverse_transform
        dirs = manager.decoder_directions(HOOK, [0, 5])
        ref = sae.W_dec[[0, 5]].double().numpy() @ reverse
        torch.testing.assert_close(dirs.double(), torch.tensor(ref), atol=1e-5, rtol=1e-4)


def test_whitening_saved_beside_sae_round_trips(tiny_model, acts, whitener, tmp_path):
    manager = SAEManager(tiny_model)
    manager.add(HOOK, make_sae("standard", seed=1), whitener=whitener)
    folder = manager.save(HOOK, tmp_path / "whitened_sae")
    assert sorted(p.name for p in folder.iterdir()) == ["cfg.json", "checksums.json", "sae_weights.safetensors",
                                                        "whitening.json", "whitening.safetensors"]
    reloaded = SAEManager(tiny_model)
    entry = reloaded.load_from_disk(folder, device="cpu", dtype=torch.float32)
    assert entry.whitener is not None and entry.hook == HOOK
    with torch.no_grad():
        assert torch.equal(reloaded.encode(HOOK, acts), manager.encode(HOOK, acts))
    with pytest.raises(ValueError, match="width"):
        SAEManager().add(HOOK, make_sae("topk", d_in=16), whitener=whitener)


def test_splice_with_error_reproduces_clean_logits(tiny_model, whitener):
    manager = SAEManager(tiny_model)
    manager.add(HOOK, make_sae("topk"), whitener=whitener)
    tokens = tiny_model.to_tokens(TEXTS[:2])
    with torch.no_grad():
        clean = tiny_model(tokens)
        with manager.spliced(tiny_model, with_error=True) as record:
            spliced = tiny_model(tokens)
    assert torch.equal(spliced, clean)
    assert record.latents[HOOK].shape == (*tokens.shape, 64)


def test_splice_without_error_matches_manual_hook(tiny_model, whitener):
    sae = make_sae("standard")
    manager = SAEManager(tiny_model)
    manager.add(HOOK, sae, whitener=whitener)
    tokens = tiny_model.to_tokens(TEXTS[2:4])
    mean, transform, reverse = (torch.tensor(a, dtype=torch.float32) for a in whitening_arrays(whitener))

    def manual(activation, hook):
        return sae.decode(sae.encode((activation - mean) @ transform)) @ reverse + mean

    with torch.no_grad():
        reference = tiny_model.run_with_hooks(tokens, fwd_hooks=[(HOOK, manual)])
        clean = tiny_model(tokens)
        with manager.spliced(tiny_model, hooks=[HOOK], with_error=False):
            spliced = tiny_model(tokens)
    assert not torch.allclose(spliced, clean, atol=1e-3)  # the reconstruction is lossy
    torch.testing.assert_close(spliced, reference, atol=1e-4, rtol=1e-4)


def test_splice_hooks_removed_after_exception(tiny_model):
    manager = SAEManager(tiny_model)
    manager.add(HOOK, make_sae("topk"))
    with pytest.raises(RuntimeError, match="boom"), manager.spliced(tiny_model):
        assert len(tiny_model.hook_dict[HOOK]._forward_hooks) == 1
        raise RuntimeError("boom")
    assert len(tiny_model.hook_dict[HOOK]._forward_hooks) == 0
    assert tiny_model.hook_dict[HOOK].fwd_hooks == []


def test_offline_pretrained_load_raises_clear_error(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    release, sae_id = "gemma-scope-2b-pt-res", "layer_12/width_16k/average_l0_82"
    with pytest.raises(HubUnavailableError) as info:
        SAEManager().load_pretrained(release, sae_id)
    message = str(info.value)
    for part in (release, sae_id, "offline", "HF_HUB_OFFLINE", "load_from_disk", "save_model"):
        assert part in message


def test_analyze_features_top_latents(tiny_model, whitener):
    sae = make_sae("topk")
    manager = SAEManager(tiny_model)
    manager.add(HOOK, sae, whitener=whitener)
    text = TEXTS[4]
    result = SAEAnalyzer(tiny_model, manager).analyze_features(text, hooks=[HOOK], top_k=5)
    # reference: numpy max over non-special positions of latents from the raw SAE
    tokens = tiny_model.to_tokens(text)
    with torch.no_grad():
        _, cache = tiny_model.run_with_cache(tokens, names_filter=[HOOK])
        mean, transform, _ = whitening_arrays(whitener)
        whitened = (cache[HOOK][0].double().numpy() - mean) @ transform
        latents = sae.encode(torch.tensor(whitened, dtype=torch.float32)).numpy()
    special = set(tiny_model.tokenizer.all_special_ids)
    keep = np.array([t not in special for t in tokens[0].tolist()])
    assert not keep[0] and keep[1:].all()  # BOS is left out
    peak = latents[keep].max(axis=0)
    order = np.argsort(-peak, kind="stable")[:5]
    top = result.per_hook[HOOK]
    np.testing.assert_allclose(top.values.numpy(), peak[order], rtol=1e-5, atol=1e-5)
    assert set(top.indices.tolist()) == set(order.tolist())
    positions = np.flatnonzero(keep)[latents[keep][:, top.indices.numpy()].argmax(axis=0)]
    np.testing.assert_array_equal(top.positions.numpy(), positions)
    assert result.tokens[0] == tiny_model.tokenizer.bos_token and len(result.tokens) == tokens.shape[1]


def test_load_saes_for_model_reads_release_and_id_template_from_the_constant_file(tiny_model, tmp_path):
    """A local SAELens-format release: one folder per SAE id, the id from the file's per-layer template."""
    from sae_core.models import load_model_constants
    from sae_core.sae_folders import write_sae_folder

    release = tmp_path / "release"
    written = {}
    for layer in (0, 1):
        sae = make_sae("topk", seed=layer)
        sae.cfg.metadata.hook_name = f"blocks.{layer}.hook_resid_post"
        write_sae_folder(sae, release / f"layer_{layer}" / "width_64")
        written[layer] = sae.W_dec.detach().clone()
    source = Path(load_model_constants("tiny_random").__file__).read_text()
    constants = tmp_path / "with_release.py"
    constants.write_text(source + f"\nSAE_RELEASE = {str(release)!r}\nSAE_ID_TEMPLATE = 'layer_{{layer}}/width_64'\n")
    manager = SAEManager(tiny_model)
    loaded = manager.load_saes_for_model(str(constants), [0, -1])
    assert [entry.hook for entry in loaded] == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    for layer, entry in zip((0, 1), loaded, strict=True):
        torch.testing.assert_close(entry.sae.W_dec, written[layer], rtol=0, atol=0)  # reloaded from disk
    with pytest.raises(IndexError, match="out of range"):
        manager.load_saes_for_model(str(constants), [2])
    with pytest.raises(ValueError, match="names no pretrained SAEs"):
        manager.load_saes_for_model("tiny_random", [0])


def test_load_saes_for_model_offline_raises_the_hub_error(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubUnavailableError, match="layer_12/width_16k/canonical"):
        SAEManager().load_saes_for_model("gemma_2_2b", [12])
