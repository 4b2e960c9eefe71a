"""The feature browser: every number on a latent's view against an independent computation, the
Neuronpedia export's layout, and the pages in a real headless Chromium loaded from ``file://``."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from sae_core.browser import build_browser, chunk_file, read_data
from sae_core.browser.data import BrowserConfig
from sae_core.latents import CSRBuilder, top_activating_examples
from sae_core.similarity import compute_feature_cooccurrence, similarity_blocks, top_k_neighbours
from sae_core.whitening import Whitener

N, ROWS, D = 40, 640, 32
DEAD = (3, 11)
JUNE_LATENT = 7
CONFIG = BrowserConfig(chunk_latents=16, top_k_examples=6, n_quantiles=4, examples_per_quantile=2,
                       context_window=5, n_bins=12, n_logits=10, n_neighbours=6, pmi_min_count=2,
                       heatmap_latents=20)
# NeuronpediaDashboardFeature.to_dict() keys (sae_dashboard/neuronpedia/neuronpedia_dashboard.py)
NEURONPEDIA_FEATURE_KEYS = {
    "feature_index", "neuron_alignment_indices", "neuron_alignment_values", "neuron_alignment_l1",
    "correlated_neurons_indices", "correlated_neurons_l1", "correlated_neurons_pearson",
    "correlated_features_indices", "correlated_features_l1", "correlated_features_pearson", "neg_str",
    "neg_values", "pos_str", "pos_values", "frac_nonzero", "freq_hist_data_bar_values",
    "freq_hist_data_bar_heights", "logits_hist_data_bar_heights", "logits_hist_data_bar_values",
    "n_prompts_total", "n_tokens_in_prompt", "dataset", "decoder_weights_dist", "activations", "vector"}
NEURONPEDIA_ACTIVATION_KEYS = {"bin_min", "bin_max", "bin_contains", "tokens", "values", "qualifying_token_index"}
STEERING = {5: [{"coefficient": 0.0, "concept_score": 0.1, "perplexity": 11.0, "distinct_fraction": 0.8},
                {"coefficient": 4.0, "concept_score": 0.6, "perplexity": 14.5, "distinct_fraction": 0.25}]}
ATOL = 2e-5


@pytest.fixture(scope="module")
def june(tiny_model) -> int:
    return tiny_model.tokenizer.encode(" June", add_special_tokens=False)[0]


@pytest.fixture(scope="module")
def store(tmp_path_factory, june):
    """A synthetic CSR: random firings, two dead latents, ties in latent 9, latent 7 firing hard on ' June'."""
    rng = np.random.default_rng(0)
    dense = np.where(rng.random((ROWS, N)) < 0.1, rng.random((ROWS, N)) + 0.05, 0).astype(np.float32)
    dense[:, DEAD] = 0
    dense[rng.choice(ROWS, 30, replace=False), 9] = 0.5  # tied values: ties go to the lower row
    tokens = rng.integers(200, 700, ROWS)
    tokens[rng.choice(ROWS, 12, replace=False)] = june
    dense[tokens == june, JUNE_LATENT] = 2.0 + rng.random(int((tokens == june).sum()))
    lengths = rng.integers(5, 60, 40)
    doc = np.repeat(np.arange(lengths.size), lengths)[:ROWS]
    position = np.concatenate([np.arange(n) for n in lengths])[:ROWS]
    folder = tmp_path_factory.mktemp("store")
    with CSRBuilder(N, workdir=folder) as builder:
        for start in range(0, ROWS, 100):  # several batches, like a real encode
            part = slice(start, start + 100)
            builder.add(dense[part], tokens[part], doc[part], position[part])
        csr = builder.finish(folder / "latents")
    W_dec = rng.standard_normal((N, D)).astype(np.float32)
    W_dec[JUNE_LATENT + 1] = W_dec[JUNE_LATENT] + 0.05 * rng.standard_normal(D)  # a clear decoder neighbour
    return csr, dense.astype(np.float64), W_dec


@pytest.fixture(scope="module")
def built(tmp_path_factory, store, tiny_model):
    csr, _, W_dec = store
    out = tmp_path_factory.mktemp("browser") / "browser"
    index = build_browser(out, csr, W_dec, tiny_model.W_U, tiny_model.tokenizer, config=CONFIG, steering=STEERING,
                          neuronpedia={"model_id": "tiny", "layer": 1, "sae_set": "test"}, progress=False)
    records = [r for chunk in range(-(-N // CONFIG.chunk_latents)) for r in read_data(out / chunk_file(chunk))]
    return index, records


def dense_top_k(values: np.ndarray, k: int) -> np.ndarray:
    """Top-k values of each row, descending (self entries must already be -inf)."""
    return -np.sort(-values, axis=1)[:, :k]


def check_pairs(pairs, row: np.ndarray, k: int) -> None:
    """``pairs`` are the top ``k`` finite entries of ``row``: the same values, each at its id."""
    expected = dense_top_k(row[None], k)[0]
    expected = expected[np.isfinite(expected)]
    np.testing.assert_allclose([v for _, v in pairs], expected, atol=ATOL)
    for latent, value in pairs:
        assert abs(row[latent] - value) < ATOL


def test_statistics_histogram_and_top_tokens(store, built):
    csr, dense, _ = store
    _, records = built
    assert [r["id"] for r in records] == list(range(N))
    for latent, record in enumerate(records):
        column = dense[:, latent]
        fired = column[column != 0]
        assert record["count"] == fired.size
        assert record["density"] == pytest.approx(fired.size / ROWS)
        if latent in DEAD:
            assert fired.size == 0 and record["top"] == [] and record["summary"].startswith("dead")
            continue
        assert record["max"] == pytest.approx(fired.max(), abs=ATOL)
        assert record["mean"] == pytest.approx(fired.mean(), abs=ATOL)
        counts, _ = np.histogram(fired, CONFIG.n_bins, range=(min(0.0, fired.min()), fired.max()))
        assert record["hist"]["counts"] == counts.tolist()
        best = {}  # token -> highest activation on it
        for token, value in zip(np.asarray(csr.token_ids)[column != 0].tolist(), fired.tolist(), strict=True):
            best[token] = max(best.get(token, 0.0), value)
        expected = sorted(best.items(), key=lambda tv: (-tv[1], tv[0]))[:CONFIG.n_top_tokens]
        assert [t for t, _ in record["top_tokens"]] == [t for t, _ in expected]


def test_top_and_quantile_examples(store, built):
    csr, dense, _ = store
    _, records = built
    reference = top_activating_examples(csr, k=CONFIG.top_k_examples, context_window=CONFIG.context_window)
    for latent, record in enumerate(records):
        column = dense[:, latent]
        rows = np.flatnonzero(column)
        order = rows[np.lexsort((rows, -column[rows]))]  # by value, ties lower row first
        assert [ex["row"] for ex in record["top"]] == order[:CONFIG.top_k_examples].tolist()
        for ex, ref in zip(record["top"], reference[latent], strict=True):
            assert ex["tokens"] == ref.context_token_ids.tolist() and ex["focus"] == ref.focus
            assert ex["value"] == pytest.approx(column[ex["row"]], abs=ATOL)
            context = np.arange(ex["row"] - ex["focus"], ex["row"] - ex["focus"] + len(ex["tokens"]))
            np.testing.assert_allclose(ex["acts"], column[context], atol=ATOL)  # every token's value
            assert ex["doc"] == csr.doc_index[ex["row"]] and ex["position"] == csr.position[ex["row"]]
        if not rows.size:
            continue
        ranked = column[order]
        assert sum(g["share"] for g in record["quantiles"]) == pytest.approx(1.0, abs=1e-4)
        for g, group in enumerate(record["quantiles"]):
            members = ranked[g * rows.size // CONFIG.n_quantiles:(g + 1) * rows.size // CONFIG.n_quantiles]
            assert group["hi"] == pytest.approx(members.max(), abs=ATOL)
            assert group["lo"] == pytest.approx(members.min(), abs=ATOL)
            assert len(group["examples"]) == min(CONFIG.examples_per_quantile, members.size)
            for ex in group["examples"]:
                assert members.min() - ATOL <= column[ex["row"]] <= members.max() + ATOL
                assert ex["acts"][ex["focus"]] == pytest.approx(column[ex["row"]], abs=ATOL)


def logit_lens_reference(directions: np.ndarray, W_U: np.ndarray, k: int):
    logits = directions.astype(np.float64) @ W_U.astype(np.float64)
    return np.argsort(-logits, axis=1)[:, :k], np.argsort(logits, axis=1)[:, :k], logits


def test_logit_lens(store, built, tiny_model):
    _, _, W_dec = store
    _, records = built
    W_U = tiny_model.W_U.detach().numpy()
    top, bottom, logits = logit_lens_reference(W_dec, W_U, CONFIG.n_logits)
    for latent, record in enumerate(records):
        assert [t for t, _ in record["logits"]["pos"]] == top[latent].tolist()
        assert [t for t, _ in record["logits"]["neg"]] == bottom[latent].tolist()
        np.testing.assert_allclose([v for _, v in record["logits"]["pos"]], logits[latent, top[latent]], atol=1e-4)
        counts, _ = np.histogram(logits[latent], CONFIG.n_bins)
        assert np.abs(np.asarray(record["logit_hist"]["counts"]) - counts).sum() <= 2  # float32 vs float64 edges


def test_logit_lens_breaks_ties_towards_the_lower_token_and_bins_as_numpy():
    from sae_core.browser.relations import logit_lens

    rng = np.random.default_rng(0)
    W_U = rng.standard_normal((8, 300)).astype(np.float32)
    W_U[:, 17] = W_U[:, 5]  # every row has a tie between tokens 5 and 17
    directions = rng.standard_normal((6, 8)).astype(np.float32)
    directions[2] = 0  # a dead latent: all 300 logits tie
    directions[4] = W_U[:, 5] * 3  # tokens 5 and 17 tie at the top
    lens = logit_lens(directions, W_U, 10, 12)
    logits = directions.astype(np.float64) @ W_U.astype(np.float64)
    ids = np.arange(300)
    for row in range(6):
        best = np.lexsort((ids, -logits[row]))[:10]  # ties: lower id first
        worst = np.lexsort((ids, logits[row]))[:10]
        assert lens.top.indices[row].tolist() == best.tolist(), row
        assert lens.bottom.indices[row].tolist() == worst.tolist(), row
        np.testing.assert_allclose(lens.top.values[row], logits[row, best], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(lens.bottom.values[row], logits[row, worst], rtol=1e-5, atol=1e-5)
        counts, _ = np.histogram(logits[row], 12)
        assert np.abs(lens.hist_counts[row] - counts).sum() <= 2, row  # float32 vs float64 bin edges
    assert lens.top.indices[4][:2].tolist() == [5, 17]
    assert lens.hist_counts[2].tolist() == np.histogram(np.zeros(300), 12)[0].tolist()


def test_logit_lens_of_a_whitened_sae(tmp_path, store, tiny_model):
    csr, _, W_dec = store
    rng = np.random.default_rng(1)
    mixing = torch.from_numpy(rng.standard_normal((D, D)))
    whitener = Whitener.from_statistics(torch.from_numpy(rng.standard_normal(D)), mixing @ mixing.T + torch.eye(D),
                                        1000, method="pca")
    build_browser(tmp_path / "b", csr, W_dec, tiny_model.W_U, tiny_model.tokenizer, whitener=whitener,
                  config=CONFIG, progress=False)
    records = read_data(tmp_path / "b" / chunk_file(0))
    # the residual-stream direction as SAEManager.decoder_directions defines it: unwhiten(W_dec) - unwhiten(0)
    z = torch.from_numpy(W_dec).double()
    directions = (whitener.reverse(z) - whitener.reverse(torch.zeros(1, D, dtype=torch.float64))).numpy()
    top, bottom, _ = logit_lens_reference(directions, tiny_model.W_U.detach().numpy(), CONFIG.n_logits)
    for record in records:
        assert [t for t, _ in record["logits"]["pos"]] == top[record["id"]].tolist()
        assert [t for t, _ in record["logits"]["neg"]] == bottom[record["id"]].tolist()


def test_decoder_neighbours_and_heatmap(store, built, tmp_path):
    csr, _, W_dec = store
    index, records = built
    unit = W_dec / np.linalg.norm(W_dec, axis=1, keepdims=True)
    cosine = unit.astype(np.float64) @ unit.T.astype(np.float64)
    np.fill_diagonal(cosine, -np.inf)
    for latent, record in enumerate(records):
        check_pairs(record["neighbours"], cosine[latent], CONFIG.n_neighbours)
    assert records[JUNE_LATENT]["neighbours"][0][0] == JUNE_LATENT + 1
    heat = read_data(index.parent / "data" / "index.js")["heatmap"]
    ids = np.asarray(heat["ids"])
    assert ids.size == CONFIG.heatmap_latents == np.unique(ids).size and not set(ids.tolist()) & set(DEAD)
    np.fill_diagonal(cosine, 1.0)
    np.testing.assert_allclose(heat["values"], cosine[np.ix_(ids, ids)], atol=1e-3)
    # a stored neighbours file gives the same tables
    top_k_neighbours(similarity_blocks(W_dec, "cosine", 8), 6, out=tmp_path, name="decoder_neighbours", progress=False)
    build_browser(tmp_path / "b", csr, W_dec, np.zeros((D, 50), np.float32), [f"t{i}" for i in range(50)],
                  neighbours_path=tmp_path / "decoder_neighbours_indices.npy", config=CONFIG, progress=False)
    stored = read_data(tmp_path / "b" / chunk_file(0))
    assert [r["neighbours"] for r in stored] == [r["neighbours"] for r in records[:CONFIG.chunk_latents]]


@pytest.mark.parametrize("metric", [None, "jaccard", "count", "correlation", "pmi"])
def test_cooccurring_latents(tmp_path, store, tiny_model, metric):
    csr, dense, W_dec = store
    path = None if metric is None else compute_feature_cooccurrence(csr, metric, 7, out=tmp_path)
    build_browser(tmp_path / "b", csr, W_dec, np.zeros((D, 50), np.float32), [f"t{i}" for i in range(50)],
                  cooccurrence_path=path, config=CONFIG, progress=False)
    records = [r for c in range(3) for r in read_data(tmp_path / "b" / chunk_file(c))]
    binary = (dense != 0).astype(np.float64)
    counts = binary.T @ binary  # (n, n) exact co-firing counts
    n_i = binary.sum(axis=0)
    union = n_i[:, None] + n_i[None, :] - counts
    jaccard = np.where(counts > 0, counts / np.where(union > 0, union, 1), -np.inf)
    with np.errstate(divide="ignore", invalid="ignore"):
        pmi = np.where(counts >= CONFIG.pmi_min_count, np.log(counts * ROWS / np.outer(n_i, n_i)), -np.inf)
    np.fill_diagonal(jaccard, -np.inf)
    np.fill_diagonal(pmi, -np.inf)
    for latent, record in enumerate(records):
        check_pairs(record["jaccard"], jaccard[latent], CONFIG.n_neighbours)
        check_pairs(record["pmi"], pmi[latent], CONFIG.n_neighbours)


def test_index_summary_steering_and_neuronpedia_export(store, built, tiny_model):
    csr, dense, W_dec = store
    index, records = built
    table = read_data(index.parent / "data" / "index.js")
    assert table["count"] == [int((dense[:, i] != 0).sum()) for i in range(N)]
    assert table["summary"] == [r["summary"] for r in records]
    assert records[5]["steering"] == STEERING[5] and records[4]["steering"] is None
    folder = index.parent / "neuronpedia"
    batches = sorted(folder.glob("batch-*.json"))
    assert len(batches) == -(-N // CONFIG.chunk_latents)
    features = [f for path in batches for f in json.loads(path.read_text())["features"]]
    assert json.loads(batches[0].read_text()).keys() == {"model_id", "layer", "sae_set", "sae_id_suffix", "features"}
    assert [f["feature_index"] for f in features] == list(range(N))
    vocab = tiny_model.tokenizer.batch_decode([[i] for i in range(tiny_model.cfg.d_vocab)])
    for feature, record in zip(features, records, strict=True):
        assert feature.keys() == NEURONPEDIA_FEATURE_KEYS
        assert feature["pos_str"] == [vocab[t] for t, _ in record["logits"]["pos"]]
        assert feature["frac_nonzero"] == record["density"]
        assert sum(feature["freq_hist_data_bar_heights"]) == record["count"]
        strongest = np.argsort(-np.abs(W_dec[record["id"]]))[:3]
        assert feature["neuron_alignment_indices"] == strongest.tolist()
        acts = feature["activations"]
        assert len(acts) == len(record["top"]) + sum(len(g["examples"]) for g in record["quantiles"])
        for act, ex in zip(acts, record["top"], strict=False):
            assert act.keys() == NEURONPEDIA_ACTIVATION_KEYS and act["bin_min"] == -1
            assert act["tokens"] == [vocab[t] for t in ex["tokens"]]
            assert act["values"][act["qualifying_token_index"]] == ex["value"]
    skipped = json.loads((folder / "skipped_indexes.json").read_text())
    assert skipped["skipped_indexes"] == list(DEAD)


def test_rebuild_replaces_the_browser_and_bad_inputs_fail(tmp_path, store):
    csr, _, W_dec = store
    vocab = [f"t{i}" for i in range(50)]
    W_U = np.zeros((D, 50), np.float32)
    build_browser(tmp_path / "b", csr, W_dec, W_U, vocab, config=CONFIG, progress=False)
    (tmp_path / "b" / "stale.txt").write_text("old")
    build_browser(tmp_path / "b", csr, W_dec, W_U, vocab, config=BrowserConfig(chunk_latents=64), progress=False)
    assert not (tmp_path / "b" / "stale.txt").exists() and not (tmp_path / "b" / chunk_file(1)).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # no scratch left behind
    with pytest.raises(ValueError, match="W_dec has shape"):
        build_browser(tmp_path / "c", csr, W_dec[:5], W_U, vocab, progress=False)
    with pytest.raises(ValueError, match="W_U has shape"):
        build_browser(tmp_path / "c", csr, W_dec, W_U.T, vocab, progress=False)
    with pytest.raises(ValueError, match="chunk_latents"):
        BrowserConfig(chunk_latents=0)


# --- in a real browser ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def chromium():
    from _chromium import Chromium, find_chromium

    executable = find_chromium()
    if executable is None:
        message = ("no Chromium found (looked for chromium, chromium-browser, google-chrome on PATH and "
                   "$SAE_CORE_CHROMIUM); install it with `apt-get install -y chromium`")
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true: {message}")
        pytest.skip(message)
    browser = Chromium(executable)
    yield browser
    browser.close()


def test_pages_in_headless_chromium(chromium, built, store):
    index, records = built
    chromium.navigate(index.as_uri())
    assert chromium.wait_for("document.querySelectorAll('#latents tbody tr').length") == N
    chromium.click("#search")
    chromium.call("Input.insertText", text=" June")  # typed, as a user would
    first = chromium.wait_for("document.querySelector('#latents tbody tr') && "
                              "document.querySelector('#count').textContent.indexOf('40') < 0 && "
                              "document.querySelector('#latents tbody tr').dataset.latent")
    assert int(first) == JUNE_LATENT
    chromium.evaluate("document.querySelector('#search').value = '#12';"
                      "document.querySelector('#search').dispatchEvent(new Event('input'))")
    assert chromium.evaluate("Array.from(document.querySelectorAll('#latents tbody tr')).map(r => r.dataset.latent)") == ["12"]
    assert chromium.evaluate("document.getElementById('heatmap').getContext('2d')"
                             ".getImageData(5, 5, 1, 1).data[3]") == 255  # the heatmap was drawn

    chromium.navigate(f"{index.with_name('latent.html').as_uri()}#{JUNE_LATENT}")
    chromium.wait_for(f"!!document.querySelector('#latent-title[data-latent=\"{JUNE_LATENT}\"]')")
    shown = chromium.evaluate("Array.from(document.querySelectorAll('#top-examples .example')).map("
                              "e => Array.from(e.querySelectorAll('.tok')).map(t => Number(t.dataset.act)))")
    assert shown == [ex["acts"] for ex in records[JUNE_LATENT]["top"]]
    target = records[JUNE_LATENT]["neighbours"][0][0]
    chromium.click("#neighbours a.latent-link")
    chromium.wait_for(f"!!document.querySelector('#latent-title[data-latent=\"{target}\"]')")
    assert chromium.evaluate("location.hash") == f"#{target}"
    chromium.navigate(f"{index.with_name('latent.html').as_uri()}#5")  # a latent with a steering curve
    chromium.wait_for("!!document.querySelector('#steering polyline')")
    table = chromium.evaluate("Array.from(document.querySelectorAll('#steering tr')).map("
                              "r => Array.from(r.children).map(c => c.textContent))")
    assert table[0] == ["coefficient", "concept score", "perplexity", "distinct tokens"]
    assert [[float(v) for v in row] for row in table[1:]] == [[r[k] for k in STEERING[5][0]] for r in STEERING[5]]
    assert chromium.errors == []


def test_heatmap_cell_opens_its_row_latent(chromium, built, store):
    """Hovering a cell of the index's heatmap names its pair and cosine; clicking it opens the row's latent."""
    index, _ = built
    _, _, W_dec = store
    heat = read_data(index.parent / "data" / "index.js")["heatmap"]
    ids, n = heat["ids"], len(heat["ids"])
    unit = W_dec / np.linalg.norm(W_dec, axis=1, keepdims=True)
    chromium.navigate(index.as_uri())
    chromium.wait_for("document.querySelectorAll('#latents tbody tr').length")
    row, col = n - 2, 1  # an off-diagonal cell away from the first row, so rows and columns cannot be swapped
    at = ((col + 0.5) / n, (row + 0.5) / n)
    chromium.hover("#heatmap", *at)
    title = chromium.wait_for("document.getElementById('heatmap').title")
    pair, _, value = title.rpartition(" ")
    assert pair == f"#{ids[row]} x #{ids[col]}: cosine"
    assert abs(float(value) - unit[ids[row]] @ unit[ids[col]]) < 2e-3  # shown at 3 decimals
    chromium.click("#heatmap", *at)
    chromium.wait_for(f"!!document.querySelector('#latent-title[data-latent=\"{ids[row]}\"]')")
    assert chromium.evaluate("location.pathname.endsWith('/latent.html') && location.hash") == f"#{ids[row]}"
    assert chromium.errors == []
