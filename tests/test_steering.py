"""ModelSteering: semantics of add / clamp / scale / ablate, positions, KV cache, padded batches, hook hygiene.

Unit tests use the tiny random model with a tied SAE whose decoder rows are orthonormal in the
whitened space (W_enc = W_dec^T), trained-whitening included: for it, encode is an exact left
inverse of decode wherever a latent is active, so re-encoding a steered activation checks the
clamp exactly. References are computed by hand from the raw matrices, or by an unsteered
``model.generate`` / forward.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sae_lens import StandardSAE, StandardSAEConfig

from sae_core.saes import SAEManager
from sae_core.steering import ModelSteering, Steer
from sae_core.whitening import Whitener

HOOK = "blocks.1.hook_resid_post"
PROMPTS = ["The quick brown fox jumps over the lazy dog", "Time flies", "A journey of a thousand miles begins"]
D_SAE, TARGET = 16, 0
GEN = {"max_new_tokens": 6, "do_sample": False}


@pytest.fixture(scope="module")
def setup(tiny_model, corpus_texts):
    rows = []
    with torch.no_grad():
        for text in corpus_texts[:20]:
            _, cache = tiny_model.run_with_cache(text[:200], names_filter=[HOOK])
            rows.append(cache[HOOK][0])
    acts = torch.cat(rows).double()  # real activations -> real whitening statistics
    whitener = Whitener.from_statistics(acts.mean(0), torch.cov(acts.T), acts.shape[0], eps=1e-4, hook=HOOK)
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((32, D_SAE)))  # (32, 16) orthonormal columns
    sae = StandardSAE(StandardSAEConfig(d_in=32, d_sae=D_SAE))
    with torch.no_grad():
        sae.W_dec.copy_(torch.tensor(q.T, dtype=torch.float32))
        sae.W_enc.copy_(torch.tensor(q, dtype=torch.float32))
        sae.b_dec.zero_()
        sae.b_enc.zero_()
        sae.b_enc[TARGET] = 10.0  # keeps the target latent active everywhere (asserted where it matters)
    manager = SAEManager(tiny_model)
    manager.add(HOOK, sae, whitener=whitener)
    return tiny_model, manager, ModelSteering(tiny_model, manager), sae, whitener


def reference_maps(sae, whitener):
    """encode / decode / direction from the raw matrices, float64 numpy."""
    mean, transform, reverse = whitener.mean.numpy(), whitener.transform.numpy(), whitener.reverse_transform.numpy()
    w_enc, b_enc = sae.W_enc.detach().double().numpy(), sae.b_enc.detach().double().numpy()
    w_dec, b_dec = sae.W_dec.detach().double().numpy(), sae.b_dec.detach().double().numpy()

    def encode(x):
        return np.maximum(((np.asarray(x, dtype=np.float64) - mean) @ transform - b_dec) @ w_enc + b_enc, 0.0)

    def decode(z):
        return (z @ w_dec + b_dec) @ reverse + mean

    return encode, decode, w_dec @ reverse


def plain_generate(model, prompt, use_cache=True):
    return model.generate(model.to_tokens(prompt), use_past_kv_cache=use_cache, verbose=False,
                          return_type="tokens", **GEN)[0]


def test_zero_add_and_own_value_clamp_are_exact_no_ops(setup):
    model, _, steering, _, _ = setup
    for prompt in PROMPTS[:2]:
        reference = plain_generate(model, prompt)
        for steer in (Steer(HOOK, 3, 0.0, "add"), Steer(HOOK, TARGET, 1.0, "scale"), Steer(HOOK, 5, 1.0, "scale")):
            out = steering.generate_with_steering(prompt, [steer], **GEN)
            assert torch.equal(out.tokens[0], reference), steer
        changed = steering.generate_with_steering(prompt, [Steer(HOOK, 3, 40.0)], **GEN)
        assert not torch.equal(changed.tokens[0], reference)  # the hook is live
    tokens = model.to_tokens(PROMPTS[0])
    with torch.no_grad():
        clean = model(tokens)
        with steering.steer(HOOK, 3, 0.0):
            assert torch.equal(model(tokens), clean)
        with steering.steer(HOOK, TARGET, 1.0, mode="scale"):
            assert torch.equal(model(tokens), clean)


def test_clamp_sets_latent_and_keeps_others(setup):
    _, _, steering, sae, whitener = setup
    encode, decode, _ = reference_maps(sae, whitener)
    value = 4.0
    out = steering.generate_with_steering(PROMPTS, [Steer(HOOK, TARGET, value, "clamp")], capture=True, **GEN)
    cap = out.captured[HOOK]
    for before, after in zip(cap.before, cap.after, strict=True):
        z_before, z_after = encode(before.numpy()), encode(after.numpy())
        assert (z_before[:, TARGET] > 1.0).all() and (np.abs(z_before[:, TARGET] - value) > 1.0).all()
        np.testing.assert_allclose(z_after[:, TARGET], value, atol=1e-3)
        others = [i for i in range(D_SAE) if i != TARGET]
        np.testing.assert_allclose(z_after[:, others], z_before[:, others], atol=1e-3)
        # the steered activation is x + decode(z') - decode(z): the error term is preserved
        z_clamped = z_before.copy()
        z_clamped[:, TARGET] = value
        expected = before.double().numpy() + decode(z_clamped) - decode(z_before)
        np.testing.assert_allclose(after.double().numpy(), expected, atol=1e-4)


def test_add_scale_ablate_positions(setup):
    _, _, steering, sae, whitener = setup
    encode, _, directions = reference_maps(sae, whitener)
    cases = [(Steer(HOOK, 2, 3.0, "add", "prompt"), "prompt"), (Steer(HOOK, 2, 3.0, "add", "generated"), "generated"),
             (Steer(HOOK, TARGET, 0.5, "scale", (1, 3, 12)), (1, 3, 12)), (Steer(HOOK, TARGET, 0.0, "ablate"), "all")]
    for steer, where in cases:
        out = steering.generate_with_steering(PROMPTS[:2], [steer], capture=True, **GEN)
        cap = out.captured[HOOK]
        for i, (before, after) in enumerate(zip(cap.before, cap.after, strict=True)):
            n, prompt_len = before.shape[0], out.prompt_lengths[i]
            pos = np.arange(n)
            if isinstance(where, str):
                selected = {"prompt": pos < prompt_len, "generated": pos >= prompt_len, "all": pos >= 0}[where]
            else:
                selected = np.isin(pos, where)
            delta = (after - before).double().numpy()
            assert (delta[~selected] == 0).all()
            z = encode(before.numpy())[:, steer.feature]
            amount = {"add": np.full(n, steer.coefficient), "scale": (steer.coefficient - 1) * z, "ablate": -z}[steer.mode]
            np.testing.assert_allclose(delta[selected], amount[selected, None] * directions[steer.feature], atol=1e-4)
            assert selected.any()


def test_kv_cache_on_and_off_identical(setup):
    _, _, steering, _, _ = setup
    steers = [Steer(HOOK, 3, 6.0, "add", "generated"), Steer(HOOK, TARGET, 2.0, "clamp", (0, 2, 9)),
              Steer(HOOK, 7, 0.0, "ablate", "prompt")]
    with_cache = steering.generate_with_steering(PROMPTS, steers, use_past_kv_cache=True, capture=True, **GEN)
    without = steering.generate_with_steering(PROMPTS, steers, use_past_kv_cache=False, capture=True, **GEN)
    for a, b in zip(with_cache.tokens, without.tokens, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(with_cache.captured[HOOK].after, without.captured[HOOK].after, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_batch_equals_each_prompt_alone(setup):
    model, _, steering, _, _ = setup
    steers = [Steer(HOOK, 3, 8.0, "add", (0, 1, 4, 10)), Steer(HOOK, TARGET, 3.0, "clamp", "generated")]
    batch = steering.generate_with_steering(PROMPTS, steers, capture=True, **GEN)
    assert len({len(model.to_tokens(p)[0]) for p in PROMPTS}) == len(PROMPTS)  # really different lengths
    for i, prompt in enumerate(PROMPTS):
        alone = steering.generate_with_steering(prompt, steers, capture=True, **GEN)
        assert torch.equal(batch.tokens[i], alone.tokens[0])
        assert batch.completions[i] == alone.completions[0]
        torch.testing.assert_close(batch.captured[HOOK].after[i], alone.captured[HOOK].after[0], atol=1e-4, rtol=1e-4)
    one_by_one = steering.generate_with_steering(PROMPTS, steers, capture=True, batched=False, **GEN)
    assert one_by_one.completions == batch.completions and one_by_one.prompt_lengths == batch.prompt_lengths
    for a, b in zip(one_by_one.captured[HOOK].latents_after, batch.captured[HOOK].latents_after, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_pad_id_colliding_with_a_first_token_falls_back_to_one_prompt_at_a_time(setup, caplog):
    model, _, steering, _, _ = setup
    pad = model.tokenizer.pad_token
    prompts = [pad + " starts with the pad token", "Time flies"]  # no BOS: the pad id would be a first token
    with caplog.at_level("WARNING", logger="sae_core.steering"):
        out = steering.generate_with_steering(prompts, [Steer(HOOK, 3, 5.0)], prepend_bos=False, **GEN)
    assert "one prompt at a time" in caplog.text
    alone = steering.generate_with_steering(prompts[0], [Steer(HOOK, 3, 5.0)], prepend_bos=False, **GEN)
    assert out.tokens[0][0] == model.tokenizer.pad_token_id and torch.equal(out.tokens[0], alone.tokens[0])


def test_padded_positions_never_steered(setup):
    model, _, steering, _, _ = setup
    seen = {"pre": [], "post": []}

    def recorder(key):
        def record(activation, hook):
            seen[key].append(activation.clone())
        return record

    with model.hooks(fwd_hooks=[(HOOK, recorder("pre"))]):  # runs before the steering hook
        with steering.steer(HOOK, 3, 25.0):
            with model.hooks(fwd_hooks=[(HOOK, recorder("post"))]):  # runs after it
                steering.generate_with_steering(PROMPTS, use_past_kv_cache=False, **GEN)
    lengths = [len(model.to_tokens(p)[0]) for p in PROMPTS]
    n_pad = [max(lengths) - n for n in lengths]
    assert len(seen["pre"]) == GEN["max_new_tokens"]
    for pre, post in zip(seen["pre"], seen["post"], strict=True):
        for row, pads in enumerate(n_pad):
            assert torch.allclose(pre[row, :pads], post[row, :pads], rtol=0, atol=0, equal_nan=True)
            assert not torch.equal(pre[row, pads:], post[row, pads:])


def test_sampling_seeded(setup):
    model, _, steering, _, _ = setup
    kwargs = {"max_new_tokens": 6, "do_sample": True, "temperature": 1.0, "seed": 7}
    a = steering.generate_with_steering(PROMPTS, [Steer(HOOK, 3, 5.0)], **kwargs)
    b = steering.generate_with_steering(PROMPTS, [Steer(HOOK, 3, 5.0)], **kwargs)
    assert all(torch.equal(x, y) for x, y in zip(a.tokens, b.tokens, strict=True))
    zero = steering.generate_with_steering(PROMPTS[0], [Steer(HOOK, 3, 0.0)], **kwargs)
    torch.manual_seed(7)
    reference = model.generate(model.to_tokens(PROMPTS[0]), max_new_tokens=6, do_sample=True, verbose=False,
                               return_type="tokens")[0]
    assert torch.equal(zero.tokens[0], reference)


def test_hooks_removed_after_exception_and_clear(setup):
    model, _, steering, _, _ = setup
    point = model.hook_dict[HOOK]
    with pytest.raises(RuntimeError, match="boom"), steering.steer(HOOK, 3, 1.0):
        with steering.steer(1, TARGET, 2.0, mode="clamp"):  # layer index -> the loaded SAE's hook
            assert len(point._forward_hooks) == 1 and len(steering.active_steers) == 2
            raise RuntimeError("boom")
    assert len(point._forward_hooks) == 0 and point.fwd_hooks == [] and steering.active_steers == []
    with pytest.raises(TypeError):
        steering.generate_with_steering(PROMPTS[0], [Steer(HOOK, 3, 1.0)], max_new_tokens="two")
    assert len(point._forward_hooks) == 0
    steering.steer(HOOK, 3, 1.0)
    steering.steer(HOOK, 4, 1.0, mode="ablate")
    assert len(point._forward_hooks) == 1  # one hook per hook point
    steering.clear_steering()
    assert len(point._forward_hooks) == 0 and steering.active_steers == []


def test_bad_steers_rejected(setup):
    _, _, steering, _, _ = setup
    with pytest.raises(ValueError, match="mode"):
        Steer(HOOK, 0, 1.0, "multiply")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="positions"):
        Steer(HOOK, 0, 1.0, positions="last")
    with pytest.raises(IndexError, match="d_sae=16"):
        steering.steer(HOOK, D_SAE, 1.0)
    with pytest.raises(KeyError, match="no SAE loaded"):
        steering.steer("blocks.0.hook_resid_post", 0, 1.0)
    with pytest.raises(ValueError, match="twice"), steering.steer(HOOK, 2, 1.0, mode="clamp"):
        steering.steer(HOOK, 2, 0.0, mode="ablate")
    assert steering.active_steers == []


@pytest.mark.slow
def test_steering_raises_known_token_probability(smollm2):
    """A latent whose decoder row is a token's unembedding direction raises that token's probability."""
    model, hook, word = smollm2, "blocks.20.hook_resid_post", " cat"
    token = model.to_single_token(word)
    torch.manual_seed(0)
    sae = StandardSAE(StandardSAEConfig(d_in=model.cfg.d_model, d_sae=4))
    with torch.no_grad():
        sae.W_dec[0] = model.W_U[:, token] / model.W_U[:, token].norm()
        top_tokens = (sae.W_dec[0] @ model.W_U).topk(10).indices.tolist()
    assert token in top_tokens  # the latent's top-logit tokens are known and include the target
    manager = SAEManager(model)
    manager.add(hook, sae)
    steering = ModelSteering(model, manager)
    tokens = model.to_tokens("My favourite animal is the")
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=[hook])
        coefficient = float(cache[hook][0, -1].norm())  # as large as the activation itself
        clean = model(tokens)[0, -1].softmax(-1)[token].item()
        with steering.steer(hook, 0, coefficient):
            steered = model(tokens)[0, -1].softmax(-1)[token].item()
    assert steered > clean + 0.25 and steered > 10 * clean, (clean, steered)
    out = steering.generate_with_steering("My favourite animal is the", [Steer(hook, 0, coefficient)],
                                          max_new_tokens=3)
    assert word.strip() in out.completions[0]
