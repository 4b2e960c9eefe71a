"""SAE evaluation against a dense recomputation (numpy / scipy on ``run_with_cache`` activations and
plain logits with a hand-written replacement through ``run_with_hooks``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sae_lens import StandardSAE, StandardSAEConfig, TopKTrainingSAE, TopKTrainingSAEConfig
from scipy.special import log_softmax

from sae_core.config import KEEP_ALL_BUT_PAD, LoaderConfig, TokenPolicy
from sae_core.data import Window, WindowedTextDataset, pad_collate, pad_id_of
from sae_core.evaluation import (
    CURVE_FILENAME,
    EVAL_FILENAME,
    METRIC_CONVENTIONS,
    append_curve,
    evaluate_sae,
    read_eval,
    reconstruct,
    reconstruction_metrics,
    write_curve,
    write_eval,
)
from sae_core.loader import make_dataloader

HOOK = "blocks.0.hook_resid_post"
D = 32
TEXTS = [
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun.",
    "Hello world.",
    "To be or not to be, that is the question.",
    "A journey of a thousand miles begins with a single step.",
    "Short one.",
    "Colorless green ideas sleep furiously, said the linguist to the bewildered audience.",
    "Time flies like an arrow; fruit flies like a banana.",
    "Ok.",
    "All that glitters is not gold, and not all those who wander are lost.",
    "Never put off till tomorrow what you can do the day after tomorrow.",
]


# ----- SAEs built in the test -------------------------------------------------------------------

def standard_sae(seed: int = 0, n_dead: int = 8) -> StandardSAE:
    """A random ReLU SAE whose last ``n_dead`` latents can never fire (bias -1e4)."""
    gen = torch.Generator().manual_seed(seed)
    sae = StandardSAE(StandardSAEConfig(d_in=D, d_sae=2 * D))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(D, 2 * D, generator=gen) * 0.3)
        sae.b_enc.copy_(torch.randn(2 * D, generator=gen) * 0.1)
        sae.b_enc[-n_dead:] = -1e4
        sae.W_dec.copy_(torch.randn(2 * D, D, generator=gen) * 0.3)
        sae.b_dec.copy_(torch.randn(D, generator=gen) * 0.1)
    return sae


def identity_sae() -> StandardSAE:
    """d_sae = 2 d_in, W_enc = [I, -I], W_dec = [I; -I]: relu(x) - relu(-x) = x exactly."""
    sae = StandardSAE(StandardSAEConfig(d_in=D, d_sae=2 * D))
    eye = torch.eye(D)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def zero_sae() -> StandardSAE:
    sae = standard_sae(seed=1, n_dead=0)
    with torch.no_grad():
        sae.W_dec.zero_()
        sae.b_dec.zero_()
    return sae


def standard_ref(sae: StandardSAE, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    w_enc, b_enc, w_dec, b_dec = (p.detach().double().numpy() for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec))
    latents = np.maximum((x - b_dec) @ w_enc + b_enc, 0)
    return latents, latents @ w_dec + b_dec


class OrthogonalWhitener:
    """z = (x - mean) @ Q, x = z @ Q.T + mean (Q orthogonal)."""

    def __init__(self, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.q = torch.linalg.qr(torch.randn(D, D, generator=gen, dtype=torch.float64))[0].float()
        self.mean = torch.randn(D, generator=gen) * 0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) @ self.q

    def reverse(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.q.T + self.mean


# ----- data and the dense reference -------------------------------------------------------------

@pytest.fixture(scope="module")
def batches(tiny_model):
    dataset = WindowedTextDataset(TEXTS, tiny_model.tokenizer, max_text_length=20, prepend_bos=True)
    loaded = list(make_dataloader(dataset, LoaderConfig(batch_size=4, group_by_length=False)))
    assert any((b.attention_mask == 0).any() for b in loaded), "the eval batches should contain padding"
    return loaded


def reference_keep(batch, tokenizer, drop_special: bool = True) -> np.ndarray:
    keep = batch.attention_mask.numpy() == 1
    if drop_special:
        special = set(tokenizer.all_special_ids) | {tokenizer.bos_token_id, tokenizer.eos_token_id}
        keep &= ~np.isin(batch.input_ids.numpy(), sorted(special))
    return keep


def dense_reference(model, batches, recon, keep_fn, ablation_mean=None) -> dict:
    """Every metric recomputed densely; ``recon(x: np (n, d)) -> (latents, x_hat)`` in float64."""
    xs, x_hats, lats = [], [], []
    ce: dict[str, list] = {"clean": [], "spliced": [], "zero": [], "mean": []}
    kl: dict[str, list] = {"spliced": [], "zero": [], "mean": []}
    for batch in batches:
        tokens, keep = batch.input_ids, keep_fn(batch)
        with torch.no_grad():
            clean_logits, cache = model.run_with_cache(tokens, names_filter=[HOOK])
        act = cache[HOOK].double().numpy()  # (batch, pos, d)
        latents, x_hat = recon(act[keep])
        xs.append(act[keep])
        x_hats.append(x_hat)
        lats.append(latents)
        replacements = {"spliced": x_hat, "zero": np.zeros_like(x_hat)}
        if ablation_mean is not None:
            replacements["mean"] = np.broadcast_to(ablation_mean.double().numpy(), x_hat.shape)
        counted = batch.attention_mask.numpy()[:, 1:] == 1
        targets = tokens.numpy()[:, 1:][counted]
        lp_clean = log_softmax(clean_logits.double().numpy()[:, :-1][counted], axis=-1)
        ce["clean"].append(-lp_clean[np.arange(len(targets)), targets])
        for name, rows in replacements.items():
            full = act.copy()
            full[keep] = rows
            new = torch.tensor(full, dtype=torch.float32)
            with torch.no_grad():
                logits = model.run_with_hooks(tokens, fwd_hooks=[(HOOK, lambda a, hook, new=new: new)])
            lp = log_softmax(logits.double().numpy()[:, :-1][counted], axis=-1)
            ce[name].append(-lp[np.arange(len(targets)), targets])
            kl[name].append((np.exp(lp_clean) * (lp_clean - lp)).sum(-1))
    x, x_hat, lat = (np.concatenate(a) for a in (xs, x_hats, lats))
    ref = {
        "n_rows": len(x), "mse": ((x - x_hat) ** 2).sum(1).mean(),
        "explained_variance": 1 - ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum(),
        "explained_variance_zero": 1 - ((x - x_hat) ** 2).sum() / (x**2).sum(),
        "mse_per_element": ((x - x_hat) ** 2).mean(),
        "normalized_mse": (((x - x_hat) ** 2).sum(1) / (x**2).sum(1)).mean(),
        "l0": (lat != 0).sum(1).mean(), "firing_counts": (lat != 0).sum(0),
        "mean_activation_norm": np.linalg.norm(x, axis=1).mean(),
        "mean_reconstruction_norm": np.linalg.norm(x_hat, axis=1).mean(),
    }
    ref["dead_fraction"] = (ref["firing_counts"] == 0).mean()
    means = {k: np.concatenate(v).mean() for k, v in ce.items() if v}
    ref["n_predictions"] = len(np.concatenate(ce["clean"]))
    ref |= {"ce_clean": means["clean"], "ce_spliced": means["spliced"], "ce_zero_ablated": means["zero"],
            "kl_spliced": np.concatenate(kl["spliced"]).mean(), "kl_zero_ablated": np.concatenate(kl["zero"]).mean()}
    ref["ce_recovered"] = (means["zero"] - means["spliced"]) / (means["zero"] - means["clean"])
    if ablation_mean is not None:
        ref["ce_mean_ablated"] = means["mean"]
        ref["ce_recovered_mean"] = (means["mean"] - means["spliced"]) / (means["mean"] - means["clean"])
    return ref


def assert_matches(result, ref, rel=1e-5) -> None:
    np.testing.assert_array_equal(result.firing_counts, ref["firing_counts"])
    for key, value in ref.items():
        if key == "firing_counts":
            continue
        got = getattr(result, key)
        assert got == pytest.approx(value, rel=rel, abs=1e-6), f"{key}: {got} != {value}"


# ----- tests -------------------------------------------------------------------------------------

def test_metrics_match_dense_reference(tiny_model, batches):
    sae = standard_sae()
    mean = torch.randn(D, generator=torch.Generator().manual_seed(3))
    result = evaluate_sae(tiny_model, sae, HOOK, batches, ablation_mean=mean)
    ref = dense_reference(tiny_model, batches, lambda x: standard_ref(sae, x),
                          lambda b: reference_keep(b, tiny_model.tokenizer), ablation_mean=mean)
    assert_matches(result, ref)
    assert result.dead_fraction >= 8 / (2 * D)  # the 8 latents with bias -1e4 never fire
    assert 0 < result.l0 < 2 * D


def test_reconstruction_batches_and_subsets_match_dense_reference(tiny_model):
    """Windows scored for reconstruction only (here packed, one forward each) add to the reconstruction
    metrics but not to the CE; per-subset metrics equal a dense recomputation on those documents' rows."""
    dataset = WindowedTextDataset(TEXTS, tiny_model.tokenizer, max_text_length=20, prepend_bos=True)
    items, pad = [dataset[i] for i in range(len(TEXTS))], pad_id_of(tiny_model.tokenizer)
    ce_batches, plain_rest = [pad_collate(items[:4], pad)], [pad_collate(items[4:], pad)]
    packed_rest = [pad_collate(items[4:], pad, pack=True)]
    assert packed_rest[0].input_ids.shape[0] < len(items) - 4  # windows do share rows
    sae, subsets = standard_sae(), {"a": [0, 1, 5, 9], "b": [2, 3, 4, 6, 7, 8]}
    result = evaluate_sae(tiny_model, sae, HOOK, ce_batches, reconstruction_batches=packed_rest, subsets=subsets)
    keep = lambda b: reference_keep(b, tiny_model.tokenizer)  # noqa: E731
    everything = dense_reference(tiny_model, ce_batches + plain_rest, lambda x: standard_ref(sae, x), keep)
    ce_only = dense_reference(tiny_model, ce_batches, lambda x: standard_ref(sae, x), keep)
    for key in ("n_rows", "mse", "explained_variance", "l0", "mean_activation_norm", "normalized_mse"):
        assert getattr(result, key) == pytest.approx(everything[key], rel=1e-4), key
    np.testing.assert_array_equal(result.firing_counts, everything["firing_counts"])
    for key in ("n_predictions", "ce_clean", "ce_spliced", "ce_recovered", "kl_spliced"):
        assert getattr(result, key) == pytest.approx(ce_only[key], rel=1e-5, abs=1e-6), key
    for name, docs in subsets.items():
        rows, doc_of = [], []
        for batch in ce_batches + plain_rest:
            with torch.no_grad():
                _, cache = tiny_model.run_with_cache(batch.input_ids, names_filter=[HOOK])
            k = keep(batch)
            rows.append(cache[HOOK].double().numpy()[k])
            doc_of.append(np.broadcast_to(batch.doc_index.numpy()[:, None], k.shape)[k])
        x = np.concatenate(rows)[np.isin(np.concatenate(doc_of), docs)]
        latents, x_hat = standard_ref(sae, x)
        got = result.subsets[name]
        assert got["n_rows"] == len(x) and got["l0"] == pytest.approx((latents != 0).sum(1).mean(), rel=1e-6)
        assert got["explained_variance"] == pytest.approx(
            1 - ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum(), rel=1e-4)


def test_topk_training_sae_with_sparse_latents(tiny_model, batches):
    k = 4
    cfg = TopKTrainingSAEConfig(d_in=D, d_sae=2 * D, k=k, use_sparse_activations=True,
                                rescale_acts_by_decoder_norm=False)
    sae = TopKTrainingSAE(cfg)

    def topk_ref(x):
        w_enc, b_enc, w_dec, b_dec = (p.detach().double().numpy() for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec))
        pre = (x - b_dec) @ w_enc + b_enc
        latents = np.zeros_like(pre)
        top = np.argsort(-pre, axis=1)[:, :k]
        np.put_along_axis(latents, top, np.maximum(np.take_along_axis(pre, top, 1), 0), axis=1)
        return latents, latents @ w_dec + b_dec

    result = evaluate_sae(tiny_model, sae, HOOK, batches)
    ref = dense_reference(tiny_model, batches, topk_ref, lambda b: reference_keep(b, tiny_model.tokenizer))
    assert_matches(result, ref)


def test_identity_sae_is_perfect(tiny_model, batches):
    sae = identity_sae()
    x = torch.randn(50, D, generator=torch.Generator().manual_seed(0))
    assert torch.equal(reconstruct(sae, x).x_hat, x)  # exact, not approximate
    result = evaluate_sae(tiny_model, sae, HOOK, batches)
    assert result.mse == 0
    assert result.explained_variance == 1
    assert result.ce_recovered == pytest.approx(1, abs=1e-9)
    assert result.kl_spliced == pytest.approx(0, abs=1e-9)
    assert result.ce_zero_ablated != result.ce_clean


def test_zero_sae_recovers_nothing(tiny_model, batches):
    result = evaluate_sae(tiny_model, zero_sae(), HOOK, batches)
    assert result.ce_spliced == pytest.approx(result.ce_zero_ablated, abs=1e-9)
    assert result.ce_recovered == pytest.approx(0, abs=1e-6)
    assert result.kl_spliced == pytest.approx(result.kl_zero_ablated, rel=1e-6)


def test_pad_positions_never_counted(tiny_model):
    tok = tiny_model.tokenizer
    windows = [Window(torch.tensor([tok.bos_token_id, *tok(t, add_special_tokens=False)["input_ids"]]), i, 0)
               for i, t in enumerate(TEXTS[:4])]
    padded = pad_collate(windows, tok.pad_token_id)
    assert (padded.attention_mask == 0).any()
    unpadded = [pad_collate([w], tok.pad_token_id) for w in windows]  # one document per batch: no pad
    # The pad tokens' ids must not matter either: replace them with arbitrary tokens.
    noise = torch.randint(3, 1000, padded.input_ids.shape, generator=torch.Generator().manual_seed(0))
    garbled = padded._replace(input_ids=torch.where(padded.attention_mask == 1, padded.input_ids, noise))
    sae = standard_sae()
    reference = evaluate_sae(tiny_model, sae, HOOK, unpadded)
    for batch in (padded, garbled):
        result = evaluate_sae(tiny_model, sae, HOOK, [batch])
        assert (result.n_rows, result.n_predictions) == (reference.n_rows, reference.n_predictions)
        np.testing.assert_array_equal(result.firing_counts, reference.firing_counts)
        for key in ("mse", "explained_variance", "l0", "ce_clean", "ce_spliced", "ce_zero_ablated", "kl_spliced"):
            assert getattr(result, key) == pytest.approx(getattr(reference, key), rel=1e-4, abs=1e-6), key
    assert reference.n_predictions == sum(w.input_ids.numel() - 1 for w in windows)


def test_policy_decides_which_rows_are_spliced(tiny_model, batches):
    sae = standard_sae()
    kept = evaluate_sae(tiny_model, sae, HOOK, batches, policy=KEEP_ALL_BUT_PAD)
    assert kept.n_rows == sum(int(b.attention_mask.sum()) for b in batches)
    ref = dense_reference(tiny_model, batches, lambda x: standard_ref(sae, x),
                          lambda b: reference_keep(b, tiny_model.tokenizer, drop_special=False))
    assert_matches(kept, ref)
    default = evaluate_sae(tiny_model, sae, HOOK, batches, policy=TokenPolicy())
    assert default.n_rows == kept.n_rows - len(TEXTS)  # one BOS per window
    assert default.policy["excluded_ids"] and default.n_predictions == kept.n_predictions


def test_whitener_path(tiny_model, batches):
    whitener = OrthogonalWhitener()
    plain = evaluate_sae(tiny_model, identity_sae(), HOOK, batches)
    whitened = evaluate_sae(tiny_model, identity_sae(), HOOK, batches, whitener=whitener)
    assert whitened.whitened and not plain.whitened
    for key in ("explained_variance", "ce_recovered", "ce_spliced", "mean_activation_norm"):
        assert getattr(whitened, key) == pytest.approx(getattr(plain, key), rel=1e-5), key
    assert whitened.kl_spliced == pytest.approx(0, abs=1e-6)
    # A non-trivial SAE: the SAE sees forward(x) and the reconstruction is reverse(decode(...)).
    sae = standard_sae(seed=2)
    q, mean = whitener.q.double().numpy(), whitener.mean.double().numpy()

    def whitened_ref(x):
        latents, z_hat = standard_ref(sae, (x - mean) @ q)
        return latents, z_hat @ q.T + mean

    result = evaluate_sae(tiny_model, sae, HOOK, batches, whitener=whitener)
    ref = dense_reference(tiny_model, batches, whitened_ref, lambda b: reference_keep(b, tiny_model.tokenizer))
    assert_matches(result, ref, rel=1e-4)


def test_max_batches_and_bad_input(tiny_model, batches):
    sae = standard_sae()
    first = evaluate_sae(tiny_model, sae, HOOK, batches, max_batches=1)
    only = evaluate_sae(tiny_model, sae, HOOK, batches[:1])
    assert first.n_batches == 1 and first.n_rows == only.n_rows
    assert first.explained_variance == pytest.approx(only.explained_variance, rel=1e-9)
    with pytest.raises(KeyError, match="closest valid names"):
        evaluate_sae(tiny_model, sae, "blocks.0.hook_resid_pots", batches)
    with pytest.raises(ValueError, match="expects"):
        evaluate_sae(tiny_model, sae, "blocks.0.attn.hook_pattern", batches)
    with pytest.raises(ValueError, match="ablation_mean"):
        evaluate_sae(tiny_model, sae, HOOK, batches, ablation_mean=torch.zeros(3))


def test_write_eval_round_trip(tiny_model, batches, tmp_path):
    result = evaluate_sae(tiny_model, standard_sae(), HOOK, batches[:1], ablation_mean=torch.zeros(D))
    path = write_eval(tmp_path, result)
    assert path == tmp_path / EVAL_FILENAME
    on_disk = json.loads(path.read_text())
    assert on_disk["explained_variance"] == result.explained_variance
    assert on_disk["firing_counts"] == result.firing_counts.tolist()
    back = read_eval(tmp_path)
    assert back == result
    np.testing.assert_array_equal(back.firing_counts, result.firing_counts)
    assert [p.name for p in tmp_path.iterdir()] == [EVAL_FILENAME]  # no temporary file left


def test_metric_conventions_on_rows_with_a_large_mean():
    """Rows with a large shared mean, as a residual stream has: the conventions then disagree."""
    rng = np.random.default_rng(0)
    x = 10.0 + rng.standard_normal((300, 16))  # mean norm 40, per-row spread ~4
    candidates = {"the mean": np.broadcast_to(x.mean(0), x.shape), "noisy": x + 0.5 * rng.standard_normal(x.shape),
                  "half": 0.5 * x}
    for name, x_hat in candidates.items():
        chunks = [(torch.tensor(x[i:i + 64]), torch.tensor(x_hat[i:i + 64], dtype=torch.float32)) for i in range(0, 300, 64)]
        got = reconstruction_metrics(chunks)
        x_hat = np.concatenate([c[1].double().numpy() for c in chunks])  # the float32 rows it saw
        residual = ((x - x_hat) ** 2).sum(1)
        ref = {"explained_variance": 1 - residual.sum() / ((x - x.mean(0)) ** 2).sum(),
               "explained_variance_zero": 1 - residual.sum() / (x**2).sum(),
               "mse": residual.mean(), "mse_per_element": residual.mean() / 16,
               "normalized_mse": (residual / (x**2).sum(1)).mean()}
        assert set(got) == set(ref) == set(METRIC_CONVENTIONS)
        for key, value in ref.items():
            assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-9), (name, key)
    mean_only = reconstruction_metrics([(torch.tensor(x), torch.tensor(np.broadcast_to(x.mean(0), x.shape).copy()))])
    assert mean_only["explained_variance"] == pytest.approx(0, abs=1e-9)
    assert mean_only["explained_variance_zero"] > 0.95  # against zero, the mean alone looks excellent


def test_eval_json_names_its_conventions(tiny_model, batches, tmp_path):
    result = evaluate_sae(tiny_model, standard_sae(), HOOK, batches[:2])
    on_disk = json.loads(write_eval(tmp_path, result).read_text())
    assert on_disk["conventions"] == METRIC_CONVENTIONS and "against the mean" in on_disk["conventions"]["explained_variance"]
    assert on_disk["mse_per_element"] == pytest.approx(on_disk["mse"] / D, rel=1e-12)
    assert on_disk["explained_variance_zero"] > on_disk["explained_variance"]
    assert read_eval(tmp_path).normalized_mse == result.normalized_mse


def test_training_curve(tmp_path):
    records: list = []
    append_curve(records, tokens=256, loss=torch.tensor(1.5), l0=np.float32(4.0), explained_variance=0.5,
                 dead_fraction=0.25)
    append_curve(records, tokens=512, loss=1.25, l0=4, explained_variance=0.75, dead_fraction=0.0)
    with pytest.raises(ValueError, match="must not decrease"):
        append_curve(records, tokens=100, loss=1.0)
    with pytest.raises(ValueError, match="tokens="):
        append_curve(records, loss=1.0)
    write_curve(tmp_path, records)
    on_disk = json.loads((tmp_path / CURVE_FILENAME).read_text())
    assert on_disk == records
    assert [r["tokens"] for r in on_disk] == [256, 512] and on_disk[0]["loss"] == 1.5


@pytest.mark.slow
def test_identity_sae_on_smollm2(smollm2, corpus_texts):
    d = smollm2.cfg.d_model
    sae = StandardSAE(StandardSAEConfig(d_in=d, d_sae=2 * d))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    dataset = WindowedTextDataset(corpus_texts[:4], smollm2.tokenizer, max_text_length=32, prepend_bos=True)
    result = evaluate_sae(smollm2, sae, "blocks.10.hook_resid_post", make_dataloader(dataset, LoaderConfig(batch_size=4)))
    assert result.explained_variance == 1
    assert result.ce_recovered == pytest.approx(1, abs=1e-6)
    assert result.kl_spliced == pytest.approx(0, abs=1e-6)
    assert result.ce_zero_ablated > result.ce_clean + 1  # ablating layer 10 hurts a real model
