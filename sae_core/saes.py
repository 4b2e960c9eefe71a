"""SAEs per hook point: loading, whitening kept beside each SAE, encode / decode, splicing, top latents.

An :class:`SAEManager` holds one SAELens ``SAE`` per TransformerLens hook point, with the
whitening it was trained with (if any). SAEs come from

* a folder on disk in SAELens format (``cfg.json`` + ``sae_weights.safetensors``), which is both
  what ``sae_core`` training writes and what ``SAE.save_model`` writes, read with
  ``sae_lens.SAE.load_from_disk``;
* a SAELens pretrained release (``release`` / ``sae_id``, e.g. Gemma Scope
  ``gemma-scope-2b-pt-res`` / ``layer_12/width_16k/average_l0_82``) through ``SAE.from_pretrained``.
  Without the Hugging Face hub (``HF_HUB_OFFLINE=1`` or no network) this raises
  :class:`HubUnavailableError` naming the release, the reason and the two fixes, instead of the
  hub client's generic "check your connection".

Whitening. An SAE trained on whitened activations has ``whitening.safetensors`` +
``whitening.json`` in its folder (written by ``sae_core.whitening.Whitener.save``). The manager
loads it with the SAE and applies it transparently, so callers always speak in the model's own
activation space::

    encode(hook, x) = sae.encode(whiten(x))          whiten(x)  = (x - mean) @ transform
    decode(hook, z) = unwhiten(sae.decode(z))        unwhiten(y) = y @ reverse_transform + mean

SAELens could instead fold the whitening into the weights (``SAE.fold_activation_whitening``);
we keep it separate so the saved SAE stays the one that was trained (its latents, decoder norms
and sparsity penalties refer to the whitened space) and the folder round-trips unchanged.

Dtypes. Activations are cast once, explicitly, to the SAE's dtype on the way in (so bfloat16
activations are whitened in the SAE's float32); ``decode`` returns the SAE's dtype and callers that
write back into the model (:meth:`SAEManager.spliced`, ``sae_core.steering``) cast to the
activation's dtype.

Splicing uses a plain ``HookedTransformer`` and ``model.hooks(fwd_hooks=...)`` rather than
SAELens's ``HookedSAETransformer``: users keep the model object they loaded (any source of
``sae_core.model_loading``), nothing is subclassed or re-loaded, and TransformerLens removes the
hooks when the context exits, also after an exception.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from jaxtyping import Bool, Float, Int
from sae_lens import SAE
from torch import Tensor
from transformer_lens import HookedTransformer

from sae_core.activations import run_to_hooks
from sae_core.config import TokenPolicy
from sae_core.files import publish_dir
from sae_core.hooks import resolve_layer, validate_hook
from sae_core.model_loading import resolve_dtype
from sae_core.models import load_run_config
from sae_core.sae_folders import decode, encode, load_sae_folder, write_checksums
from sae_core.whitening import Whitener

logger = logging.getLogger(__name__)

# Normalisations whose decode depends on state left by the last encode: no standalone decode.
STATEFUL_NORMALIZATIONS = ("layer_norm", "constant_norm_rescale")


class HubUnavailableError(ConnectionError):
    """A SAELens pretrained release was requested but the Hugging Face hub cannot be reached."""


class LoadedSAE(NamedTuple):
    """One SAE at one hook point, with the whitening it was trained with (None: not whitened)."""

    hook: str
    sae: SAE
    whitener: Whitener | None
    source: str  # folder path, or "release/sae_id", or "memory"


@dataclass
class SpliceRecord:
    """Latents of the last forward pass through each spliced hook point."""

    latents: dict[str, Float[Tensor, "... d_sae"]] = field(default_factory=dict)


def _hub_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "the hub is offline or unreachable" for huggingface_hub and its HTTP clients."""
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    errors: list[type[BaseException]] = [LocalEntryNotFoundError, OfflineModeIsEnabled, ConnectionError]
    with contextlib.suppress(ImportError):
        import httpx

        errors.append(httpx.TransportError)
    with contextlib.suppress(ImportError):
        import requests

        errors.append(requests.exceptions.ConnectionError)
    return tuple(errors)


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


class SAEManager:
    """SAEs by hook point, with transparent whitening; optionally bound to a model to check hook names."""

    def __init__(self, model: HookedTransformer | None = None) -> None:
        self.model = model
        self._saes: dict[str, LoadedSAE] = {}

    # --- registry ---------------------------------------------------------------------------------
    @property
    def hooks(self) -> list[str]:
        """Hook points that have an SAE, in the order they were added."""
        return list(self._saes)

    def __contains__(self, hook: str) -> bool:
        return hook in self._saes

    def __getitem__(self, hook: str) -> LoadedSAE:
        if hook not in self._saes:
            known = ", ".join(self._saes) or "none yet"
            raise KeyError(f"no SAE loaded for hook {hook!r}; loaded hooks: {known}. "
                           "Load one with SAEManager.load_from_disk / load_pretrained / add")
        return self._saes[hook]

    def add(self, hook: str, sae: SAE, whitener: Whitener | None = None, source: str = "memory") -> LoadedSAE:
        """Register an in-memory SAE (and its whitening) at ``hook``; replaces any SAE already there."""
        if self.model is not None:
            validate_hook(self.model, hook)
        if sae.cfg.normalize_activations == "covariance_whitening":
            raise ValueError(f"SAE for {hook} says normalize_activations='covariance_whitening' but SAELens "
                             "only applies it while training; fold it (SAE.fold_activation_whitening) or "
                             "pass the Whitener to SAEManager.add")
        if whitener is not None and whitener.mean.shape[0] != sae.cfg.d_in:
            raise ValueError(f"the whitening for {hook} has width {whitener.mean.shape[0]} but the SAE has "
                             f"d_in={sae.cfg.d_in}; they were not trained together")
        entry = LoadedSAE(hook, sae.eval(), whitener, source)
        if hook in self._saes:
            logger.info("replacing the SAE at %s (%s) with %s", hook, self._saes[hook].source, source)
        self._saes[hook] = entry
        return entry

    def _device(self, device: str | torch.device | None) -> str:
        """``device``, else the bound model's device (SAEs follow the model), else ``cpu``."""
        if device is not None:
            return str(device)
        return str(self.model.cfg.device) if self.model is not None else "cpu"

    def load_from_disk(self, folder: str | os.PathLike[str], hook: str | None = None, *,
                       device: str | torch.device | None = None, dtype: str | torch.dtype | None = None) -> LoadedSAE:
        """Load a SAELens-format SAE folder (and ``whitening.safetensors`` beside it, if present).

        ``hook`` defaults to the hook recorded in the SAE's config (``metadata.hook_name``);
        ``device=None`` follows the bound model; ``dtype=None`` keeps the dtype the SAE was saved with.
        """
        sae, whitener = load_sae_folder(folder, self._device(device), dtype)
        return self.add(self._hook_for(sae, hook, str(folder)), sae, whitener, str(folder))

    def load_pretrained(self, release: str, sae_id: str, hook: str | None = None, *,
                        device: str | torch.device | None = None, dtype: str | torch.dtype = "float32") -> LoadedSAE:
        """Load a SAELens pretrained release (needs the Hugging Face hub or its local cache); ``device=None``
        follows the bound model."""
        device = self._device(device)
        try:
            sae = SAE.from_pretrained(release, sae_id, device=str(device),
                                      dtype=str(resolve_dtype(dtype)).removeprefix("torch."))
        except _hub_errors() as err:
            reason = ("offline (HF_HUB_OFFLINE=1)" if _hub_offline()
                      else f"unreachable ({type(err).__name__})")
            raise HubUnavailableError(
                f"cannot load SAELens release {release!r}, sae_id {sae_id!r}: the Hugging Face hub is "
                f"{reason} and the files are not in the local hub cache. Fix: set the hub online "
                "(unset HF_HUB_OFFLINE, with network access) and retry, or download the SAE where the "
                f"hub is reachable (SAE.from_pretrained({release!r}, {sae_id!r}).save_model(folder)), "
                "copy the folder here and load it with SAEManager.load_from_disk(folder, hook=...)"
            ) from err
        return self.add(self._hook_for(sae, hook, f"{release}/{sae_id}"), sae, None, f"{release}/{sae_id}")

    def load_saes_for_model(self, model_name: str, layers: Sequence[int], *,
                            device: str | torch.device | None = None) -> list[LoadedSAE]:
        """One SAE per layer from the constant file's ``SAE_RELEASE`` and ``SAE_ID_TEMPLATE`` (the
        design document's name for this). The release is a SAELens pretrained release (needs the hub
        or its cache; offline: :class:`HubUnavailableError`) or a local folder holding one SAELens
        folder per SAE id. Each SAE sits at the hook its config records."""
        run = load_run_config(model_name)
        if run.sae_release is None or run.sae_id_template is None:
            raise ValueError(f"the constant file {model_name!r} names no pretrained SAEs; set SAE_RELEASE and "
                             "SAE_ID_TEMPLATE (e.g. 'layer_{layer}/width_16k/canonical') there, or load SAEs "
                             "with load_from_disk / load_pretrained")
        loaded = []
        for layer in layers:
            index = resolve_layer(self.model, layer) if self.model is not None else layer
            sae_id = run.sae_id_template.format(layer=index)
            local = Path(run.sae_release)
            loaded.append(self.load_from_disk(local / sae_id, device=device) if local.is_dir()
                          else self.load_pretrained(run.sae_release, sae_id, device=device))
        return loaded

    def _hook_for(self, sae: SAE, hook: str | None, source: str) -> str:
        hook = hook or sae.cfg.metadata.hook_name
        if not hook:
            raise ValueError(f"the SAE from {source} records no hook point (cfg metadata.hook_name); "
                             "pass hook='blocks.L.hook_resid_post' (or whichever it was trained on)")
        return hook

    def save(self, hook: str, folder: str | os.PathLike[str]) -> Path:
        """Write the SAE at ``hook`` (SAELens format) and its whitening into a new folder, atomically."""
        entry = self[hook]
        folder = Path(folder)
        if folder.exists():
            raise FileExistsError(f"{folder} already exists; choose a new folder or delete it first")
        if not entry.sae.cfg.metadata.hook_name:
            entry.sae.cfg.metadata.hook_name = hook

        def build(tmp: Path) -> None:
            entry.sae.save_model(tmp)
            write_checksums(tmp)
            if entry.whitener is not None:
                entry.whitener.save(tmp)

        return publish_dir(folder, build)

    # --- maps ------------------------------------------------------------------------------------
    def encode(self, hook: str, activations: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        """Latents of ``activations`` (model space): ``sae.encode(whiten(x))``, in the SAE's dtype."""
        sae, whitener = self[hook].sae, self[hook].whitener
        if activations.shape[-1] != sae.cfg.d_in:
            raise ValueError(f"activations at {hook} have width {activations.shape[-1]} but the SAE "
                             f"expects d_in={sae.cfg.d_in}; is this SAE for another hook or model?")
        if activations.device.type != sae.device.type:
            raise ValueError(f"activations at {hook} are on {activations.device} but the SAE is on {sae.device}; "
                             "load the SAE with device= the model's device")
        return encode(sae, whitener, activations)

    def decode(self, hook: str, latents: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_in"]:
        """Model-space reconstruction of ``latents``: ``unwhiten(sae.decode(z))``, in the SAE's dtype."""
        return decode(self[hook].sae, self[hook].whitener, latents)

    def reconstruct(self, hook: str, activations: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_in"]:
        """``decode(encode(x))`` in model space."""
        return self.decode(hook, self.encode(hook, activations))

    def decoder_directions(self, hook: str, features: Sequence[int]) -> Float[Tensor, "n d_in"]:
        """Model-space direction of each latent: ``decode(e_i) - decode(0)`` (whitening and b_dec included)."""
        sae = self[hook].sae
        if sae.cfg.normalize_activations in STATEFUL_NORMALIZATIONS:
            raise NotImplementedError(
                f"the SAE at {hook} uses normalize_activations={sae.cfg.normalize_activations!r}, whose "
                "decode depends on the input it last encoded, so a latent has no fixed direction")
        bad = [f for f in features if not 0 <= f < sae.cfg.d_sae]
        if bad:
            raise IndexError(f"latent indices {bad} out of range for the SAE at {hook} (d_sae={sae.cfg.d_sae})")
        n = len(features)
        basis = torch.zeros(n + 1, sae.cfg.d_sae, dtype=sae.dtype, device=sae.device)  # last row: z = 0
        basis[torch.arange(n), torch.as_tensor(list(features), dtype=torch.long)] = 1.0
        with torch.no_grad():
            out = self.decode(hook, basis)  # (n + 1, d_in)
        return out[:n] - out[n]

    # --- splicing --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def spliced(self, model: HookedTransformer, hooks: Sequence[str] | None = None,
                with_error: bool = False) -> Iterator[SpliceRecord]:
        """Run ``model`` with each hook's activation replaced by the SAE reconstruction.

        ``with_error=False``: the hook outputs ``decode(encode(x))`` (what the model does on the
        SAE's reconstruction alone). ``with_error=True``: it outputs ``x`` exactly, computed as
        ``x.detach() + recon - recon.detach()`` - the value is bit-identical to the clean forward
        while gradients flow only through the SAE (the error term is a constant), as in SAELens's
        ``use_error_term``. The yielded :class:`SpliceRecord` holds the latents of the last pass.
        """
        hooks = list(hooks) if hooks is not None else self.hooks
        for name in hooks:
            validate_hook(model, name)
            self[name]  # noqa: B018 - raises with the loaded hooks if missing
        record = SpliceRecord()

        def splice(activation: Tensor, hook: Any) -> Tensor:
            latents = self.encode(hook.name, activation)
            recon = self.decode(hook.name, latents).to(activation.dtype)  # back to the model's dtype
            record.latents[hook.name] = latents.detach()
            if with_error:
                return activation.detach() + (recon - recon.detach())
            return recon

        with model.hooks(fwd_hooks=[(name, splice) for name in hooks]):
            yield record


class TopLatents(NamedTuple):
    """The strongest latents of one hook point on one text (max over kept positions)."""

    hook: str
    indices: Int[Tensor, " k"]
    values: Float[Tensor, " k"]
    positions: Int[Tensor, " k"]  # token position where each latent peaks
    latents: Float[Tensor, "pos d_sae"]  # every latent at every position (excluded positions included)


class FeatureAnalysis(NamedTuple):
    """Top latents of a text per hook point."""

    text: str
    tokens: list[str]
    kept: Bool[Tensor, " pos"]  # positions the maximum ran over (special tokens excluded by the policy)
    per_hook: dict[str, TopLatents]


class SAEAnalyzer:
    """Which latents a text activates, per hook point."""

    def __init__(self, model: HookedTransformer, manager: SAEManager,
                 policy: TokenPolicy | None = None) -> None:
        self.model = model
        self.manager = manager
        self.policy = policy if policy is not None else TokenPolicy()  # BOS / EOS / special excluded

    def analyze_features(self, text: str, hooks: Sequence[str] | None = None, top_k: int = 10,
                         prepend_bos: bool | None = None) -> FeatureAnalysis:
        """Top ``top_k`` latents per hook for ``text``: max over positions the policy keeps.

        BOS / EOS / special-token positions are left out of the maximum by default (the BOS
        position carries outsized activations that would otherwise dominate every list).
        """
        hooks = list(hooks) if hooks is not None else self.manager.hooks
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        bos = self.model.cfg.default_prepend_bos if prepend_bos is None else prepend_bos
        tokens = self.model.to_tokens(text, prepend_bos=bos)  # (1, pos)
        kept = self.policy.keep_mask(tokens, torch.ones_like(tokens), self.model.tokenizer)[0]
        if not kept.any():
            raise ValueError(f"no position of {text!r} is kept by {self.policy}; pass a longer text "
                             "or a TokenPolicy that keeps special tokens")
        acts = run_to_hooks(self.model, hooks, tokens)
        per_hook = {}
        for name in hooks:
            with torch.no_grad():
                latents = self.manager.encode(name, acts[name][0])  # (pos, d_sae)
            masked = latents.masked_fill(~kept.to(latents.device)[:, None], float("-inf"))
            peak, where = masked.max(dim=0)  # (d_sae,)
            k = min(top_k, peak.shape[0])
            values, indices = peak.topk(k)
            per_hook[name] = TopLatents(name, indices, values, where[indices], latents)
        strs = self.model.to_str_tokens(tokens[0])
        return FeatureAnalysis(text, list(strs), kept, per_hook)


__all__ = ["STATEFUL_NORMALIZATIONS", "FeatureAnalysis", "HubUnavailableError",
           "LoadedSAE", "SAEAnalyzer", "SAEManager", "SpliceRecord", "TopLatents"]
