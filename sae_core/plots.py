"""Plots of every pipeline stage: latent similarity and co-occurrence heatmaps, firing-density
histograms, training curves, top-activating examples, steering tables and dose-response curves,
whitening spectra.

Inputs are plain numpy arrays (or ``.npy`` memmaps / paths), lists and dicts, so this stage
depends on no other stage and can plot artifacts read back from disk. Every function returns a
``plotly.graph_objects.Figure`` (or an HTML string) and never shows it; ``save_figure`` writes it.

Decisions:
- Big matrices are never read whole. A (n, n) similarity matrix for a 64k-latent SAE is 16 GiB,
  so heatmaps pick at most ``max_features`` latents first (given ids, the top neighbours of one
  latent, or a seeded random subsample) and read only those rows, then those columns, from the
  memmap. The title states what is shown ("4096 latents; showing 256: neighbourhood of latent 17").
- Ordering is scipy's average-linkage hierarchical clustering with optimal leaf ordering
  (``linkage`` + ``leaves_list``). For similarity-like metrics in [-1, 1] (cosine, correlation,
  Jaccard, NPMI) the distance is ``1 - value``; for unbounded ones (PMI, counts), where ``1 - x`` is
  not a dissimilarity, the rows themselves are clustered (euclidean). Seriation by spectral order
  was rejected: it needs a connected affinity matrix, which sparse co-occurrence often is not.
- Non-finite entries (PMI of never co-occurring pairs is -inf) are shown as gaps and, for the
  clustering only, replaced by the smallest finite value ("least related").
- HTML is written standalone with plotly.js inline (``include_plotlyjs=True``, about 4.7 MB per
  file): results folders must open offline, so the CDN option is rejected.
- PNG export is optional and usually unavailable: kaleido 1.x (on PyPI) drives a Chrome/Chromium
  browser that it downloads at runtime (``kaleido.get_chrome_sync()``), which cannot happen offline.
  ``save_png`` therefore raises a clear error unless both kaleido and a browser are present.
- Top-activating examples are rendered as hand-written HTML spans (one per token, background alpha
  proportional to activation / the latent's max) rather than a plotly figure: text with per-token
  highlight reads far better as inline HTML, and the markup is twenty lines.
"""

from __future__ import annotations

import html
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import plotly.graph_objects as go
from jaxtyping import Float
from plotly.subplots import make_subplots
from scipy.cluster.hierarchy import leaves_list, linkage
from scipy.spatial.distance import squareform

from sae_core.files import atomic_path, atomic_write_bytes, read_json

logger = logging.getLogger(__name__)

MatrixLike = Any  # np.ndarray, np.memmap, or anything with .shape and row fancy indexing
# Metrics whose values are similarities bounded above by 1, so ``1 - value`` is a dissimilarity.
SIMILARITY_METRICS = frozenset({"cosine", "similarity", "correlation", "jaccard", "npmi"})
# Metrics training_curves plots, in subplot order, with their axis titles.
CURVE_METRICS = {
    "loss": "loss",
    "l0": "L0 (active latents / token)",
    "explained_variance": "explained variance",
    "dead_fraction": "dead fraction",
}
_ROW_CHUNK = 64  # rows read from a memmap at a time: bounds memory at 64 * n values


class LatentSelection(NamedTuple):
    """Which latents a heatmap shows: ``ids`` (k,) int64 in selection order, out of ``n_total``."""

    ids: np.ndarray
    n_total: int
    how: str  # "all", "given ids", "random subsample (seed 0)", "neighbourhood of latent 17"

    def describe(self) -> str:
        if self.how == "all":
            return f"{self.n_total} latents"
        return f"{self.n_total} latents; showing {len(self.ids)}: {self.how}"


def open_matrix(matrix: MatrixLike | str | os.PathLike[str]) -> MatrixLike:
    """A square (n, n) matrix: an array as is, a ``.npy`` path as a read-only memmap."""
    if isinstance(matrix, str | os.PathLike):
        path = Path(matrix)
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist; pass an existing (n, n) .npy file")
        matrix = np.load(path, mmap_mode="r")
    shape = tuple(matrix.shape)
    if len(shape) != 2 or shape[0] != shape[1]:
        raise ValueError(f"expected a square (n, n) latent matrix, got shape {shape}")
    return matrix


def select_latents(
    matrix: MatrixLike,
    ids: Sequence[int] | np.ndarray | None = None,
    max_features: int = 256,
    neighbourhood_of: int | None = None,
    seed: int = 0,
) -> LatentSelection:
    """Choose the latents to plot, reading at most one row of ``matrix`` (for a neighbourhood).

    ``ids`` are shown as given (``max_features`` does not apply). ``neighbourhood_of=j`` takes the
    ``max_features`` latents with the largest ``matrix[j]`` values, ``j`` itself always included.
    Otherwise all latents if there are at most ``max_features``, else a seeded random subsample.
    """
    n = int(matrix.shape[0])
    if max_features < 1:
        raise ValueError(f"max_features must be >= 1, got {max_features}")
    if ids is not None and neighbourhood_of is not None:
        raise ValueError("pass either ids or neighbourhood_of, not both")
    if ids is not None:
        chosen = np.asarray(ids, dtype=np.int64).reshape(-1)
        if chosen.size == 0 or chosen.min() < 0 or chosen.max() >= n:
            raise ValueError(f"ids must be a non-empty list of latent ids in [0, {n})")
        if np.unique(chosen).size != chosen.size:
            raise ValueError("ids contain duplicates; pass each latent once")
        return LatentSelection(chosen, n, "given ids")
    if neighbourhood_of is not None:
        if not 0 <= neighbourhood_of < n:
            raise ValueError(f"neighbourhood_of={neighbourhood_of} is not a latent id in [0, {n})")
        row = np.asarray(matrix[neighbourhood_of], dtype=np.float64)  # (n,) one row read
        row = np.where(np.isfinite(row), row, -np.inf)
        row[neighbourhood_of] = np.inf  # the centre always comes first
        chosen = np.argsort(-row, kind="stable")[: min(max_features, n)]
        return LatentSelection(chosen.astype(np.int64), n, f"neighbourhood of latent {neighbourhood_of}")
    if n <= max_features:
        return LatentSelection(np.arange(n, dtype=np.int64), n, "all")
    chosen = np.sort(np.random.default_rng(seed).choice(n, size=max_features, replace=False))
    return LatentSelection(chosen.astype(np.int64), n, f"random subsample (seed {seed})")


def read_submatrix(matrix: MatrixLike, ids: np.ndarray) -> Float[np.ndarray, "k k"]:
    """``matrix[np.ix_(ids, ids)]`` as float64, reading only rows ``ids`` (ascending), in chunks."""
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    blocks = []
    for start in range(0, len(sorted_ids), _ROW_CHUNK):
        rows = np.asarray(matrix[sorted_ids[start : start + _ROW_CHUNK]])  # (chunk, n)
        blocks.append(np.asarray(rows[:, sorted_ids], dtype=np.float64))  # (chunk, k)
    sub = np.concatenate(blocks, axis=0)  # (k, k) in ascending-id order
    inverse = np.argsort(order)
    return sub[np.ix_(inverse, inverse)]


def cluster_order(sub: Float[np.ndarray, "k k"], distance: str = "one_minus") -> np.ndarray:
    """Leaf order (k,) of average-linkage clustering: on ``1 - sub`` or on the rows of ``sub``."""
    k = sub.shape[0]
    if k < 3:
        return np.arange(k)
    finite = np.isfinite(sub)
    floor = sub[finite].min() if finite.any() else 0.0
    values = np.where(finite, sub, floor)
    if distance == "one_minus":
        dist = 1.0 - (values + values.T) / 2  # symmetrised dissimilarity
        np.fill_diagonal(dist, 0.0)
        tree = linkage(squareform(np.clip(dist, 0.0, None), checks=False), "average",
                       optimal_ordering=True)
    elif distance == "rows":
        tree = linkage(values, "average", metric="euclidean", optimal_ordering=True)
    else:
        raise ValueError(f"distance must be 'one_minus' or 'rows', got {distance!r}")
    return leaves_list(tree)


def _matrix_heatmap(
    matrix: MatrixLike | str | os.PathLike[str],
    ids: Sequence[int] | np.ndarray | None,
    max_features: int,
    neighbourhood_of: int | None,
    seed: int,
    cluster: bool,
    distance: str,
    title: str,
    value_name: str,
) -> go.Figure:
    matrix = open_matrix(matrix)
    selection = select_latents(matrix, ids, max_features, neighbourhood_of, seed)
    sub = read_submatrix(matrix, selection.ids)
    order = cluster_order(sub, distance) if cluster else np.arange(len(selection.ids))
    shown = sub[np.ix_(order, order)]
    labels = [str(i) for i in selection.ids[order]]
    finite = shown[np.isfinite(shown)]
    diverging = finite.size > 0 and finite.min() < 0
    heat = go.Heatmap(
        z=np.where(np.isfinite(shown), shown, np.nan),
        x=labels,
        y=labels,
        colorscale="RdBu_r" if diverging else "Viridis",
        zmid=0.0 if diverging else None,
        colorbar={"title": value_name},
        hovertemplate="latent %{y} × latent %{x}<br>" + value_name + " %{z:.4g}<extra></extra>",
    )
    fig = go.Figure(heat)
    ordering = ", clustered" if cluster else ""
    fig.update_layout(title=f"{title}: {selection.describe()}{ordering}", width=800, height=800)
    fig.update_xaxes(type="category", title="latent", showticklabels=len(labels) <= 64)
    fig.update_yaxes(type="category", title="latent", autorange="reversed",
                     showticklabels=len(labels) <= 64)
    return fig


def feature_similarity_heatmap(
    sim: Float[np.ndarray, "n n"] | str | os.PathLike[str],
    ids: Sequence[int] | np.ndarray | None = None,
    max_features: int = 256,
    cluster: bool = True,
    title: str = "Decoder cosine similarity",
    neighbourhood_of: int | None = None,
    seed: int = 0,
) -> go.Figure:
    """Heatmap of a (n, n) latent similarity matrix (array, memmap or ``.npy`` path).

    Shows ``ids``, else the ``max_features`` nearest latents of ``neighbourhood_of``, else all or a
    seeded subsample of ``max_features`` (see ``select_latents``); only that (k, k) submatrix is
    read. With ``cluster`` rows/columns are ordered by average linkage on ``1 - sim``. Axis
    labels (``fig.data[0].x``) are the latent ids in display order.
    """
    return _matrix_heatmap(sim, ids, max_features, neighbourhood_of, seed, cluster,
                           "one_minus", title, "similarity")


def cooccurrence_heatmap(
    matrix: Float[np.ndarray, "n n"] | str | os.PathLike[str],
    ids: Sequence[int] | np.ndarray | None = None,
    metric_name: str = "jaccard",
    max_features: int = 256,
    cluster: bool = True,
    title: str | None = None,
    neighbourhood_of: int | None = None,
    seed: int = 0,
) -> go.Figure:
    """Heatmap of a (n, n) latent co-occurrence matrix (Jaccard, PMI, correlation, count, ...).

    Same selection and reading as ``feature_similarity_heatmap``. Clustering uses ``1 - value``
    when ``metric_name`` is one of ``SIMILARITY_METRICS`` and the rows (euclidean) otherwise.
    """
    distance = "one_minus" if metric_name.lower() in SIMILARITY_METRICS else "rows"
    return _matrix_heatmap(matrix, ids, max_features, neighbourhood_of, seed, cluster, distance,
                           title or f"Latent co-occurrence ({metric_name})", metric_name)


def latent_density_histogram(
    density: Float[np.ndarray, " n_latents"],
    eps: float = 1e-10,
    nbins: int = 60,
    title: str = "Latent firing density",
) -> go.Figure:
    """Histogram of log10 firing frequency (fraction of tokens a latent fires on) per latent.

    Latents with density <= ``eps`` are dead: not plotted (log10 0 is undefined), counted in the
    title. ``fig.data[0].x`` holds log10 of the live latents' densities, in input order.
    """
    density = np.asarray(density, dtype=np.float64).reshape(-1)
    if density.size == 0 or not np.isfinite(density).all():
        raise ValueError("density must be a non-empty array of finite firing frequencies")
    if density.min() < 0 or density.max() > 1:
        raise ValueError("density values are fractions of tokens and must lie in [0, 1]")
    alive = density > eps
    n_dead = int((~alive).sum())
    fig = go.Figure(go.Histogram(x=np.log10(density[alive]), nbinsx=nbins, name="latents"))
    fig.update_layout(
        title=f"{title}: {density.size} latents, {n_dead} dead ({n_dead / density.size:.1%})",
        xaxis_title="log10 firing frequency",
        yaxis_title="latents",
        bargap=0.02,
    )
    return fig


def training_curves(
    records: Sequence[Mapping[str, Any]] | str | os.PathLike[str],
    title: str = "Training",
) -> go.Figure:
    """Subplots of loss, L0, explained variance, dead fraction against tokens seen.

    ``records`` is a list of dicts (or a JSON file holding one), each with ``tokens`` and any subset
    of ``CURVE_METRICS``; other keys are ignored. A metric gets a subplot if any record has it; a
    record missing a metric (or holding None) is skipped for that trace only.
    """
    if isinstance(records, str | os.PathLike):
        records = read_json(records)
    if not isinstance(records, Sequence) or not all(isinstance(r, Mapping) for r in records):
        raise ValueError("records must be a list of dicts such as {'tokens': 4096, 'loss': 0.3}")
    if any("tokens" not in r for r in records):
        raise ValueError("every training record needs a 'tokens' key (tokens seen so far)")
    present = [m for m in CURVE_METRICS if any(r.get(m) is not None for r in records)]
    if not present:
        raise ValueError(f"records hold none of the plotted metrics {list(CURVE_METRICS)}")
    fig = make_subplots(rows=len(present), cols=1, shared_xaxes=True, vertical_spacing=0.06,
                        subplot_titles=[CURVE_METRICS[m] for m in present])
    for row, metric in enumerate(present, start=1):
        points = [(r["tokens"], r[metric]) for r in records if r.get(metric) is not None]
        xs, ys = zip(*points, strict=True)
        fig.add_trace(go.Scatter(x=list(xs), y=list(ys), mode="lines", name=metric), row=row, col=1)
    fig.update_xaxes(title_text="tokens", row=len(present), col=1)
    fig.update_layout(title=title, height=250 * len(present) + 100, showlegend=False)
    return fig


def _table_text(text: str) -> str:
    # plotly renders a subset of HTML in table cells; escape the text and keep line breaks.
    return html.escape(str(text), quote=False).replace("\n", "<br>")


def steering_comparison(
    before: Sequence[str],
    after: Sequence[str],
    prompts: Sequence[str],
    title: str = "Steering comparison",
) -> go.Figure:
    """A table with one row per prompt: prompt, completion before and after steering.

    Cell text is HTML-escaped with newlines as ``<br>`` (plotly interprets tags in table cells).
    """
    if not len(before) == len(after) == len(prompts):
        raise ValueError(f"got {len(prompts)} prompts, {len(before)} 'before' and {len(after)} "
                         "'after' completions; pass one of each per prompt")
    table = go.Table(
        columnwidth=[1, 2, 2],
        header={"values": ["<b>Prompt</b>", "<b>Before</b>", "<b>After</b>"], "align": "left"},
        cells={"values": [[_table_text(t) for t in col] for col in (prompts, before, after)],
               "align": "left"},
    )
    fig = go.Figure(table)
    fig.update_layout(title=title, height=200 + 120 * len(prompts))
    return fig


def steering_dose_response(
    records: Sequence[Mapping[str, float]],
    chosen: float | None = None,
    max_perplexity: float | None = None,
    min_distinct: float | None = None,
    title: str = "Steering dose-response",
) -> go.Figure:
    """Concept score, top-token probability and distinct-token fraction (left axis) and perplexity
    (right axis) against the steering coefficient, one point per record ``{coefficient,
    concept_score, top_token_probability, perplexity, distinct_fraction}`` (the last optional);
    ``chosen`` marks the picked coefficient, ``max_perplexity`` and ``min_distinct`` the coherence limits."""
    if not records:
        raise ValueError("no dose-response records to plot")
    rows = sorted(records, key=lambda r: r["coefficient"])
    x = [r["coefficient"] for r in rows]
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    series = [("concept_score", "concept score (latent fires)"), ("top_token_probability", "top-token probability")]
    if all("distinct_fraction" in r for r in rows):
        series.append(("distinct_fraction", "distinct-token fraction"))
    for key, name in series:
        fig.add_trace(go.Scatter(x=x, y=[r[key] for r in rows], mode="lines+markers", name=name), secondary_y=False)
    fig.add_trace(go.Scatter(x=x, y=[r["perplexity"] for r in rows], mode="lines+markers", name="perplexity",
                             line={"dash": "dot"}), secondary_y=True)
    if max_perplexity is not None:
        fig.add_hline(y=max_perplexity, line_dash="dash", line_color="grey", secondary_y=True,
                      annotation_text=f"perplexity limit {max_perplexity:.1f}")
    if min_distinct is not None:
        fig.add_hline(y=min_distinct, line_dash="dot", line_color="grey", secondary_y=False,
                      annotation_text=f"distinct-token limit {min_distinct:.2f}", annotation_position="bottom right")
    if chosen is not None:
        fig.add_vline(x=chosen, line_dash="dash", line_color="green", annotation_text=f"chosen {chosen:g}")
    fig.update_layout(title=title, xaxis_title="coefficient")
    fig.update_yaxes(title_text="score", range=[0, 1], secondary_y=False)
    fig.update_yaxes(title_text="perplexity (unsteered model)", type="log", secondary_y=True)
    return fig


def whitening_spectrum(
    eigenvalues: Float[np.ndarray, " d"],
    eps: float | None = None,
    title: str = "Activation covariance spectrum",
) -> go.Figure:
    """Eigenvalues sorted descending on a log y axis, with the ``eps`` floor as a dashed line.

    Non-positive eigenvalues cannot sit on a log axis; their count is stated in the title.
    """
    values = np.sort(np.asarray(eigenvalues, dtype=np.float64).reshape(-1))[::-1]
    if values.size == 0 or not np.isfinite(values).all():
        raise ValueError("eigenvalues must be a non-empty array of finite numbers")
    n_nonpos = int((values <= 0).sum())
    fig = go.Figure(go.Scatter(x=np.arange(values.size), y=values, mode="lines+markers",
                               marker={"size": 3}, name="eigenvalue"))
    if eps is not None:
        fig.add_hline(y=eps, line_dash="dash", line_color="red", annotation_text=f"eps = {eps:g}")
    note = f" ({n_nonpos} eigenvalues <= 0 not shown)" if n_nonpos else ""
    fig.update_layout(title=f"{title}: {values.size} eigenvalues{note}",
                      xaxis_title="rank", yaxis_title="eigenvalue", yaxis_type="log")
    return fig


def save_figure(fig: go.Figure, path: str | os.PathLike[str]) -> Path:
    """Write ``fig`` atomically: ``.html`` standalone with plotly.js inline, ``.png`` via ``save_png``."""
    path = Path(path)
    if path.suffix == ".png":
        return save_png(fig, path)
    if path.suffix not in (".html", ".htm"):
        raise ValueError(f"{path}: save figures as .html (offline, interactive) or .png")
    with atomic_path(path) as tmp:
        fig.write_html(tmp, include_plotlyjs=True, full_html=True, auto_open=False)
    return path


def save_png(fig: go.Figure, path: str | os.PathLike[str], scale: float = 2.0) -> Path:
    """Write ``fig`` as PNG; needs kaleido and a Chrome/Chromium browser, else a RuntimeError."""
    try:
        import kaleido  # noqa: F401
    except ImportError:
        raise RuntimeError("PNG export needs kaleido (pip install kaleido) and a Chrome browser, "
                           "which kaleido downloads at runtime; offline, save .html with "
                           "save_figure instead") from None
    try:
        data = fig.to_image(format="png", scale=scale)
    except Exception as err:  # kaleido reports a missing browser with its own exception types
        raise RuntimeError(f"PNG export failed ({err}); install Chrome with "
                           "`kaleido.get_chrome_sync()` while online, or save .html") from err
    return atomic_write_bytes(path, data)
