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

Nothing here is an algorithm: every stage is a composition of the modules that do the work.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

DEFAULT_RUN_ID = "main"
"""Run id of the activation run the scripts and the demo share (a second run resumes or reuses it)."""


def output_dir(name: str | os.PathLike[str], root: str | os.PathLike[str] | None = None) -> Path:
    """``<root>/<model constants name>``; ``root`` defaults to ``$SAE_CORE_OUTPUTS`` or ``./outputs``."""
    root = Path(root if root is not None else os.environ.get("SAE_CORE_OUTPUTS", "outputs"))
    return root / Path(name).stem


def load_texts_of(constants: ModuleType) -> list[str]:
    """The texts of the constant file's ``DATASET``."""
    from sae_core.data import TextSourceConfig, load_texts

    return load_texts(TextSourceConfig(**constants.DATASET))


def training_config(constants: ModuleType, hooks: list[str] | tuple[str, ...] | None = None) -> Any:
    """``TrainingConfig`` of the constant file (``HOOK_POINTS`` unless ``hooks`` is given)."""
    from sae_core.training import TrainingConfig

    return TrainingConfig(**{"hook_points": tuple(hooks or constants.HOOK_POINTS), **constants.TRAINING})


def collect_activations(model: Any, constants: ModuleType, texts: list[str], out: Path,
                        run_id: str = DEFAULT_RUN_ID, hooks: list[str] | None = None) -> Any:
    """Store activations of ``hooks`` (default ``HOOK_POINTS``) with ``EXTRACTION``; a finished run is
    reused, an interrupted one resumes. Returns the :class:`~sae_core.store.ActivationRun`."""
    from sae_core.store import ActivationRun, StoreConfig, save

    hooks = list(hooks or constants.HOOK_POINTS)
    run_id = save(model, hooks, texts, out / "store", run_id=run_id, config=StoreConfig(**constants.EXTRACTION))
    return ActivationRun.open(out / "store", run_id)


def fit_whitening(run: Any, constants: ModuleType, out: Path) -> dict[str, Any]:
    """Welford statistics of every hook of a stored run, saved as a ``Whitener`` per hook (``WHITENING``
    method and eps); an existing whitening file is read back instead."""
    from sae_core.whitening import WHITENING_FILENAME, Whitener, statistics_from_run

    whiteners = {}
    for hook in run.hooks:
        folder = out / "whitening" / hook
        if not (folder / WHITENING_FILENAME).exists():
            statistics = statistics_from_run(run.path, hook)
            statistics.to_whitener(method=constants.WHITENING["method"], eps=constants.WHITENING["eps"],
                                   hook=hook).save(folder)
        whiteners[hook] = Whitener.load(folder)
    return whiteners


@dataclass
class SAEReport:
    """A trained SAE's folder with its evaluation and training curve, read back from disk."""

    hook: str
    folder: Path
    eval: Any
    curve: list[dict[str, Any]]


def train_saes(model: Any, texts: list[str], constants: ModuleType, out: Path,
               hooks: list[str] | None = None) -> dict[str, SAEReport]:
    """Train one SAE per hook (all from one forward pass) with ``TRAINING`` and evaluate it on held-out
    documents, unless every SAE already has its ``eval.json``; an interrupted run resumes."""
    from sae_core.evaluation import read_curve, read_eval
    from sae_core.training import train_from_model

    cfg = training_config(constants, hooks)
    folders = {hook: out / "sae" / hook for hook in cfg.hook_points}
    if not all((folder / "eval.json").exists() for folder in folders.values()):
        logger.info("training %s SAEs on %s (%s tokens)", cfg.architecture, cfg.hook_points,
                    f"{cfg.total_training_tokens:,}")
        train_from_model(model, texts, cfg, out / "sae")
    return {hook: SAEReport(hook, folder, read_eval(folder), read_curve(folder)) for hook, folder in folders.items()}


def load_saes(model: Any, out: Path, hooks: list[str] | tuple[str, ...]) -> Any:
    """An :class:`~sae_core.saes.SAEManager` holding the SAEs trained into ``out / "sae"``."""
    from sae_core.saes import SAEManager

    manager = SAEManager(model)
    for hook in hooks:
        folder = out / "sae" / hook
        if not (folder / "cfg.json").exists():
            raise FileNotFoundError(f"no SAE for {hook} in {folder}; train one first "
                                    "(python -m scripts.train_sae)")
        manager.load_from_disk(folder, hook)
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


def analyse(model: Any, manager: Any, texts: list[str], constants: ModuleType, out: Path, hook: str,
            n_shown: int = 5) -> LatentAnalysis:
    """CSR latents over held-out documents, density, top examples, decoder similarity, co-occurrence
    and decoder nearest neighbours (``ANALYSIS`` knobs); every file already on disk is reused."""
    from sae_core.activations import TokenPolicy, iter_activation_batches
    from sae_core.data import LoaderConfig, WindowedTextDataset, make_dataloader
    from sae_core.latents import LatentCSR, encode_to_csr, latent_density, top_activating_examples
    from sae_core.similarity import (
        compute_feature_cooccurrence,
        compute_feature_similarity,
        similarity_blocks,
        top_k_neighbours,
    )
    from sae_core.training import split_documents

    knobs, training = constants.ANALYSIS, training_config(constants, [hook])
    folder = out / "analysis" / hook
    csr_dir = folder / "latents"
    if not (csr_dir / "meta.json").exists():
        _, held_out = split_documents(len(texts), min(knobs["n_eval_documents"], len(texts) // 2), training.seed)
        dataset = WindowedTextDataset(texts, model.tokenizer, training.max_text_length, training.seed,
                                      training.prepend_bos)
        loader = make_dataloader(dataset, LoaderConfig(batch_size=constants.EXTRACTION["batch_size"]), sorted(held_out))
        batches = iter_activation_batches(model, loader, [hook], TokenPolicy(), training.forward_dtype)
        encode_to_csr(model, lambda x: manager.encode(hook, x), batches, hook, csr_dir, overwrite=True)
    csr = LatentCSR.load(csr_dir)
    density = latent_density(csr)
    W_dec = manager[hook].sae.W_dec.detach().float().cpu().numpy()
    chunk = knobs["chunk_size"]
    paths = {"csr": csr_dir,
             "similarity": folder / f"similarity_{knobs['similarity_metric']}.npy",
             "cooccurrence": folder / f"cooccurrence_{knobs['cooccurrence_metric']}.npy",
             "neighbours": folder / "decoder_neighbours_indices.npy"}
    if not paths["similarity"].exists():
        compute_feature_similarity(W_dec, knobs["similarity_metric"], chunk, out=folder)
    if not paths["cooccurrence"].exists():
        compute_feature_cooccurrence(csr, knobs["cooccurrence_metric"], chunk, out=folder)
    if not paths["neighbours"].exists():
        top_k_neighbours(similarity_blocks(W_dec, "cosine", chunk), k=8, out=folder, name="decoder_neighbours")

    max_activation = np.asarray(csr.to_scipy().max(axis=0).todense()).ravel()
    candidates = np.flatnonzero((density > 1e-3) & (density < 0.1))
    shown = candidates[np.argsort(-max_activation[candidates])][:n_shown].tolist()
    examples = top_activating_examples(csr, shown, k=knobs["top_k_examples"], context_window=knobs["context_window"])
    return LatentAnalysis(hook, folder, csr, density, W_dec, shown, examples, paths)


def top_tokens(analysis: LatentAnalysis, tokenizer: Any, n: int = 5) -> dict[int, list[str]]:
    """The tokens each shown latent fires on most strongly (decoded)."""
    return {latent: [tokenizer.decode([ex.context_token_ids[ex.focus]]) for ex in analysis.examples[latent][:n]]
            for latent in analysis.shown}


def mean_activation_norm(run: Any, hook: str, rows: int = 4096) -> float:
    """Mean L2 norm of the first ``rows`` stored activations of ``hook`` (the steering scale)."""
    return float(run.activations(hook)[: min(len(run), rows)].float().norm(dim=-1).mean())


def steering_example(model: Any, manager: Any, constants: ModuleType, hook: str, feature: int,
                     scale: float = 1.0) -> tuple[Any, Any]:
    """Generate ``STEERING['prompt']`` with and without latent ``feature``'s decoder direction added at
    ``STEERING['coefficient'] * scale``; returns ``(steer, comparison)``. Hooks are always removed."""
    from sae_core.steering import ModelSteering, Steer

    knobs = constants.STEERING
    steer = Steer(hook, feature, knobs["coefficient"] * scale)
    comparison = ModelSteering(model, manager).compare([knobs["prompt"]], [steer],
                                                       max_new_tokens=knobs["max_new_tokens"])
    return steer, comparison


def write_figures(out: Path, title: str, *, analyses: Sequence[LatentAnalysis] = (), tokenizer: Any = None,
                  trained: Sequence[SAEReport] = (), whiteners: dict[str, Any] | None = None,
                  steering: tuple[Any, Any] | None = None) -> Path:
    """Save every figure the given results allow as standalone HTML under ``out / "figures"``, then
    rewrite ``out / "index.html"`` (:func:`write_index`); returns the index path.

    Figure files are named ``<hook>.<figure>.html``, so the figures of several hooks, and of several
    scripts run one after another, sit side by side.
    """
    from sae_core import plots
    from sae_core._io import atomic_write_text

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
            html = "".join(plots.top_examples_html(
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
    return write_index(out, title)


FIGURE_TITLES = {"similarity": "Decoder similarity", "cooccurrence": "Co-occurrence", "density": "Latent density",
                 "top_examples": "Top-activating examples", "training_curves": "Training curves",
                 "whitening_spectrum": "Whitening spectrum", "steering": "Steering"}


def write_index(out: Path, title: str) -> Path:
    """``out / "index.html"`` linking every figure in ``out / "figures"`` and every artifact the stages
    have written so far (activation runs, whitening files, SAEs, CSR latents, memmaps)."""
    from sae_core import plots

    entries = []
    for path in sorted((out / "figures").glob("*.html")):
        hook, _, name = path.stem.rpartition(".")
        entries.append(plots.IndexEntry(f"{FIGURE_TITLES.get(name, name)} ({hook})", str(path.relative_to(out))))
    artifacts = [("Activation run", "store/activations/*/meta.json"), ("Whitening", "whitening/*/*.safetensors"),
                 ("SAE (SAELens format) + eval.json", "sae/*/cfg.json"), ("CSR latents", "analysis/*/latents"),
                 ("Similarity memmap", "analysis/*/similarity_*.npy"),
                 ("Co-occurrence memmap", "analysis/*/cooccurrence_*.npy")]
    for label, pattern in artifacts:
        for path in sorted(out.glob(pattern)):
            target = path if path.is_dir() or path.suffix == ".npy" else path.parent
            entries.append(plots.IndexEntry(f"{label}: {target.relative_to(out)}", str(target.relative_to(out))))
    return plots.index_html(entries, out / "index.html", title=title)


__all__ = ["DEFAULT_RUN_ID", "LatentAnalysis", "SAEReport", "analyse", "collect_activations", "fit_whitening",
           "load_saes", "load_texts_of", "mean_activation_norm", "output_dir", "steering_example",
           "top_tokens", "train_saes", "training_config", "write_figures", "write_index"]
