"""Steering a HookedTransformer along SAE latents, with explicit semantics, at TransformerLens hook points.

Let x be the activation at a hook point, z = encode(x) its latents and
d_i = decode(e_i) - decode(0) latent i's decoder direction in the model's space (through
:class:`sae_core.saes.SAEManager`, so whitening and ``b_dec`` are accounted for). A :class:`Steer`
changes x as follows:

* ``add``:    x' = x + c d_i. The SAE's reconstruction never replaces x, so no reconstruction
  error is introduced; c = 0 leaves the model bit-for-bit unchanged.
* ``clamp``:  x' = x + decode(z') - decode(z) with z' = z except z'_i = c. The error term
  x - decode(z) is kept, so in the SAE's decomposition only latent i changes. (Writing decode(z')
  in place of x would drop the error, moving every other direction at once; taking the error after
  the clamp, x - decode(z'), and adding it back gives x again: the clamp cancels itself.)
* ``scale``:  clamp with z'_i = c z_i;  ``ablate``: clamp with z'_i = 0.

Every SAELens decoder is affine in z and whitening is affine, so decode(z') - decode(z) =
(z'_i - z_i) d_i; it is computed that way (one direction per latent instead of two d_sae-wide
decodes), which also makes clamping a latent to its own value an exact no-op. SAEs whose decode
depends on the last encode (``normalize_activations`` layer_norm / constant_norm_rescale) are
refused. Several steers compose: all active steers of one hook point run in one hook, every
clamp reads the same z = encode(x), and the deltas add. Two clamps of the same latent at the same
hook point are rejected.

Positions are absolute token positions of a prompt (0 = its first token, BOS included), chosen as
``"all"``, ``"prompt"``, ``"generated"`` or a list of positions. "generated" means positions that
hold generated tokens: the first generated token is predicted at the last prompt position, so it
is steered by ``"all"`` or ``"prompt"`` but not by ``"generated"``.

Generation. :meth:`ModelSteering.generate_with_steering` drives TransformerLens ``model.generate``
and tells the hooks where each row's real tokens are: with ``use_past_kv_cache`` the hook sees
the whole prompt once and then one new column per step (a per-hook column counter gives the
absolute position); without the cache it sees the whole sequence every step (offset 0). Batches
of prompts are left-padded (what ``generate`` expects; TransformerLens 3.9 masks the pads in
attention and shifts rotary / absolute positions per row); the hooks never steer pad columns, so
each prompt's output equals its output alone. If the tokenizer's pad id could be mistaken for a
prompt's first token (TransformerLens finds pads by id), generation falls back to one prompt at a
time, with a warning. Seeded sampling is reproducible; a sampled batch does not equal the prompts
sampled one by one (the random draws are shared across the batch).

Hooks are registered with ``HookPoint.add_hook`` and removed by their own handle rather than
through ``model.hooks(...)``: steering handles may be opened and closed in any order (one hook
per hook point serves all of them), which TransformerLens's level-based context does not allow.
Handles are context managers that remove their steers in ``finally``; :meth:`ModelSteering.clear_steering`
removes whatever is left.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.utilities.tokenize_utils import get_attention_mask

from sae_core.hooks import hook_layer, resolve_hook, resolve_layer
from sae_core.saes import SAEManager
from sae_core.steering.hooks import Layout, SteeringHooks
from sae_core.steering.registry import (
    Steer,
    SteeringHandle,
    SteerMode,
    SteerRegistry,
    check_positions_reached,
)

logger = logging.getLogger(__name__)


class SteeringCapture(NamedTuple):
    """Activations and latents at a steered hook, per prompt, by absolute position.

    The last generated token is never run through the model, so each prompt has
    ``len(tokens) - 1`` captured positions.
    """

    hook: str
    before: list[Float[Tensor, "pos d_in"]]  # activation as the model computed it
    after: list[Float[Tensor, "pos d_in"]]  # activation after steering
    latents_before: list[Float[Tensor, "pos d_sae"]]
    latents_after: list[Float[Tensor, "pos d_sae"]]  # encode(after): what the steer did


class SteeredGeneration(NamedTuple):
    """Generations, one entry per prompt (lists even for a single prompt)."""

    texts: list[str]  # prompt + completion, special tokens dropped
    completions: list[str]
    tokens: list[Int[Tensor, " pos"]]  # prompt + generated token ids (to the first EOS if stop_at_eos)
    prompt_lengths: list[int]
    captured: dict[str, SteeringCapture] | None


class SteeringComparison(NamedTuple):
    """The same prompts generated without and with steering (same seed and settings)."""

    prompts: list[str]
    before: SteeredGeneration
    after: SteeredGeneration


class ModelSteering:
    """Steer a model along SAE latents held by an :class:`SAEManager`: the registry of steers, the
    hooks that apply them, and generation with them."""

    def __init__(self, model: HookedTransformer, manager: SAEManager) -> None:
        self.model = model
        self.manager = manager
        self.registry = SteerRegistry(on_change=lambda: self.hooks.sync())
        self.hooks = SteeringHooks(model, manager, self.registry)

    # --- registering steers ----------------------------------------------------------------------
    def steer(self, hook_or_layer: str | int, feature_idx: int, coefficient: float,
              positions: str | Sequence[int] | None = None, mode: SteerMode = "add") -> SteeringHandle:
        """Start one steer now; use as ``with steering.steer(...):`` to remove it on exit."""
        hook = self._resolve(hook_or_layer)
        return self.apply([Steer(hook, feature_idx, coefficient, mode,
                                 "all" if positions is None else positions)])

    def apply(self, steers: Sequence[Steer]) -> SteeringHandle:
        """Start several steers at once (any hooks, any latents); returns their handle."""
        for s in steers:
            self.manager[s.hook]  # noqa: B018 - raises with the loaded hooks if missing
            self.hooks.direction(s.hook, s.feature)  # validates the index and the SAE's decode
        return self.registry.add(steers)

    @property
    def active_steers(self) -> list[Steer]:
        """Steers currently applied, in registration order."""
        return self.registry.active

    def clear_steering(self) -> None:
        """Remove every steer and every hook this object added."""
        self.registry.clear()

    def _resolve(self, hook_or_layer: str | int) -> str:
        """A hook name, or a layer index (negative counts from the end) -> the loaded SAE's hook there."""
        if isinstance(hook_or_layer, int):
            layer = resolve_layer(self.model, hook_or_layer)  # IndexError listing the valid range
            loaded = [h for h in self.manager.hooks if hook_layer(h) == layer]
            if len(loaded) == 1:
                return loaded[0]
        return resolve_hook(self.model, hook_or_layer)

    # --- generation ------------------------------------------------------------------------------
    def generate_with_steering(self, prompts: str | Sequence[str], steers: Sequence[Steer] | None = None, *,
                               max_new_tokens: int = 20, do_sample: bool = False,
                               use_past_kv_cache: bool = True, seed: int | None = None,
                               capture: bool = False, prepend_bos: bool | None = None,
                               batched: bool = True, verbose: bool = False,
                               **generation_kwargs: Any) -> SteeredGeneration:
        """Generate with the active steers plus ``steers`` (removed afterwards); greedy by default.

        ``generation_kwargs`` go to ``HookedTransformer.generate`` (temperature, top_k, top_p,
        stop_at_eos, eos_token_id, freq_penalty, ...). ``seed`` seeds sampling without touching
        the global RNG. ``capture=True`` records, per steered hook, the activation before and after
        steering and their latents at every position.
        """
        prompt_list = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompt_list:
            raise ValueError("no prompts given; pass a string or a list of strings")
        bos = self.model.cfg.default_prepend_bos if prepend_bos is None else prepend_bos
        rows = [self.model.to_tokens(p, prepend_bos=bos)[0] for p in prompt_list]
        kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, use_past_kv_cache=use_past_kv_cache,
                      prepend_bos=bos, verbose=verbose, **generation_kwargs)
        check_positions_reached([*self.active_steers, *(steers or [])], max(len(r) for r in rows) + max_new_tokens - 1)
        handle = self.apply(steers) if steers else None
        try:
            with seeded(seed):
                groups = [rows] if batched and self._batchable(rows, bos) else [[r] for r in rows]
                if len(groups) > 1 and batched and len(rows) > 1:
                    logger.warning("pad id %s may be read as a prompt's first token; generating one prompt "
                                   "at a time", self.model.tokenizer.pad_token_id)
                parts = [self._generate_group(group, capture, kwargs) for group in groups]
        finally:
            if handle is not None:
                handle.remove()
        return merge_generations(parts, capture)

    def compare(self, prompts: str | Sequence[str], steers: Sequence[Steer], **kwargs: Any) -> SteeringComparison:
        """Generate ``prompts`` without, then with ``steers`` (same settings; pass ``seed`` when sampling)."""
        if self.registry.handles:
            raise RuntimeError("steers are active, so 'before' would be steered too; close their "
                               "contexts or call clear_steering() first")
        before = self.generate_with_steering(prompts, **kwargs)
        after = self.generate_with_steering(prompts, steers, **kwargs)
        prompt_list = [prompts] if isinstance(prompts, str) else list(prompts)
        return SteeringComparison(prompt_list, before, after)

    def _batchable(self, rows: list[Tensor], prepend_bos: bool) -> bool:
        """True if TransformerLens will find exactly our left pads in the padded batch."""
        tokens, n_pad = self._left_pad(rows)
        mask = get_attention_mask(self.model.tokenizer, tokens, prepend_bos, padding_side="left")
        expected = torch.arange(tokens.shape[1])[None, :] >= n_pad[:, None]
        return bool(torch.equal(mask.bool().cpu(), expected))

    def _left_pad(self, rows: list[Tensor]) -> tuple[Tensor, Tensor]:
        width = max(len(r) for r in rows)
        pad_id = self.model.tokenizer.pad_token_id
        tokens = torch.full((len(rows), width), pad_id, dtype=torch.long, device=rows[0].device)
        for i, r in enumerate(rows):
            tokens[i, width - len(r):] = r
        return tokens, torch.tensor([width - len(r) for r in rows])

    def _generate_group(self, rows: list[Tensor], capture: bool, kwargs: dict[str, Any]) -> SteeredGeneration:
        tokens, n_pad = self._left_pad(rows)
        prompt_len = torch.tensor([len(r) for r in rows])
        self.hooks.layout = Layout(n_pad, prompt_len, bool(kwargs["use_past_kv_cache"]),
                               capture={} if capture else None)
        try:
            out = self.model.generate(tokens, return_type="tokens", padding_side="left", **kwargs)
            layout = self.hooks.layout
        finally:
            self.hooks.layout = None
        seqs = [self._trim(out[i, int(n_pad[i]):], len(rows[i]), kwargs) for i in range(len(rows))]
        tok = self.model.tokenizer
        texts = [tok.decode(s, skip_special_tokens=True) for s in seqs]
        completions = [tok.decode(s[len(r):], skip_special_tokens=True) for s, r in zip(seqs, rows, strict=True)]
        captured = self._assemble(layout, n_pad, [len(s) - 1 for s in seqs]) if capture else None
        return SteeredGeneration(texts, completions, [s.cpu() for s in seqs], prompt_len.tolist(), captured)

    def _trim(self, seq: Int[Tensor, " pos"], prompt_len: int, kwargs: dict[str, Any]) -> Tensor:
        """Cut after the first generated stop token (rows of a batch keep running after they finish)."""
        if not kwargs.get("stop_at_eos", True):
            return seq
        eos = kwargs.get("eos_token_id")
        eos = self.model.tokenizer.eos_token_id if eos is None else eos
        stops = torch.tensor([eos] if isinstance(eos, int) else list(eos), device=seq.device)
        hits = torch.isin(seq[prompt_len:], stops).nonzero()
        return seq[:prompt_len + int(hits[0, 0]) + 1] if len(hits) else seq

    def _assemble(self, layout: Layout, n_pad: Tensor, lengths: list[int]) -> dict[str, SteeringCapture]:
        """Stitch the per-call chunks into per-prompt (pos, d) tensors and encode them."""
        result = {}
        for name, chunks in (layout.capture or {}).items():
            width = max(offset + before.shape[1] for offset, before, _ in chunks)
            batch, _, d = chunks[0][1].shape
            before_all = torch.zeros(batch, width, d, dtype=chunks[0][1].dtype, device=chunks[0][1].device)
            after_all = torch.zeros_like(before_all)
            for offset, before, after in chunks:  # later calls overwrite (no-cache reruns everything)
                before_all[:, offset:offset + before.shape[1]] = before
                after_all[:, offset:offset + after.shape[1]] = after
            befores = [before_all[i, int(n_pad[i]):int(n_pad[i]) + lengths[i]] for i in range(batch)]
            afters = [after_all[i, int(n_pad[i]):int(n_pad[i]) + lengths[i]] for i in range(batch)]
            with torch.no_grad():
                lat_before = [self.manager.encode(name, b) for b in befores]
                lat_after = [self.manager.encode(name, a) for a in afters]
            result[name] = SteeringCapture(name, befores, afters, lat_before, lat_after)
        return result


@contextlib.contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """Seed torch's RNG for the block and restore the caller's RNG state afterwards."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        yield


def merge_generations(parts: list[SteeredGeneration], capture: bool) -> SteeredGeneration:
    """Concatenate per-group generations (one group when batched, one per prompt otherwise)."""
    if len(parts) == 1:
        return parts[0]
    captured = None
    if capture:
        captured = {}
        for name in parts[0].captured or {}:
            fields = [sum((list(getattr(p.captured[name], f)) for p in parts), [])  # type: ignore[index]
                      for f in ("before", "after", "latents_before", "latents_after")]
            captured[name] = SteeringCapture(name, *fields)
    return SteeredGeneration(*(sum((list(getattr(p, f)) for p in parts), [])
                               for f in ("texts", "completions", "tokens", "prompt_lengths")), captured)


__all__ = ["ModelSteering", "SteeredGeneration", "SteeringCapture", "SteeringComparison"]
