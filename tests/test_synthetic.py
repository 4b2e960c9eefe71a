"""Golden test of the training stack on SAELens's synthetic benchmark (no model needed).

Ground truth: ``sae_lens.synthetic`` (6.54): a ``FeatureDictionary`` of 128 unit features in 64
dimensions (orthogonalised, so 2x superposition) and an ``ActivationGenerator`` with Zipfian
firing probabilities (8% down to 1%), magnitudes 1 +- 0.2, a random feature correlation matrix
(|rho| 0.05-0.3) and a hierarchy (``generate_hierarchy``: 8 roots with 4 children each, half of
them with mutually exclusive children, probabilities compensated). 300k rows are drawn
once and fed to ``sae_core.training.train_from_activations`` as stored chunks, i.e. through our
loop (``TensorChunkSource``, ``BlockShuffler``, our steps) with the package defaults except the
sparsity knobs, d_sae = 128, batches of 1024 rows. Scores: SAELens's ``eval_sae_on_synthetic_data``
(MCC, uniqueness, dead latents over 20k fresh rows), plus our own check of the decoder against
the true dictionary: the fraction of true features whose best-matching decoder row has cosine >
0.9, and the mean cosine of a one-to-one matching (``scipy.optimize.linear_sum_assignment``;
SAELens has no ``match_features``), which must also reproduce SAELens's MCC (|cos|).

Calibration (seeds 0, 1, 2 of this exact setting; torch on 1 thread; each run 3-7 s on a loaded
2-core CPU):

==========  =====================  ===================  =================  ==========  ==============
arch        knobs                  MCC                  uniqueness         dead / 128  best cos > 0.9
==========  =====================  ===================  =================  ==========  ==============
topk        k=4                    0.783 0.804 0.790    0.734 0.758 0.734  0 0 0       0.66 0.73 0.71
batchtopk   k=2                    0.765 0.759 0.782    0.766 0.734 0.766  15 13 15    0.59 0.57 0.63
jumprelu    defaults               0.821 0.806 0.811    0.773 0.750 0.758  26 31 31    0.76 0.74 0.74
standard    l1_coefficient=0.5     0.693 0.721 0.775    0.633 0.672 0.734  2 2 0       0.59 0.63 0.70
matryoshka  k=2, levels 16/32/64   0.769 0.729 0.745    0.773 0.727 0.750  15 12 13    0.56 0.49 0.55
==========  =====================  ===================  =================  ==========  ==============

Matryoshka BatchTopK (SAELens's ``MatryoshkaBatchTopKTrainingSAE``, trained through its
``training_forward_pass``; default levels d_sae/8, /4, /2, d_sae) scores like BatchTopK at the same
k, and k=3 / 4 scored lower (MCC 0.69 / 0.65). What sets it apart is the order of its latents:
the nested losses make the first level learn the frequent features. Matching each latent to its
true feature (one-to-one, as above), the mean firing rate of the features behind latents 0-15
over that behind latents 64-127 was 2.74 / 2.77 / 2.95 for Matryoshka and 0.91 / 0.71 / 0.75 for
BatchTopK (same seeds, k=2); the test asks >= 1.8 of Matryoshka and <= 1.3 of BatchTopK (the
control: an SAE whose latent order means nothing).

One-to-one mean cosine (signed) stayed within 0.02 of MCC in every run. MCC and recovered-feature
thresholds sit ~0.06 under the worst seed, dead latents ~10 over it. Uniqueness separates little:
an untrained SAE already scores 0.69 (random directions in 64 dimensions mostly pick distinct
best matches), against MCC 0.36 and no feature recovered, so its bars sit ~0.03 under the worst
seed and the standard SAE (0.633) is only held to 0.60. For scale, SAELens's own
``train_toy_sae`` (TopK k=4, 300k rows) reached MCC 0.83 (lr 4e-3) / 0.69 (1e-3) / 0.55 (3e-4) on
an independent-feature variant (256 features in 64 dimensions) where our loop reached 0.86, so the
ceiling at this budget is the problem's, not the loop's. JumpReLU leaves the rarest features dead; TopK
(AuxK) leaves none.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

synthetic = pytest.importorskip("sae_lens.synthetic")
pytestmark = pytest.mark.slow  # ~1 min: 300k rows per architecture

from sae_core.config import TrainingConfig, build_flat  # noqa: E402
from sae_core.training import build_training_sae, train_from_activations  # noqa: E402

D_IN, N_FEATURES, ROWS, EVAL_ROWS, SEED = 64, 128, 300_000, 20_000, 0

CASES = {  # architecture: (knobs, thresholds)
    "topk": (dict(k=4), dict(mcc=0.72, uniqueness=0.70, dead=10, recovered=0.58)),
    "batchtopk": (dict(k=2), dict(mcc=0.70, uniqueness=0.70, dead=26, recovered=0.48)),
    "jumprelu": (dict(), dict(mcc=0.74, uniqueness=0.72, dead=42, recovered=0.65)),
    "standard": (dict(l1_coefficient=0.5), dict(mcc=0.63, uniqueness=0.60, dead=10, recovered=0.50)),
    "matryoshka_batchtopk": (dict(k=2), dict(mcc=0.67, uniqueness=0.70, dead=25, recovered=0.43)),
}
LEVEL_ORDER = {"matryoshka_batchtopk": (1.8, None), "batchtopk": (None, 1.3)}  # (min, max) of level_order()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls: a second thread only contends for the shared cores (8x slower when loaded)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _benchmark(seed: int) -> tuple[object, object]:
    """SAELens's feature dictionary and a correlated, hierarchical activation generator."""
    torch.manual_seed(seed)
    features = synthetic.FeatureDictionary(N_FEATURES, D_IN, seed=seed)
    hierarchy = synthetic.generate_hierarchy(N_FEATURES, synthetic.HierarchyConfig(
        total_root_nodes=N_FEATURES // 16, branching_factor=4, max_depth=1, mutually_exclusive_portion=0.5,
        compensate_probabilities=True), seed=seed)
    generator = synthetic.ActivationGenerator(
        N_FEATURES, synthetic.zipfian_firing_probabilities(N_FEATURES, exponent=0.5, max_prob=0.08, min_prob=0.01),
        std_firing_magnitudes=0.2, mean_firing_magnitudes=1.0, modify_activations=hierarchy.modifier,
        correlation_matrix=synthetic.generate_random_correlation_matrix(
            N_FEATURES, min_correlation_strength=0.05, max_correlation_strength=0.3, seed=seed))
    return features, generator


@pytest.fixture(scope="module")
def benchmark(one_thread):
    """The benchmark of seed 0 and its 300k training rows (~8 s to draw: the correlated sampler)."""
    features, generator = _benchmark(SEED)
    torch.manual_seed(SEED + 100)
    with torch.no_grad():
        chunks = [features(generator.sample(8192)) for _ in range(-(-ROWS // 8192))]
    torch.manual_seed(SEED + 300)
    frequency = (generator.sample(EVAL_ROWS) > 0).double().mean(0).numpy()  # each true feature's firing rate
    return features, generator, chunks, frequency


def _config(architecture: str, knobs: dict) -> TrainingConfig:
    return build_flat(TrainingConfig, "training", hook_points=("synthetic",), architecture=architecture,
                      d_sae=N_FEATURES, train_batch_size_tokens=1024, total_training_tokens=ROWS,
                      shuffle_buffer_tokens=8192, checkpoint_every_tokens=None, dead_window_tokens=50_000, seed=SEED,
                      sae_dtype="float32", **knobs)


def _decoder_match(decoder: torch.Tensor, truth: torch.Tensor) -> tuple[float, float, float]:
    """(fraction of true features with a decoder row at cosine > 0.9, one-to-one mean cosine, same with |cos|)."""
    dec = decoder.detach().double()
    dec = dec / dec.norm(dim=1, keepdim=True)
    true = truth.detach().double()
    true = true / true.norm(dim=1, keepdim=True)
    cos = (true @ dec.T).numpy()  # (features, latents)
    rows, cols = linear_sum_assignment(-cos)
    abs_rows, abs_cols = linear_sum_assignment(-np.abs(cos))
    return float((cos.max(axis=1) > 0.9).mean()), float(cos[rows, cols].mean()), float(np.abs(cos)[abs_rows, abs_cols].mean())


@pytest.mark.parametrize("architecture", sorted(CASES))
def test_training_recovers_the_true_features(architecture, benchmark, tmp_path):
    features, generator, chunks, frequency = benchmark
    knobs, bar = CASES[architecture]
    run = train_from_activations(lambda: iter(chunks), _config(architecture, knobs), tmp_path)
    sae = run.saes["synthetic"].sae
    torch.manual_seed(SEED + 200)
    result = synthetic.eval_sae_on_synthetic_data(sae, features, generator, num_samples=EVAL_ROWS)
    recovered, one_to_one, one_to_one_abs = _decoder_match(sae.W_dec, features.feature_vectors)
    summary = (f"{architecture}: MCC {result.mcc:.3f}, uniqueness {result.uniqueness:.3f}, dead {result.dead_latents}, "
               f"recovered {recovered:.3f}, one-to-one {one_to_one:.3f}, EV {result.explained_variance:.3f}")
    assert result.mcc >= bar["mcc"], summary
    assert result.uniqueness >= bar["uniqueness"], summary
    assert result.dead_latents <= bar["dead"], summary
    assert recovered >= bar["recovered"], summary
    assert one_to_one_abs == pytest.approx(result.mcc, abs=1e-5), summary  # our matching reproduces SAELens's MCC
    assert one_to_one >= result.mcc - 0.03, summary  # the matched rows point the right way, not just parallel
    if architecture in LEVEL_ORDER:
        low, high = LEVEL_ORDER[architecture]
        order = level_order(sae.W_dec, features.feature_vectors, frequency)
        assert low is None or order >= low, f"{summary}, level order {order:.2f}"
        assert high is None or order <= high, f"{summary}, level order {order:.2f}"


def level_order(decoder: torch.Tensor, truth: torch.Tensor, frequency: np.ndarray) -> float:
    """Mean firing rate of the true features matched (one-to-one) to latents 0-15 over that of latents 64-127."""
    dec = torch.nn.functional.normalize(decoder.detach().double(), dim=1)
    cos = (torch.nn.functional.normalize(truth.detach().double(), dim=1) @ dec.T).numpy()
    features, latents = linear_sum_assignment(-cos)
    matched = np.empty(cos.shape[1], dtype=int)
    matched[latents] = features
    rate = frequency[matched]
    return float(rate[:N_FEATURES // 8].mean() / rate[N_FEATURES // 2:].mean())


def test_an_untrained_sae_fails_the_bar(benchmark):
    """The negative control: the same scores on an SAE at initialisation fall far below every threshold."""
    features, generator, _, _ = benchmark
    sae = build_training_sae(_config("topk", dict(k=4)), D_IN, "synthetic", SEED)
    torch.manual_seed(SEED + 200)
    result = synthetic.eval_sae_on_synthetic_data(sae, features, generator, num_samples=EVAL_ROWS)
    recovered, _, _ = _decoder_match(sae.W_dec, features.feature_vectors)
    assert result.mcc < min(bar["mcc"] for _, bar in CASES.values()) - 0.2  # measured 0.356
    assert recovered < 0.05  # measured 0.0
