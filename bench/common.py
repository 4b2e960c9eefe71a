"""Shared benchmark helpers: result files, machine description, timing, offline model set-up.

Benchmarks report rates as medians of a few repeats and compare ratios measured in the same run
(the machine is shared; absolute numbers drift). Results are JSON files written atomically to
``bench/results/<name>.json``.

    from bench.common import load_smollm2, machine_info, median_rate, write_result
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def spread(values: list[float]) -> dict[str, Any]:
    """Median and min-max of repeated measurements (with the values)."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}


def git_commit() -> str | None:
    """The checkout's short commit, recorded with a result (None outside git)."""
    import subprocess

    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parent, check=False)
    return done.stdout.strip() or None


def write_result(name: str, payload: dict[str, Any]) -> Path:
    """Write ``payload`` (plus machine info under ``"machine"``) to ``bench/results/<name>.json`` atomically."""
    from sae_core.files import atomic_write_json

    record = {"benchmark": name, "written_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "machine": machine_info(), **payload}
    return atomic_write_json(RESULTS_DIR / f"{name}.json", record)


def machine_info() -> dict[str, Any]:
    """CPU, threads, memory, load and library versions: enough to read a result file later."""
    import importlib.metadata

    import torch

    versions = {}
    for package in ("torch", "transformer-lens", "sae-lens", "transformers", "safetensors", "numpy", "sae_core"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    mem_gib = None
    with contextlib.suppress(OSError, ValueError):
        mem_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    cpu_model, flags = None, []
    with contextlib.suppress(OSError):
        info = Path("/proc/cpuinfo").read_text()
        cpu_model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), None)
        present = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
        flags = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in present]  # what the matmuls can use
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_model": cpu_model, "cpu_flags": flags,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "memory_gib": mem_gib,
            "load_average": list(os.getloadavg()), "python": platform.python_version(), "versions": versions}


def cpu_kind(machine: dict[str, Any] | None) -> str:
    """The CPU of a ``machine_info()`` record with the flags its matmuls can use: "AMD EPYC (avx2, avx512f, avx512_bf16)"."""
    if not machine or not machine.get("cpu_model"):
        return "CPU model not recorded"
    return f"{machine['cpu_model']} ({', '.join(machine.get('cpu_flags', []))})"


class Rate(NamedTuple):
    """Units per second over ``repeats`` timed calls: the median and every value."""

    median: float
    rates: list[float]
    units: float  # units processed by one call (the last one)
    seconds: list[float]


def median_rate(fn: Callable[[], float], repeats: int = 3, warmup: int = 0) -> Rate:
    """Call ``fn`` (returning the units it processed, e.g. tokens) ``repeats`` times; median units/s."""
    for _ in range(warmup):
        fn()
    rates, seconds, units = [], [], 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        units = float(fn())
        elapsed = time.perf_counter() - start
        seconds.append(elapsed)
        rates.append(units / elapsed)
    return Rate(statistics.median(rates), rates, units, seconds)


def load_smollm2(dtype: str = "float32") -> Any:
    """The default model (SmolLM2-135M-Instruct) as a HookedTransformer on CPU, loaded offline."""
    from sae_core.model_loading import load_model
    from sae_core.models import load_model_constants

    constants = load_model_constants("smollm2_135m_instruct")
    # a copy, so the imported constant module is never mutated
    copy = types.SimpleNamespace(**{k: getattr(constants, k) for k in dir(constants) if k.isupper()})
    copy.__name__ = constants.__name__
    copy.MODEL_LOAD_CONFIG = {**constants.MODEL_LOAD_CONFIG, "dtype": dtype}
    return load_model(copy)


@contextlib.contextmanager
def saelens_offline(model: Any) -> Iterator[None]:
    """Make SAELens's ``CacheActivationsRunner`` use ``model`` instead of loading one from the hub.

    ``CacheActivationsRunner`` has no model override (the training runner has ``override_model``);
    its module-level ``load_model`` is replaced for the duration of the block.
    """
    import sae_lens.cache_activations_runner as runner_module

    original = runner_module.load_model
    runner_module.load_model = lambda *args, **kwargs: model
    try:
        yield
    finally:
        runner_module.load_model = original


def saelens_training_kwargs(cfg: Any) -> dict[str, Any]:
    """The settings SAELens's training runners (single and multi-SAE) share with our ``TrainingConfig``.

    Same context, BOS, special-token exclusion, budget, batch, Adam, lr schedule and dead window;
    a mixing buffer holding a batch, and our shuffle buffer when the budget allows. float32 master
    weights on the CPU, no checkpoints, no wandb.
    """
    from sae_lens import LoggingConfig

    if cfg.buffer_passes != 1 or cfg.optimizer.lr_scheduler != "constant":
        raise ValueError(f"the peer cannot be given the same work: buffer_passes={cfg.buffer_passes} (SAELens forwards "
                         f"every SAE row) and lr_scheduler={cfg.optimizer.lr_scheduler!r} (mirrored: 'constant' with "
                         "warm-up / decay only); set training.buffer_passes=1 and optimizer.lr_scheduler=constant")
    steps, context = cfg.total_steps, cfg.windows.max_text_length
    mixing = cfg.shuffle_buffer_tokens if cfg.total_training_tokens >= 8 * cfg.shuffle_buffer_tokens else 0
    return dict(
        model_name="smollm2", dataset_path="sae_core-bench", streaming=False, context_size=context,
        prepend_bos=cfg.windows.prepend_bos, exclude_special_tokens=cfg.policy.exclude_special,
        training_tokens=cfg.total_training_tokens, train_batch_size_tokens=cfg.train_batch_size_tokens,
        store_batch_size_prompts=cfg.loader.training_batch_tokens // context,
        n_batches_in_buffer=max(32, 2 * cfg.train_batch_size_tokens // context, mixing // context),
        lr=cfg.optimizer.lr, adam_beta1=cfg.optimizer.adam_betas[0], adam_beta2=cfg.optimizer.adam_betas[1],
        lr_scheduler_name="constant", lr_warm_up_steps=round(cfg.optimizer.lr_warm_up_fraction * steps),
        lr_decay_steps=round(cfg.optimizer.lr_decay_fraction * steps),
        dead_feature_window=max(1, cfg.dead_window_tokens // cfg.train_batch_size_tokens),
        device="cpu", dtype="float32", seed=cfg.seed, checkpoint_path=None, output_path=None,
        save_final_checkpoint=False, n_checkpoints=0, logger=LoggingConfig(log_to_wandb=False))


def topk_training_config(sae: Any, d_in: int, **extra: Any) -> Any:
    """SAELens's ``TopKTrainingSAEConfig`` for one of our ``SAEConfig``s (same k, AuxK, decoder init);
    ``extra``: SAELens-only settings (``normalize_activations``, ...)."""
    from sae_lens.saes.topk_sae import TopKTrainingSAEConfig

    return TopKTrainingSAEConfig(d_in=d_in, d_sae=sae.d_sae_for(d_in), k=sae.k,
                                 aux_loss_coefficient=sae.aux_loss_coefficient, decoder_init_norm=sae.decoder_init_norm,
                                 rescale_acts_by_decoder_norm=sae.rescale_acts_by_decoder_norm, **extra)
