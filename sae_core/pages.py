"""HTML pages beside the figures: token-highlighted top examples and the results index.

Plain HTML strings (no plotly), so a results folder opens from ``file://`` with nothing else; every
write is atomic.
"""

from __future__ import annotations

import html
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import quote

import numpy as np

from sae_core.files import atomic_write_text

logger = logging.getLogger(__name__)


def _field(example: Any, name: str) -> Any:
    if isinstance(example, Mapping):
        if name not in example:
            raise ValueError(f"example is missing '{name}'; expected keys tokens, values, focus")
        return example[name]
    return getattr(example, name)


def _decoder(decode: Any) -> Callable[[Any], str]:
    if decode is None:
        return str
    if hasattr(decode, "decode"):  # a Hugging Face tokenizer
        return lambda token: decode.decode([int(token)])
    if callable(decode):
        return decode
    raise TypeError("decode must be a tokenizer, a callable token -> str, or None for string tokens")


def top_examples_html(
    examples: Sequence[Mapping[str, Any] | Any],
    decode: Any,
    latent_id: int,
    context: int | None = None,
    standalone: bool = False,
) -> str:
    """Top-activating examples of one latent as token-highlighted HTML.

    Each example has ``tokens`` (T,) token ids or strings, ``values`` (T,) the latent's activation
    per token, and ``focus`` the index of the token it was selected for (dicts or objects with those
    attributes). ``decode`` turns one token into text: a tokenizer, a callable, or None if tokens
    are already strings. ``context`` keeps that many tokens each side of ``focus``. Each token is a
    ``<span>`` with ``data-act`` = its value and background alpha = value / the latent's largest value
    (negatives count as 0); the focus token is outlined. Returns a fragment, or a full document
    with ``standalone``.
    """
    to_text = _decoder(decode)
    rows = []
    for example in examples:
        tokens, focus = list(_field(example, "tokens")), int(_field(example, "focus"))
        values = np.asarray(_field(example, "values"), dtype=np.float64).reshape(-1)
        if len(tokens) != values.size or not 0 <= focus < len(tokens):
            raise ValueError(f"example has {len(tokens)} tokens, {values.size} values and focus "
                             f"{focus}; tokens and values must align and focus index a token")
        lo, hi = (0, len(tokens)) if context is None else (max(0, focus - context), focus + context + 1)
        rows.append((tokens[lo:hi], values[lo:hi], focus - lo))
    vmax = max((float(v.max()) for _, v, _ in rows if v.size), default=0.0)
    scale = vmax if vmax > 0 else 1.0
    parts = [f'<div class="sae-top-examples" style="font-family: monospace; white-space: pre-wrap">'
             f"<h3>Latent {int(latent_id)}: top {len(rows)} examples (max activation {vmax:.4g})</h3>"]
    for tokens, values, focus in rows:
        spans = []
        for i, (token, value) in enumerate(zip(tokens, values, strict=True)):
            alpha = min(max(value / scale, 0.0), 1.0)
            outline = "; outline: 2px solid black" if i == focus else ""
            spans.append(f'<span data-act="{value:.6g}" title="{value:.4g}" style="background-color: '
                         f'rgba(255, 80, 0, {alpha:.4f}){outline}">{html.escape(to_text(token))}</span>')
        parts.append(f'<div class="example" style="margin: 0.5em 0">{"".join(spans)}</div>')
    fragment = "".join(parts) + "</div>"
    if not standalone:
        return fragment
    return (f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>Latent {int(latent_id)}'
            f"</title></head><body>{fragment}</body></html>\n")


class IndexEntry(NamedTuple):
    """One link of a results index: a title, a path relative to the index, a description."""

    title: str
    path: str
    description: str = ""


def index_html(
    entries: Sequence[IndexEntry | tuple[str, str, str]],
    path: str | os.PathLike[str],
    title: str = "sae_core results",
) -> Path:
    """Write an ``index.html`` linking every figure and artifact, atomically.

    Paths must be relative (to the index's folder) so the results folder can be moved; a link to a
    missing file is written anyway and logged as a warning.
    """
    path = Path(path)
    items = []
    for entry in entries:
        name, rel, description = IndexEntry(*entry)
        if Path(rel).is_absolute():
            raise ValueError(f"{rel}: index links must be relative to {path.parent}")
        if not (path.parent / rel).exists():
            logger.warning("index %s links to missing file %s", path, rel)
        items.append(f'<li><a href="{html.escape(quote(str(rel)))}">{html.escape(name)}</a>'
                     f"{' - ' + html.escape(description) if description else ''}</li>")
    document = (f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}'
                f"</title></head><body><h1>{html.escape(title)}</h1>\n<ul>\n" + "\n".join(items)
                + "\n</ul></body></html>\n")
    return atomic_write_text(path, document)


__all__ = ["IndexEntry", "index_html", "top_examples_html"]
