"""The steering dose-response sweep: coefficient 0 is the unsteered run; every score is recomputed
independently (numpy encode of ``run_with_cache`` activations, numpy softmax of plain model logits,
the steer added by a hand-written hook); on SmolLM2 the concept score rises with the coefficient.

Unit tests use the tiny random model with a tied SAE whose decoder rows are orthonormal in the
whitened space (as in ``test_steering.py``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sae_lens import StandardSAE, StandardSAEConfig

from sae_core import pipeline, plots
from sae_core.latents import CSRBuilder
from sae_core.saes import SAEManager
from sae_core.steering import (
    DoseRecord,
    LatentChoice,
    ModelSteering,
    choose_coefficient,
    dose_response,
    interpretable_latent,
    interpretable_latents,
    output_scores,
    screen_latents,
)
from sae_core.whitening import Whitener

HOOK = "blocks.1.hook_resid_post"
PROMPTS = ["The quick brown fox jumps over the lazy dog", "Time flies", "A journey of a thousand miles begins"]
FEATURE, TOP_TOKENS = 3, [11, 400, 2048]


@pytest.fixture(scope="module")
def setup(tiny_model, corpus_texts):
    rows = []
    with torch.no_grad():
        for text in corpus_texts[:20]:
            _, cache = tiny_model.run_with_cache(text[:200], names_filter=[HOOK])
            rows.append(cache[HOOK][0])
    acts = torch.cat(rows).double()
    whitener = Whitener.from_statistics(acts.mean(0), torch.cov(acts.T), acts.shape[0], eps=1e-4, hook=HOOK)
    q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((32, 16)))
    sae = StandardSAE(StandardSAEConfig(d_in=32, d_sae=16))
    with torch.no_grad():
        sae.W_dec.copy_(torch.tensor(q.T, dtype=torch.float32))
        sae.W_enc.copy_(torch.tensor(q, dtype=torch.float32))
        sae.b_dec.zero_()
        sae.b_enc.fill_(-0.5)  # latents fire on part of the tokens only
    manager = SAEManager(tiny_model)
    manager.add(HOOK, sae, whitener=whitener)
    return tiny_model, ModelSteering(tiny_model, manager), sae, whitener


def numpy_encode(sae, whitener, x):
    mean, transform = whitener.mean.numpy(), whitener.transform.numpy()
    w_enc, b_enc, b_dec = (t.detach().double().numpy() for t in (sae.W_enc, sae.b_enc, sae.b_dec))
    return np.maximum(((np.asarray(x, np.float64) - mean) @ transform - b_dec) @ w_enc + b_enc, 0.0)


def log_softmax(logits):
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


@pytest.fixture(scope="module")
def sweep(setup):
    _, steering, _, _ = setup
    return dose_response(steering, HOOK, FEATURE, [0.0, 3.0, 12.0], PROMPTS, TOP_TOKENS, max_new_tokens=6)


def test_coefficient_zero_is_the_unsteered_run(setup, sweep):
    model, steering, _, _ = setup
    zero = sweep.generations[sweep.index_of(0.0)]
    for i, prompt in enumerate(PROMPTS):
        plain = model.generate(model.to_tokens(prompt), max_new_tokens=6, do_sample=False, verbose=False,
                               return_type="tokens")[0]
        assert torch.equal(zero.tokens[i], plain)
    assert steering.active_steers == [] and len(model.hook_dict[HOOK]._forward_hooks) == 0
    assert any(not torch.equal(a, b) for a, b in zip(zero.tokens, sweep.generations[-1].tokens, strict=True))


def test_sampled_sweep_follows_the_steering_knobs(setup):
    """``STEERING`` do_sample / temperature / seed reach every coefficient: coefficient 0 is the plain
    model's own sampled generation under that seed."""
    from sae_core.config import SteeringConfig

    model, steering, _, _ = setup
    knobs = SteeringConfig(max_new_tokens=6, do_sample=True, temperature=0.8, seed=3)
    kwargs = knobs.generation_kwargs()
    assert kwargs == {"max_new_tokens": 6, "do_sample": True, "seed": 3, "temperature": 0.8}
    sampled = dose_response(steering, HOOK, FEATURE, [0.0, 3.0], PROMPTS[:1], TOP_TOKENS, **kwargs)
    torch.manual_seed(3)
    plain = model.generate(model.to_tokens(PROMPTS[0]), max_new_tokens=6, do_sample=True, temperature=0.8,
                           verbose=False, return_type="tokens")[0]
    assert torch.equal(sampled.generations[0].tokens[0], plain)
    greedy = SteeringConfig(max_new_tokens=6).generation_kwargs()
    assert greedy == {"max_new_tokens": 6, "do_sample": False, "seed": 0}  # no temperature when greedy


def test_scores_equal_an_independent_recomputation(setup, sweep):
    """Concept score: numpy encode of the plain model's activations; perplexity: numpy log-softmax of
    the plain model's logits; top-token probability: the steer added by a hook of our own."""
    model, steering, sae, whitener = setup
    direction = steering.manager.decoder_directions(HOOK, [FEATURE])[0]
    for record, generation in zip(sweep.records, sweep.generations, strict=True):
        fired, nll, top, distinct = [], [], [], []
        for tokens, start in zip(generation.tokens, generation.prompt_lengths, strict=True):
            distinct.append((len(np.unique(tokens[start:].numpy())), len(tokens) - start))
            with torch.no_grad():
                logits, cache = model.run_with_cache(tokens[None], names_filter=[HOOK])

                def add(act, hook, c=record.coefficient):
                    return act + c * direction

                with model.hooks(fwd_hooks=[(HOOK, add)]):
                    steered = model(tokens[None])[0]
            z = numpy_encode(sae, whitener, cache[HOOK][0].numpy())[start:, FEATURE]
            fired.append(z > 0)
            log_p = log_softmax(logits[0, start - 1:-1].numpy())
            nll.append(-log_p[np.arange(len(log_p)), tokens[start:].numpy()])
            top.append(np.exp(log_softmax(steered[start - 1:-1].numpy()))[:, TOP_TOKENS].sum(-1))
        assert record.concept_score == pytest.approx(np.concatenate(fired).mean(), abs=1e-12)
        assert record.perplexity == pytest.approx(np.exp(np.concatenate(nll).mean()), rel=1e-5)
        assert record.top_token_probability == pytest.approx(np.concatenate(top).mean(), rel=1e-5, abs=1e-9)
        assert record.distinct_fraction == sum(d for d, _ in distinct) / sum(n for _, n in distinct)
    scores = [r.concept_score for r in sweep.records]
    assert len(set(scores)) > 1 and 0 < max(scores)  # the latent fires, and steering moves it


def test_choose_coefficient_respects_the_perplexity_limit():
    records = [DoseRecord(0.0, 0.1, 0.01, 10.0, 0.8), DoseRecord(2.0, 0.3, 0.02, 15.0, 0.8),
               DoseRecord(4.0, 0.3, 0.05, 19.0, 0.7), DoseRecord(8.0, 0.9, 0.3, 25.0, 0.6)]
    assert choose_coefficient(records, 2.0) == records[1]  # 8.0 breaks the text; ties go to the smaller
    assert choose_coefficient(records, 3.0) == records[3]
    assert choose_coefficient(records[:1], 2.0) is None
    assert choose_coefficient([DoseRecord(0.0, 0.5, 0.0, 10.0, 0.8), DoseRecord(2.0, 0.4, 0.0, 11.0, 0.8)]) is None
    with pytest.raises(ValueError, match="coefficient 0.0"):
        choose_coefficient(records[1:])


def test_choose_coefficient_refuses_repetition_that_perplexity_lets_through():
    """The SmolLM2 case: one token sixteen times scores a perplexity below the unsteered text's."""
    zero, repeated = DoseRecord(0.0, 0.05, 0.0, 3.7, 0.77), DoseRecord(16.0, 1.0, 0.9, 3.5, 1 / 16)
    mild = DoseRecord(4.0, 0.3, 0.1, 5.0, 0.5)
    assert choose_coefficient([zero, repeated]) is None
    assert choose_coefficient([zero, mild, repeated]) == mild
    assert choose_coefficient([zero, mild, repeated], min_distinct_ratio=0.0) == repeated  # the limit off
    assert choose_coefficient([zero, mild, repeated], min_distinct_ratio=0.7) is None  # 0.5 < 0.7 * 0.77


def test_sweep_refuses_a_run_without_its_baseline(setup):
    _, steering, _, _ = setup
    with pytest.raises(ValueError, match="must include 0.0"):
        dose_response(steering, HOOK, FEATURE, [2.0, 4.0], PROMPTS, TOP_TOKENS)
    with pytest.raises(RuntimeError, match="steers are active"), steering.steer(HOOK, 2, 1.0):
        dose_response(steering, HOOK, FEATURE, [0.0], PROMPTS, TOP_TOKENS)


def test_interpretable_latent_reads_density_and_distinct_top_tokens(tmp_path):
    rng = np.random.default_rng(0)
    n, d = 400, 6
    dense = np.zeros((n, d), np.float32)
    tokens = rng.integers(0, 50, n)
    dense[:4, 0] = 9.0  # strongest, but fires on one token only
    tokens[:4] = 7
    dense[10:30, 1] = rng.uniform(1, 5, 20)  # several tokens, in the band
    dense[:, 2] = 1.0  # fires everywhere: out of the band
    dense[40:60, 3] = 20.0  # strongest in the band, on many distinct tokens that are not words
    tokens[40:60] = np.arange(100, 120)
    with CSRBuilder(workdir=tmp_path) as builder:
        builder.add(dense, torch.from_numpy(tokens), np.zeros(n, np.int64), np.arange(n))
        csr = builder.finish(tmp_path / "csr")
    density = (dense != 0).mean(0)
    def decode(token):
        return str(token) if token >= 100 else " w" + "abcdefghijklmnopqrstuvwxyz"[token % 26] * 2

    assert interpretable_latent(csr, density, band=(0.005, 0.2), min_distinct_tokens=3, k=10).feature == 3
    choice = interpretable_latent(csr, density, band=(0.005, 0.2), min_distinct_tokens=3, k=10, decode=decode)
    assert choice.feature == 1 and choice.density == pytest.approx(0.05)
    assert choice.mean_activation == pytest.approx(dense[10:30, 1].mean(), rel=1e-6)
    top = np.argsort(-dense[:, 1], kind="stable")[:10]
    assert choice.top_token_ids == list(dict.fromkeys(tokens[top].tolist()))
    assert interpretable_latent(csr, density, band=(0.005, 0.2), min_distinct_tokens=1, decode=decode).feature == 0
    with pytest.raises(ValueError, match="density_band"):
        interpretable_latent(csr, density, band=(0.5, 0.6))
    # several candidates, strongest first (max activation 20 > 9 > ~5): 3 and 1 qualify on tokens, 0 too at 1 token
    assert [c.feature for c in interpretable_latents(csr, density, band=(0.005, 0.2), min_distinct_tokens=3,
                                                     count=5)] == [3, 1]
    assert [c.feature for c in interpretable_latents(csr, density, band=(0.005, 0.2), min_distinct_tokens=1,
                                                     count=2)] == [3, 0]


def independent_output_score(model, manager, choice, prompts, multiple):
    """Each prompt on its own (no padding), the steer added by a hook of our own, numpy softmax."""
    direction = manager.decoder_directions(HOOK, [choice.feature])[0]
    rises = []
    for prompt in prompts:
        tokens = model.to_tokens(prompt)
        with torch.no_grad():
            plain = model(tokens)[0].numpy()
            with model.hooks(fwd_hooks=[(HOOK, lambda act, hook: act + multiple * choice.mean_activation * direction)]):
                steered = model(tokens)[0].numpy()
        mass = lambda logits: np.exp(log_softmax(logits))[:, sorted(set(choice.top_token_ids))].sum(-1)  # noqa: E731
        rises.append(mass(steered) - mass(plain))
    return float(np.concatenate(rises).mean())


def test_output_scores_equal_an_independent_recomputation_and_order_the_screen(setup):
    model, steering, _, _ = setup
    rng = np.random.default_rng(1)
    choices = [LatentChoice(f, 0.01, float(rng.uniform(0.5, 3.0)), rng.integers(0, 2000, 3).tolist())
               for f in (5, 0, 9, 3, 12)]
    expected = np.array([independent_output_score(model, steering.manager, c, PROMPTS, 4.0) for c in choices])
    assert output_scores(steering, HOOK, choices, PROMPTS, 4.0) == pytest.approx(expected.tolist(), rel=1e-5, abs=1e-12)
    screened = screen_latents(steering, HOOK, choices, PROMPTS, 4.0)
    assert [c.feature for c in screened] == [choices[i].feature for i in np.argsort(-expected, kind="stable")]
    assert [c.output_score for c in screened] == pytest.approx(sorted(expected, reverse=True), rel=1e-5, abs=1e-12)
    assert len(set(np.round(expected, 12))) > 1  # the screen has something to order
    assert steering.active_steers == [] and len(model.hook_dict[HOOK]._forward_hooks) == 0
    with steering.steer(HOOK, 0, 1.0), pytest.raises(RuntimeError, match="clear_steering"):
        output_scores(steering, HOOK, choices, PROMPTS, 4.0)


def test_pipeline_screens_the_interpretable_latents_by_output_score(setup, tmp_path):
    """``steering_latents`` with a ``ModelSteering``: the interpretable latents of the analysis, reordered by
    their output scores; without it (or with ``screen=0``), strongest-firing first."""
    from types import SimpleNamespace

    from sae_core.models import load_run_config

    _, steering, _, _ = setup
    rng = np.random.default_rng(0)
    n, dense, tokens = 400, np.zeros((400, 16), np.float32), rng.integers(0, 2000, 400)
    for feature, (rows, strength) in {2: (slice(10, 30), 9.0), 6: (slice(40, 60), 5.0), 11: (slice(70, 90), 3.0)}.items():
        dense[rows, feature] = strength * rng.uniform(0.5, 1.0, 20)
    with CSRBuilder(workdir=tmp_path) as builder:
        builder.add(dense, torch.from_numpy(tokens), np.zeros(n, np.int64), np.arange(n))
        csr = builder.finish(tmp_path / "csr")
    analysis = SimpleNamespace(csr=csr, density=(dense != 0).mean(0), hook=HOOK)
    run = load_run_config("tiny_random", ["steering.density_band=(0.01, 0.2)", "steering.candidates=2",
                                          "steering.screen=3", f"steering.prompts={tuple(PROMPTS)!r}"])
    strongest = pipeline.steering_latents(run, analysis, None)
    assert [c.feature for c in strongest] == [2, 6] and all(c.output_score is None for c in strongest)
    every = pipeline.steering_latents(run, analysis, None, count=3)
    scores = output_scores(steering, HOOK, every, PROMPTS, run.steering.screen_multiple)
    screened = pipeline.steering_latents(run, analysis, None, steering=steering)
    assert [c.feature for c in screened] == [every[i].feature for i in np.argsort(-np.array(scores), kind="stable")[:2]]
    off = load_run_config("tiny_random", ["steering.density_band=(0.01, 0.2)", "steering.candidates=2", "steering.screen=0"])
    assert [c.feature for c in pipeline.steering_latents(off, analysis, None, steering=steering)] == [2, 6]


def test_steering_config_refuses_a_bad_screen():
    from sae_core.config import ConfigError, SteeringConfig

    with pytest.raises(ConfigError, match="screen at least 0"):
        SteeringConfig(screen=-1)
    with pytest.raises(ConfigError, match="screen_multiple must be positive"):
        SteeringConfig(screen_multiple=0.0)


def test_dose_response_figure_plots_the_records():
    records = [DoseRecord(4.0, 0.5, 0.2, 30.0, 0.25), DoseRecord(0.0, 0.1, 0.01, 12.0, 0.75)]
    fig = plots.steering_dose_response([r.to_json() for r in records], chosen=4.0, max_perplexity=24.0,
                                       min_distinct=0.375)
    by_name = {trace.name: trace for trace in fig.data}
    assert list(by_name["distinct-token fraction"].y) == [0.75, 0.25]
    assert sorted(shape.y0 for shape in fig.layout.shapes if shape.y0 == shape.y1) == [0.375, 24.0]
    assert list(by_name["perplexity"].x) == [0.0, 4.0] and list(by_name["perplexity"].y) == [12.0, 30.0]
    assert list(by_name["concept score (latent fires)"].y) == [0.1, 0.5]
    assert list(by_name["top-token probability"].y) == [0.01, 0.2]


@pytest.mark.slow
def test_smollm2_concept_score_rises_with_the_coefficient(smollm2):
    """A latent that reads "the current token is cat" (a probe fitted here: mean activation at " cat"
    tokens minus elsewhere) and writes the unembedding direction of " cat": steering makes the model
    write about cats, and the unsteered model's activations on that text then fire the latent."""
    model, hook = smollm2, "blocks.20.hook_resid_post"
    token = model.to_single_token(" cat")
    tokens = model.to_tokens(["The cat sat on the mat and my cat ate the fish", "A black cat and a dog saw a cat",
                              "cat cat dog cat cat bird cat cat"])  # repetition too: what strong steering writes
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=[hook])
        acts, is_cat = cache[hook][:, 1:].reshape(-1, model.cfg.d_model), (tokens[:, 1:] == token).reshape(-1)
        probe = acts[is_cat].mean(0) - acts[~is_cat].mean(0)
        probe /= probe.norm()
        threshold = float((acts[~is_cat] @ probe).max())  # just above every other token of the fit
        sae = StandardSAE(StandardSAEConfig(d_in=model.cfg.d_model, d_sae=2))
        for p in (sae.W_enc, sae.W_dec, sae.b_enc, sae.b_dec):
            p.zero_()
        sae.W_enc[:, 0], sae.b_enc[0] = probe, -threshold
        sae.W_dec[0] = model.W_U[:, token] / model.W_U[:, token].norm()
        scale = float(acts.norm(dim=-1).mean())
    assert (acts[is_cat] @ probe > threshold).float().mean() > 0.8  # the probe finds its own examples
    manager = SAEManager(model)
    manager.add(hook, sae)
    prompts = ["My favourite animal is the", "Yesterday I saw a"]
    sweep = dose_response(ModelSteering(model, manager), hook, 0, [0.0, scale], prompts, [token], max_new_tokens=6)
    for i, prompt in enumerate(prompts):
        plain = model.generate(model.to_tokens(prompt), max_new_tokens=6, do_sample=False, verbose=False,
                               return_type="tokens")[0]
        assert torch.equal(sweep.generations[0].tokens[i], plain)
    zero, strong = sweep.records
    assert strong.concept_score > zero.concept_score + 0.25, sweep.records
    assert strong.top_token_probability > zero.top_token_probability + 0.3, sweep.records
