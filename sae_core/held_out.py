"""The held-out text the analysis reads: windows of the SAE's held-out documents, drawn as training draws them.

One split per run (``split.json`` beside the SAE, :mod:`sae_core.sae_folders`) serves every stage
after training. The evaluator scores windows of its held-out documents drawn as an epoch of
training draws them (``sae_core.training.HeldOutEvaluator``); the analysis encodes windows of the
same documents drawn the same way (:func:`sae_core.training.loop.drawn_windows`): each document's
windows as training would draw them (one a document, or in proportion to its length:
``TRAINING['windows_per_document']``), in a seeded order, the first ``ANALYSIS['n_windows']``. So a
mix of short and long documents is analysed in the proportions the SAE was trained on. One window a
document (the analysis before this module) drew 30% of the default run's analysed rows from
documents longer than a window, where training draws ~85% of its rows from them, so the latents of
the long works had few examples in the browser and their densities were understated. An SAE
trained on documents run together (``windows_per_document="run_together"``) is analysed on
windows of one document in proportion to length: a top example's context is then the whole text
its latent saw, where a row of documents run together would hide the documents before it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sae_core.config import RunConfig

if TYPE_CHECKING:  # torch is imported where a loader is made: importing the pipeline stays light
    from torch.utils.data import DataLoader

ANALYSIS_STREAM = 104_729
"""Seeds the analysis windows' order apart from the evaluator's and training's streams."""


def analysis_documents(run: RunConfig, texts: Sequence[Any], sae_folder: Path) -> tuple[list[int], str]:
    """The documents the analysis draws its windows from: the SAE's held-out split (``split.json``,
    checked against ``texts``), and where they came from.

    An SAE without a split (trained elsewhere) is refused unless ``ANALYSIS['documents'] = "other"``,
    which draws from a seeded sample of ``n_windows`` of ``texts`` (at most half of them) and records
    it as such: those may include documents the SAE was trained on.
    """
    from sae_core.sae_folders import SPLIT_FILENAME, read_split
    from sae_core.texts import split_documents

    if run.analysis.documents == "other":
        _, sample = split_documents(len(texts), min(run.analysis.n_windows, len(texts) // 2), run.windows.seed)
        return sample, "other: a seeded sample of the run's texts, not checked against the SAE's training documents"
    split = read_split(sae_folder)
    if split is None:
        raise FileNotFoundError(f"{sae_folder / SPLIT_FILENAME} is missing, so the documents the SAE was trained "
                                "on are unknown; train it with this package (python -m scripts.train_sae), or "
                                "set ANALYSIS['documents'] = 'other' to analyse a sample that may overlap them")
    split.check(texts, run.windows.text_field)
    return list(split.held_out), f"held out: the {len(split.held_out)} documents of {sae_folder / SPLIT_FILENAME}"


def analysis_loader(tokenizer: Any, texts: Sequence[Any], run: RunConfig, sae_folder: Path) -> tuple[DataLoader, dict[str, Any]]:
    """The loader of the analysis windows (see the module docstring) and the record of what it reads
    (written as ``analysis/<hook>/documents.json``): origin, held-out documents, windows drawn and how,
    the documents they came from, and their tokens (a prepended BOS included)."""
    from torch.utils.data import DataLoader

    from sae_core.data import PadCollate, pad_id_of, windowed_dataset
    from sae_core.training.loop import drawn_windows

    documents, origin = analysis_documents(run, texts, sae_folder)
    how = run.training.windows_per_document
    how = "proportional" if how == "run_together" else how  # one document a row (module docstring)
    dataset = windowed_dataset(texts, tokenizer, run.windows, windows_per_document=how)
    sampler, items = drawn_windows(dataset, documents, run.loader, run.analysis.n_windows,
                                   (run.windows.seed, ANALYSIS_STREAM))
    available, sampler = len(sampler.items), sampler.restricted(items)
    batches = sampler.batches(0)
    loader = DataLoader(dataset, batch_sampler=batches, collate_fn=PadCollate(pad_id_of(tokenizer), sampler.pack),
                        num_workers=run.loader.num_dataloader_workers, pin_memory=run.loader.pin_memory, **run.loader.extra)
    per_document = Counter(getattr(item, "index", item) for item in items)  # WindowKey(document, part) or a document
    tokens = sum(sampler.lengths[d] * n for d, n in per_document.items())
    drawn_from = sorted(per_document)
    drawn = "one a document" if how == "one" else "in proportion to length"
    record = {"origin": f"{origin}: {len(items):,} of the {available:,} windows training would draw from "
                        f"them ({drawn}), in a seeded order, from {len(drawn_from):,} documents",
              "documents": documents, "windows_per_document": how, "windows": len(items),
              "windows_available": available, "documents_drawn": drawn_from, "window_tokens": int(tokens)}
    return loader, record


def window_progress(loader: DataLoader, windows: int, desc: str) -> Iterator[Any]:
    """The batches of ``loader`` under a bar counting windows (its total known up front)."""
    from tqdm.auto import tqdm

    with tqdm(total=windows, unit="window", desc=desc) as bar:
        for batch in loader:
            yield batch
            bar.update(batch.n_windows)

