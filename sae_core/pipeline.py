"""The pipeline's stages as the scripts and the demo run them, driven by one per-model constant file.

Each stage reads the constants it needs, writes under one output folder
(``outputs/<model>/`` by default) and reuses what an earlier run already made, so the scripts in
``scripts/`` stay a few linear lines and can be run one after another or all at once
(``scripts/demo.py``):

======================  ==========================================  ====================================
stage                   function                                    output (under ``out``)
======================  ==========================================  ====================================
collect activations     :func:`collect_activations`                 ``store/activations/<run_id>/``
whitening statistics    :func:`fit_whitening`                       ``whitening/<hook>/``
train + evaluate SAEs   :func:`train_saes`                          ``sae/<hook>/`` (SAELens format)
analysis                :func:`analyse`                             ``analysis/<hook>/``
steering                :func:`steering_example`                    returned; figure by :func:`write_figures`
figures + index         :func:`write_figures`                       ``figures/``, ``index.html``
======================  ==========================================  ====================================

Every stage takes the run's :class:`~sae_core.config.RunConfig` (one constant file plus its
command-line overrides, :func:`run_from_argv`) and writes the effective configuration as
``run_config.json`` next to what it made, and reuses a finished folder only while the knobs its
stage depends on are unchanged (:mod:`sae_core.reuse`; otherwise it names them and stops). Nothing
here is an algorithm: every stage is a composition of the modules that do the work.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sae_core.config import RunConfig
from sae_core.files import atomic_write_json, atomic_write_text
from sae_core.held_out import analysis_documents  # noqa: F401 - part of this module's interface
from sae_core.reuse import RUN_CONFIG_FILENAME, changed_settings, check_reusable

logger = logging.getLogger(__name__)

DEFAULT_RUN_ID = "main"
"""Run id of the activation run the scripts and the demo share (a second run resumes or reuses it)."""
DOCUMENTS_FILENAME = "documents.json"
"""The windows an analysis encoded, the documents they came from, and where those came from
(the SAE's held-out split, or other): :func:`sae_core.held_out.analysis_loader`."""


def run_from_argv(argv: Sequence[str]) -> RunConfig:
    """The run of a script's command line: ``[model] [section.key=value ...]``.

    ``model`` is a constant-file name or a ``.py`` path (default ``smollm2_135m_instruct``); every
    ``section.key=value`` overrides one knob, type-checked like the file itself
    (``python -m scripts.train_sae smollm2_135m_instruct training.lr=4e-3 training.k=64``).
    """
    from sae_core.models import DEFAULT_MODEL, load_run_config

    args = list(argv)
    name = args.pop(0) if args and "=" not in args[0] else DEFAULT_MODEL
    return load_run_config(name, args)


_PROVENANCE: dict[tuple[Any, ...], dict[str, Any]] = {}


def corpus_record(run: RunConfig) -> dict[str, Any] | None:
    """Package, version, licence and file-list sha256 of the run's corpus (None: a source of the user's)."""
    from sae_core import corpora

    source = run.dataset.source
    if source not in (*corpora.CORPUS_NAMES, "mixed"):
        return None
    key = (source, tuple(sorted((run.dataset.weights or {}).items())), run.dataset.seed)
    if key not in _PROVENANCE:  # loading a corpus takes seconds; every stage records it
        _PROVENANCE[key] = corpora.corpus_provenance(source, run.dataset.weights, run.dataset.seed)
    return _PROVENANCE[key]


def write_run_config(run: RunConfig, folder: Path) -> Path:
    """``folder / run_config.json``: the effective configuration that made the folder's contents, and
    the provenance of its corpus."""
    folder.mkdir(parents=True, exist_ok=True)
    return atomic_write_json(folder / RUN_CONFIG_FILENAME, {**run.to_json(), "corpus": corpus_record(run)})


def output_dir(name: str | os.PathLike[str], root: str | os.PathLike[str] | None = None) -> Path:
    """``<root>/<model constants name>``; ``root`` defaults to ``$SAE_CORE_OUTPUTS`` or ``./outputs``."""
    root = Path(root if root is not None else os.environ.get("SAE_CORE_OUTPUTS", "outputs"))
    return root / Path(name).stem


def load_model_of(run: RunConfig) -> Any:
    """The run's ``HookedTransformer`` (on ``run.device``, in ``MODEL_LOAD_CONFIG['dtype']``)."""
    import torch

    from sae_core.model_loading import load_model

    if torch.device(run.device).type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"{run.name}: MODEL_LOAD_CONFIG['device'] is {run.device!r} but this machine has no CUDA "
                           "device; set 'device': 'cpu' there (every stage follows it)")
    return load_model(run.constants if run.constants is not None else run.name)


def load_texts_of(run: RunConfig) -> list[str]:
    """The texts of the run's ``DATASET``."""
    from sae_core.texts import load_texts

    return load_texts(run.dataset, run.windows.text_field)


def collect_activations(model: Any, run: RunConfig, texts: list[str], out: Path,
                        run_id: str = DEFAULT_RUN_ID, hooks: list[str] | None = None) -> Any:
    """Store activations of ``hooks`` (default ``HOOK_POINTS``) with the run's ``STORE``; a finished run
    is reused, an interrupted one resumes. Returns the :class:`~sae_core.store.ActivationRun`."""
    from sae_core.store import ActivationRun, save

    hooks = list(hooks or run.hook_points)
    run_id = save(model, hooks, texts, out / "store", run_id=run_id, config=run.store)
    stored = ActivationRun.open(out / "store", run_id)
    write_run_config(run, stored.path)
    return stored


def fit_whitening(stored: Any, run: RunConfig, out: Path) -> dict[str, Any]:
    """Welford statistics of every hook of a stored run, saved as a ``Whitener`` per hook (``WHITENING``);
    an existing whitening file is read back instead."""
    from sae_core.whitening import WHITENING_FILENAME, Whitener, statistics_from_run

    whiteners = {}
    for hook in stored.hooks:
        folder = out / "whitening" / hook
        if (folder / WHITENING_FILENAME).exists():
            check_reusable(folder, run, "whitening")
        else:
            knobs = run.whitening
            statistics_from_run(stored.path, hook).to_whitener(method=knobs.method, eps=knobs.eps,
                                                               shrinkage=knobs.shrinkage, hook=hook).save(folder)
            write_run_config(run, folder)
        whiteners[hook] = Whitener.load(folder, device=run.device)
    return whiteners


@dataclass
class SAEReport:
    """A trained SAE's folder with its evaluation and training curve, read back from disk."""

    hook: str
    folder: Path
    eval: Any
    curve: list[dict[str, Any]]


def train_saes(model: Any, texts: list[str], run: RunConfig, out: Path,
               hooks: list[str] | None = None) -> dict[str, SAEReport]:
    """Train one SAE per hook, or per hook and ``TRAINING['sweep']`` entry (all from one forward pass), with
    the run's training sections and evaluate each on held-out documents, unless every SAE already has its
    ``eval.json``; an interrupted run resumes. Keyed by unit: the hook, or ``<hook>/<sweep name>``."""
    from sae_core.evaluation import read_curve, read_eval
    from sae_core.training import train_from_model

    cfg = run.training_for(hooks)
    units = {unit.name: unit.hook for unit in cfg.units()}
    folders = {name: out / "sae" / name for name in units}
    if all((folder / "eval.json").exists() for folder in folders.values()):
        for folder in folders.values():
            check_reusable(folder, run, "sae")
    else:
        logger.info("training %s SAEs on %s (%s tokens)", cfg.sae.architecture, cfg.hook_points,
                    f"{cfg.total_training_tokens:,}")
        train_from_model(model, texts, cfg, out / "sae")
        for folder in folders.values():
            write_run_config(run, folder)
    return {name: SAEReport(units[name], folder, read_eval(folder), read_curve(folder)) for name, folder in folders.items()}


def load_saes(model: Any, run: RunConfig, out: Path, hooks: Sequence[str] | None = None) -> Any:
    """An :class:`~sae_core.saes.SAEManager` holding the SAEs trained into ``out / "sae"``, on the run's device.

    ``hooks`` may name sweep units (``<hook>/<sweep name>``), at most one per hook (the manager holds
    one SAE per hook point); default: every unit of the run (its hook points when it has no sweep)."""
    from sae_core.saes import SAEManager

    names = list(hooks or [unit.name for unit in run.training.units()])
    hook_of = {name: name.split("/", 1)[0] for name in names}  # hook names hold no '/'
    if len(set(hook_of.values())) < len(names):
        raise ValueError(f"{', '.join(names)}: an SAEManager holds one SAE per hook point; load sweep units of "
                         "one hook one at a time (load_saes(..., hooks=['<hook>/<sweep name>']))")
    manager = SAEManager(model)
    for name, hook in hook_of.items():
        folder = out / "sae" / name
        if not (folder / "cfg.json").exists():
            raise FileNotFoundError(f"no SAE for {hook} in {folder}; train one first "
                                    "(python -m scripts.train_sae)")
        manager.load_from_disk(folder, hook, device=run.device)
    return manager


@dataclass
class LatentAnalysis:
    """What :func:`analyse` made for one hook: file paths and the small in-memory summaries."""

    hook: str
    folder: Path
    csr: Any
    density: np.ndarray
    W_dec: np.ndarray
    shown: list[int]
    """Latents worth showing: the most active among those firing on 0.1%-10% of tokens."""
    examples: dict[int, list[Any]]
    paths: dict[str, Path] = field(default_factory=dict)
    fresh: bool = False
    """The CSR was encoded by this call (so a browser on disk shows an older one)."""


def analyse(model: Any, manager: Any, texts: list[str], run: RunConfig, out: Path, hook: str,
            browser: bool = True) -> LatentAnalysis:
    """CSR latents over held-out documents, density, top examples, decoder similarity, co-occurrence,
    decoder nearest neighbours (``ANALYSIS`` knobs) and, with ``browser``, the feature browser
    (:func:`feature_browser`); every file already on disk is reused."""
    from sae_core.activations import iter_activation_batches
    from sae_core.held_out import analysis_loader, window_progress
    from sae_core.latents import LatentCSR, encode_to_csr, latent_density, top_activating_examples
    from sae_core.similarity import compute_feature_cooccurrence as cooccurrence
    from sae_core.similarity import compute_feature_similarity, similarity_blocks, top_k_neighbours

    knobs = run.analysis
    folder = out / "analysis" / hook
    csr_dir = folder / "latents"
    fresh = not (csr_dir / "meta.json").exists()
    if not fresh:
        check_reusable(folder, run, "analysis")
    else:
        loader, record = analysis_loader(model.tokenizer, texts, run, out / "sae" / hook)
        # the record first: the folder counts as finished only once the CSR's meta.json exists
        write_run_config(run, folder)  # makes the folder
        atomic_write_json(folder / DOCUMENTS_FILENAME, record)
        batches = iter_activation_batches(model, window_progress(loader, record["windows"], f"encode latents {hook}"),
                                          [hook], run.windows.policy, run.forward.dtype, compile=run.forward.compile)
        encode_to_csr(model, lambda x: manager.encode(hook, x), batches, hook, csr_dir, overwrite=True, progress=False)
    csr = LatentCSR.load(csr_dir)
    density = latent_density(csr)
    W_dec = manager[hook].sae.W_dec.detach().float().cpu().numpy()
    paths = {"csr": csr_dir,
             "similarity": folder / f"similarity_{knobs.similarity_metric}.npy",
             "cooccurrence": folder / f"cooccurrence_{knobs.cooccurrence_metric}.npy",
             "neighbours": folder / "decoder_neighbours_indices.npy"}
    if not paths["similarity"].exists():
        compute_feature_similarity(W_dec, knobs.similarity_metric, knobs.similarity_chunk_size, out=folder)
    if not paths["cooccurrence"].exists():
        cooccurrence(csr, knobs.cooccurrence_metric, knobs.cooccurrence_chunk_size, out=folder)
    if not paths["neighbours"].exists():
        top_k_neighbours(similarity_blocks(W_dec, "cosine", knobs.similarity_chunk_size), k=knobs.n_neighbours,
                         out=folder, name="decoder_neighbours")
    paths["browser"] = out / "browser" / hook / "index.html"
    max_activation = np.asarray(csr.to_scipy().max(axis=0).todense()).ravel()
    candidates = np.flatnonzero((density > 1e-3) & (density < 0.1))
    shown = candidates[np.argsort(-max_activation[candidates])][:knobs.n_shown].tolist()
    examples = top_activating_examples(csr, shown, k=knobs.top_k_examples, context_window=knobs.context_window)
    analysis = LatentAnalysis(hook, folder, csr, density, W_dec, shown, examples, paths, fresh)
    if browser:
        feature_browser(model, manager, run, analysis)
    return analysis


def feature_browser(model: Any, manager: Any, run: RunConfig, analysis: LatentAnalysis,
                    steering: dict[int, list[dict[str, float]]] | None = None) -> Path:
    """The feature browser of ``analysis`` (``browser/<hook>/index.html``): reused when it exists and was
    built from this analysis with the run's knobs, rebuilt otherwise, and when ``steering`` (latent ->
    dose-response records) is given, so the browser shows them."""
    from sae_core.browser import build_browser
    from sae_core.browser.export import neuronpedia_header

    path, hook = analysis.paths["browser"], analysis.hook
    changed = changed_settings(path.parent, run, "browser") if path.exists() else None
    if changed:
        logger.info("rebuilding %s: made with other settings (%s)", path.parent, "; ".join(changed))
    if steering is not None or analysis.fresh or changed is None or changed:
        build_browser(path.parent, analysis.csr, analysis.W_dec, model.W_U, model.tokenizer,
                      similarity_path=analysis.paths["similarity"], cooccurrence_path=analysis.paths["cooccurrence"],
                      neighbours_path=analysis.paths["neighbours"], whitener=manager[hook].whitener,
                      steering=steering, title=f"{run.model_name} {hook}",
                      neuronpedia=neuronpedia_header(run, hook, analysis.csr))
        write_run_config(run, path.parent)
    return path


def top_tokens(analysis: LatentAnalysis, tokenizer: Any, n: int = 5) -> dict[int, list[str]]:
    """The tokens each shown latent fires on most strongly (decoded)."""
    return {latent: [tokenizer.decode([ex.context_token_ids[ex.focus]]) for ex in analysis.examples[latent][:n]]
            for latent in analysis.shown}


def mean_activation_norm(run: Any, hook: str, rows: int = 4096) -> float:
    """Mean L2 norm of the first ``rows`` stored activations of ``hook`` (the steering scale)."""
    return float(run.activations(hook)[: min(len(run), rows)].float().norm(dim=-1).mean())


def steering_latent(run: RunConfig, analysis: LatentAnalysis, tokenizer: Any, steering: Any = None) -> Any:
    """The :class:`~sae_core.steering.LatentChoice` to steer with: ``STEERING['feature']`` when set
    (latent 0 included), else the first of :func:`steering_latents`."""
    return steering_latents(run, analysis, tokenizer, count=1, steering=steering)[0]


def steering_latents(run: RunConfig, analysis: LatentAnalysis, tokenizer: Any, count: int | None = None,
                     steering: Any = None) -> list[Any]:
    """``STEERING['feature']`` alone when set, else up to ``count`` (default ``['candidates']``) interpretable
    latents of the held-out analysis (``['density_band']``, ``['min_distinct_tokens']`` words), strongest first;
    with ``steering`` (a ``ModelSteering``), the ``['screen']`` strongest ranked by output score instead."""
    from sae_core.steering import describe_latent, interpretable_latents, screen_latents

    knobs = run.steering
    if knobs.feature is not None:
        return [describe_latent(analysis.csr, analysis.density, knobs.feature, k=run.analysis.top_k_examples)]
    args = (analysis.csr, analysis.density, knobs.density_band, knobs.min_distinct_tokens, run.analysis.top_k_examples)
    count = knobs.candidates if count is None else count
    wanted, found = max(count, knobs.screen if steering is not None else 0), None
    if tokenizer is not None:
        try:
            found = interpretable_latents(*args, decode=lambda t: tokenizer.decode([t]), count=wanted)
        except ValueError as error:
            logger.warning("%s; counting distinct tokens instead of words", error)
    found = found or interpretable_latents(*args, count=wanted)
    if steering is None or not knobs.screen:
        return found[:count]
    return screen_latents(steering, analysis.hook, found, knobs.prompts, knobs.screen_multiple)[:count]


def steering_dose(model: Any, manager: Any, run: RunConfig, hook: str, choice: Any) -> tuple[Any, Any]:
    """The dose-response sweep of ``choice`` over ``STEERING['coefficients']`` (times its mean activation) on
    ``STEERING['prompts']``, and the record :func:`~sae_core.steering.choose_coefficient` picks (None: none
    raised the concept score within ``STEERING['max_perplexity_ratio']`` and ``['min_distinct_ratio']``)."""
    from sae_core.steering import ModelSteering, choose_coefficient, dose_response

    knobs = run.steering
    coefficients = [m * choice.mean_activation for m in knobs.coefficients]
    sweep = dose_response(ModelSteering(model, manager), hook, choice.feature, coefficients, knobs.prompts,
                          choice.top_token_ids, **knobs.generation_kwargs())
    return sweep, choose_coefficient(sweep.records, knobs.max_perplexity_ratio, knobs.min_distinct_ratio)


def steering_example(model: Any, manager: Any, run: RunConfig, hook: str, feature: int,
                     scale: float = 1.0) -> tuple[Any, Any]:
    """Generate ``STEERING['prompt']`` with and without latent ``feature``'s decoder direction added at
    ``STEERING['coefficient'] * scale``; returns ``(steer, comparison)``. Hooks are always removed."""
    from sae_core.steering import ModelSteering, Steer

    knobs = run.steering
    steer = Steer(hook, feature, knobs.coefficient * scale)
    comparison = ModelSteering(model, manager).compare([knobs.prompt], [steer], **knobs.generation_kwargs())
    return steer, comparison


def write_figures(out: Path, title: str, *, analyses: Sequence[LatentAnalysis] = (), tokenizer: Any = None,
                  trained: Sequence[SAEReport] = (), whiteners: dict[str, Any] | None = None,
                  steering: tuple[Any, Any] | None = None, dose: tuple[Any, Any, Any] | None = None) -> Path:
    """Save every figure the given results allow as standalone HTML under ``out / "figures"``, then
    rewrite ``out / "index.html"`` (:func:`write_index`); returns the index path.

    Figure files are named ``<hook>.<figure>.html``, so the figures of several hooks, and of several
    scripts run one after another, sit side by side. ``dose``: ``(sweep, chosen record)`` of
    :func:`steering_dose` and the ``SteeringConfig`` whose limits chose it.
    """
    from sae_core import pages, plots

    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)

    def add(hook: str, figure: Any, name: str) -> None:
        plots.save_figure(figure, figures / f"{hook}.{name}.html")

    for analysis in analyses:
        hook, focus = analysis.hook, analysis.shown[0] if analysis.shown else 0
        add(hook, plots.feature_similarity_heatmap(
            analysis.paths["similarity"], max_features=128, neighbourhood_of=focus), "similarity")
        metric = analysis.paths["cooccurrence"].stem.removeprefix("cooccurrence_")
        add(hook, plots.cooccurrence_heatmap(
            analysis.paths["cooccurrence"], metric_name=metric, max_features=128, neighbourhood_of=focus),
            "cooccurrence")
        add(hook, plots.latent_density_histogram(analysis.density), "density")
        if tokenizer is not None:
            html = "".join(pages.top_examples_html(
                [{"tokens": ex.context_token_ids, "focus": ex.focus,
                  "values": [ex.value if i == ex.focus else 0.0 for i in range(len(ex.context_token_ids))]}
                 for ex in analysis.examples[latent]], tokenizer, latent) for latent in analysis.shown)
            atomic_write_text(figures / f"{hook}.top_examples.html", f"<html><body>{html}</body></html>")
    for sae in trained:
        add(sae.hook, plots.training_curves(sae.curve), "training_curves")
    for hook, whitener in (whiteners or {}).items():
        add(hook, plots.whitening_spectrum(whitener.eigenvalues.cpu().numpy(), eps=whitener.eps),
            "whitening_spectrum")
    if steering is not None:
        steer, comparison = steering
        add(steer.hook, plots.steering_comparison(
            comparison.before.completions, comparison.after.completions, comparison.prompts,
            title=f"add latent {steer.feature} x {steer.coefficient:.0f}"), "steering")
    if dose is not None:
        (sweep, chosen, knobs), zero = dose, dose[0].record_of(0.0)
        add(sweep.hook, plots.steering_dose_response(
            [r.to_json() for r in sweep.records], chosen=None if chosen is None else chosen.coefficient,
            max_perplexity=zero.perplexity * knobs.max_perplexity_ratio, min_distinct=zero.distinct_fraction
            * knobs.min_distinct_ratio, title=f"Steering dose-response, latent {sweep.feature}"), "dose_response")
    return write_index(out, title)


FIGURE_TITLES = {"similarity": "Decoder similarity", "cooccurrence": "Co-occurrence", "density": "Latent density",
                 "top_examples": "Top-activating examples", "training_curves": "Training curves",
                 "whitening_spectrum": "Whitening spectrum", "steering": "Steering",
                 "dose_response": "Steering dose-response"}


def write_index(out: Path, title: str) -> Path:
    """``out / "index.html"`` linking every figure in ``out / "figures"`` and every artifact the stages
    have written so far (activation runs, whitening files, SAEs, CSR latents, memmaps)."""
    from sae_core import pages

    entries = [pages.IndexEntry(f"Feature browser, every latent ({path.parent.name})", str(path.relative_to(out)))
               for path in sorted(out.glob("browser/*/index.html"))]
    for path in sorted((out / "figures").glob("*.html")):
        hook, _, name = path.stem.rpartition(".")
        entries.append(pages.IndexEntry(f"{FIGURE_TITLES.get(name, name)} ({hook})", str(path.relative_to(out))))
    artifacts = [("Activation run", "store/activations/*/meta.json"), ("Whitening", "whitening/*/*.safetensors"),
                 ("SAE (SAELens format) + eval.json", "sae/*/cfg.json"), ("CSR latents", "analysis/*/latents"),
                 ("Similarity memmap", "analysis/*/similarity_*.npy"),
                 ("Co-occurrence memmap", "analysis/*/cooccurrence_*.npy")]
    for label, pattern in artifacts:
        for path in sorted(out.glob(pattern)):
            target = path if path.is_dir() or path.suffix == ".npy" else path.parent
            entries.append(pages.IndexEntry(f"{label}: {target.relative_to(out)}", str(target.relative_to(out))))
    return pages.index_html(entries, out / "index.html", title=title)


__all__ = ["DEFAULT_RUN_ID", "DOCUMENTS_FILENAME", "RUN_CONFIG_FILENAME", "analysis_documents", "corpus_record", "LatentAnalysis", "SAEReport", "analyse", "collect_activations",
           "fit_whitening", "load_model_of", "load_saes", "load_texts_of", "mean_activation_norm", "output_dir",
           "feature_browser", "run_from_argv", "steering_dose", "steering_example", "steering_latent", "steering_latents", "top_tokens", "train_saes", "write_figures",
           "write_index", "write_run_config"]
