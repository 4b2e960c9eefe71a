"""Plots: every figure's data is checked against its input, recomputed independently."""

from __future__ import annotations

import html
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from scipy.cluster.hierarchy import leaves_list, linkage
from scipy.spatial.distance import pdist, squareform

from sae_core import pages, plots


def _cosine_matrix(n: int, d: int = 16, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return (x @ x.T).astype(np.float32)


def _reference_order(sub: np.ndarray) -> np.ndarray:
    dist = 1.0 - sub.astype(np.float64)
    np.fill_diagonal(dist, 0.0)
    dist = np.clip((dist + dist.T) / 2, 0.0, None)
    return leaves_list(linkage(squareform(dist, checks=False), "average", optimal_ordering=True))


def _shown_ids(fig) -> np.ndarray:
    return np.array([int(i) for i in fig.data[0].x])


class RowSpy:
    """A matrix that records which rows are read and refuses to be read whole."""

    def __init__(self, data: np.ndarray):
        self.data, self.shape, self.rows_read = data, data.shape, set()

    def __getitem__(self, index):
        rows = np.atleast_1d(np.asarray(index))
        assert rows.dtype.kind in "iu", f"only row reads by id are allowed, got {index!r}"
        self.rows_read.update(int(r) for r in rows)
        return self.data[index]

    def __array__(self, *args, **kwargs):
        raise AssertionError("the whole matrix was read")


def test_similarity_heatmap_clusters_small_matrix():
    sim = _cosine_matrix(40)
    fig = plots.feature_similarity_heatmap(sim)
    order = _reference_order(sim)
    np.testing.assert_array_equal(_shown_ids(fig), order)
    np.testing.assert_allclose(fig.data[0].z, sim[np.ix_(order, order)], rtol=1e-6)
    assert "40 latents" in fig.layout.title.text and "showing" not in fig.layout.title.text


def test_similarity_heatmap_subsamples_memmap_reading_only_selected(tmp_path: Path):
    sim = _cosine_matrix(300)
    path = tmp_path / "sim.npy"
    np.save(path, sim)
    fig = plots.feature_similarity_heatmap(path, max_features=50, seed=3)
    ids = _shown_ids(fig)
    assert len(set(ids)) == 50
    full = np.load(path)
    np.testing.assert_array_equal(fig.data[0].z, full[np.ix_(ids, ids)].astype(np.float64))
    # the displayed order is the clustering of the selected submatrix
    chosen = np.sort(ids)
    sub = full[np.ix_(chosen, chosen)]
    np.testing.assert_array_equal(ids, chosen[_reference_order(sub)])
    assert "300 latents; showing 50: random subsample (seed 3)" in fig.layout.title.text
    again = plots.feature_similarity_heatmap(path, max_features=50, seed=3)
    np.testing.assert_array_equal(_shown_ids(again), ids)

    spy = RowSpy(np.load(path, mmap_mode="r"))
    spied = plots.feature_similarity_heatmap(spy, max_features=50, seed=3)
    assert spy.rows_read == set(ids.tolist())
    np.testing.assert_array_equal(spied.data[0].z, fig.data[0].z)


def test_similarity_heatmap_neighbourhood(tmp_path: Path):
    sim = _cosine_matrix(200, seed=1)
    spy = RowSpy(sim)
    fig = plots.feature_similarity_heatmap(spy, max_features=30, neighbourhood_of=17, cluster=False)
    expected = np.argsort(-sim[17].astype(np.float64))[:30]  # centre has similarity 1, the max
    np.testing.assert_array_equal(_shown_ids(fig), expected)
    assert spy.rows_read == set(expected.tolist())
    np.testing.assert_array_equal(fig.data[0].z, sim[np.ix_(expected, expected)])
    assert "200 latents; showing 30: neighbourhood of latent 17" in fig.layout.title.text


def test_similarity_heatmap_given_ids_and_bad_input():
    sim = _cosine_matrix(50)
    ids = [3, 9, 1, 40, 22, 7]
    fig = plots.feature_similarity_heatmap(sim, ids=ids)
    shown = _shown_ids(fig)
    np.testing.assert_array_equal(shown, np.array(ids)[_reference_order(sim[np.ix_(ids, ids)])])
    np.testing.assert_allclose(fig.data[0].z, sim[np.ix_(shown, shown)], rtol=1e-6)
    with pytest.raises(ValueError, match="ids must be"):
        plots.feature_similarity_heatmap(sim, ids=[0, 50])
    with pytest.raises(ValueError, match="square"):
        plots.feature_similarity_heatmap(sim[:, :10])
    with pytest.raises(ValueError, match="not both"):
        plots.feature_similarity_heatmap(sim, ids=[1, 2], neighbourhood_of=3)


def test_cooccurrence_heatmap_pmi_clusters_rows_and_blanks_nonfinite():
    rng = np.random.default_rng(2)
    pmi = rng.normal(size=(30, 30))
    pmi = (pmi + pmi.T) * 2
    pmi[4, 9] = pmi[9, 4] = -np.inf
    fig = plots.cooccurrence_heatmap(pmi, metric_name="pmi")
    filled = np.where(np.isfinite(pmi), pmi, pmi[np.isfinite(pmi)].min())
    order = leaves_list(linkage(pdist(filled), "average", optimal_ordering=True))
    np.testing.assert_array_equal(_shown_ids(fig), order)
    z = np.asarray(fig.data[0].z, dtype=np.float64)
    expected = pmi[np.ix_(order, order)]
    np.testing.assert_array_equal(np.isnan(z), ~np.isfinite(expected))
    np.testing.assert_array_equal(z[np.isfinite(expected)], expected[np.isfinite(expected)])
    assert "pmi" in fig.layout.title.text


def test_cooccurrence_heatmap_jaccard_uses_one_minus():
    rng = np.random.default_rng(5)
    fires = rng.random((500, 25)) < rng.uniform(0.02, 0.3, size=25)
    inter = fires.T.astype(float) @ fires
    union = fires.sum(0)[:, None] + fires.sum(0)[None, :] - inter
    jac = inter / union
    fig = plots.cooccurrence_heatmap(jac, metric_name="Jaccard")
    np.testing.assert_array_equal(_shown_ids(fig), _reference_order(jac))


def test_latent_density_histogram():
    rng = np.random.default_rng(0)
    density = 10 ** rng.uniform(-6, -1, size=100)
    density[[3, 50, 77]] = 0.0
    fig = plots.latent_density_histogram(density)
    live = density[density > 0]
    np.testing.assert_allclose(fig.data[0].x, np.log10(live))
    assert "100 latents, 3 dead" in fig.layout.title.text
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        plots.latent_density_histogram(np.array([0.5, 1.5]))


def test_training_curves_match_records(tmp_path: Path):
    records = [{"tokens": 1000 * i, "loss": 1.0 / (i + 1), "l0": 50 - i, "step": i}
               for i in range(10)]
    for i in range(0, 10, 3):
        records[i]["explained_variance"] = 0.1 * i
    fig = plots.training_curves(records)
    traces = {t.name: t for t in fig.data}
    assert set(traces) == {"loss", "l0", "explained_variance"}
    for name in traces:
        kept = [r for r in records if name in r]
        assert list(traces[name].x) == [r["tokens"] for r in kept]
        assert list(traces[name].y) == [r[name] for r in kept]
    path = tmp_path / "training_curve.json"
    path.write_text(__import__("json").dumps(records))
    assert list(plots.training_curves(path).data[0].y) == [r["loss"] for r in records]
    with pytest.raises(ValueError, match="tokens"):
        plots.training_curves([{"loss": 1.0}])


class _SpanParser(HTMLParser):
    def __init__(self):
        super().__init__()
        self.spans, self._open = [], None

    def handle_starttag(self, tag, attrs):
        if tag == "span":
            self._open = [dict(attrs), ""]

    def handle_data(self, data):
        if self._open is not None:
            self._open[1] += data

    def handle_endtag(self, tag):
        if tag == "span" and self._open is not None:
            self.spans.append(tuple(self._open))
            self._open = None


def _alpha(style: str) -> float:
    return float(re.search(r"rgba\([^)]*,\s*([0-9.]+)\)", style).group(1))


def test_top_examples_html_escapes_and_scales():
    vocab = {0: "<script>", 1: " a&b", 2: ' "q"', 3: "\n", 4: " plain"}
    rng = np.random.default_rng(1)
    examples = [{"tokens": list(rng.integers(0, 5, size=8)), "values": rng.random(8) * 3,
                 "focus": 5} for _ in range(3)]
    text = pages.top_examples_html(examples, lambda t: vocab[int(t)], latent_id=42)
    assert "<script>" not in text and "&lt;script&gt;" in text
    parser = _SpanParser()
    parser.feed(text)
    tokens = [vocab[int(t)] for ex in examples for t in ex["tokens"]]
    values = np.concatenate([ex["values"] for ex in examples])
    assert [s[1] for s in parser.spans] == tokens
    acts = np.array([float(s[0]["data-act"]) for s in parser.spans])
    np.testing.assert_allclose(acts, values, rtol=1e-5)
    alphas = np.array([_alpha(s[0]["style"]) for s in parser.spans])
    by_value = alphas[np.argsort(values)]
    assert np.all(np.diff(by_value) >= 0) and alphas.max() == 1.0
    assert sum("outline" in s[0]["style"] for s in parser.spans) == len(examples)


def test_top_examples_html_tokenizer_and_context():
    class Tok:
        def decode(self, ids):
            return "".join(f"<{i}>" for i in ids)

    example = {"tokens": list(range(20)), "values": np.arange(20.0), "focus": 10}
    text = pages.top_examples_html([example], Tok(), latent_id=1, context=2, standalone=True)
    parser = _SpanParser()
    parser.feed(text)
    assert [s[1] for s in parser.spans] == [f"<{i}>" for i in range(8, 13)]
    assert text.startswith("<!DOCTYPE html>")
    with pytest.raises(ValueError, match="align"):
        pages.top_examples_html([{"tokens": [1, 2], "values": [1.0], "focus": 0}], None, 0)


def test_steering_comparison_table():
    prompts = ["I think", "The <b>cat</b>"]
    before = ["that dogs\nare fine", "sat & slept"]
    after = ["WEDDING wedding", "married"]
    fig = plots.steering_comparison(before, after, prompts, title="wedding +8")
    cols = fig.data[0].cells.values
    for col, source in zip(cols, (prompts, before, after), strict=True):
        assert [html.unescape(c.replace("<br>", "\n")) for c in col] == source
    assert "<b>cat" not in cols[0][1]
    with pytest.raises(ValueError, match="one of each"):
        plots.steering_comparison(before, after[:1], prompts, title="x")


def test_whitening_spectrum():
    eig = np.random.default_rng(3).exponential(size=64) ** 3
    eig[5] = 0.0
    fig = plots.whitening_spectrum(eig, eps=1e-4)
    np.testing.assert_array_equal(fig.data[0].y, np.sort(eig)[::-1])
    assert fig.layout.yaxis.type == "log"
    assert fig.layout.shapes[0].y0 == fig.layout.shapes[0].y1 == 1e-4
    assert "1 eigenvalues <= 0" in fig.layout.title.text


def test_save_figure_inline_js_and_index(tmp_path: Path):
    fig = plots.whitening_spectrum(np.array([3.0, 2.0, 1.0]))
    out = plots.save_figure(fig, tmp_path / "figs" / "spectrum.html")
    text = out.read_text(encoding="utf-8")
    assert not re.findall(r"<script[^>]*\bsrc=", text)  # no external script, CDN or other
    assert "Plotly.newPlot" in text and len(text) > 1_000_000  # plotly.js itself is inline
    assert not list(out.parent.glob(".*.tmp"))
    with pytest.raises(ValueError, match=".html"):
        plots.save_figure(fig, tmp_path / "spectrum.svg")

    (tmp_path / "eval.json").write_text("{}")
    entries = [("Spectrum <eig>", "figs/spectrum.html", "covariance & floor"),
               pages.IndexEntry("Eval", "eval.json")]
    index = pages.index_html(entries, tmp_path / "index.html")
    body = index.read_text(encoding="utf-8")
    hrefs = re.findall(r'href="([^"]+)"', body)
    assert hrefs == ["figs/spectrum.html", "eval.json"]
    assert all((tmp_path / h).exists() for h in hrefs)
    assert "Spectrum &lt;eig&gt;" in body and "covariance &amp; floor" in body
    with pytest.raises(ValueError, match="relative"):
        pages.index_html([("x", str(tmp_path / "eval.json"), "")], tmp_path / "index.html")


def test_save_png_without_kaleido_is_a_clear_error(tmp_path: Path):
    fig = plots.whitening_spectrum(np.array([2.0, 1.0]))
    try:
        import kaleido  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="kaleido"):
            plots.save_figure(fig, tmp_path / "s.png")
        assert not (tmp_path / "s.png").exists()
    else:
        try:
            out = plots.save_png(fig, tmp_path / "s.png")
        except RuntimeError as err:
            assert "Chrome" in str(err)
        else:
            assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
