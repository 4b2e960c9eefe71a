"""The whole pipeline on SmolLM2 in bfloat16 on one CUDA device, checking that no stage leaves it.

    python -m bench.gpu_check            # needs a CUDA GPU; ~2-4 minutes on one H200

One constant file (the default model's) with the device and dtype overridden on the command line's
way (``RunConfig`` overrides of ``MODEL_LOAD_CONFIG`` are not allowed, so a copy of the module is
made with ``device="cuda"``, ``dtype="bfloat16"``): store, whitening, training + evaluation,
analysis, steering. After every stage it asserts that the tensors it made live on the GPU (model
weights, stored run metadata's device, the whitener, the SAE and its optimiser state, encoded
latents, steered activations), and times each stage. Writes ``bench/results/gpu.json``.
"""

from __future__ import annotations

import logging
import tempfile
import time
import types
from pathlib import Path

import torch

from bench.common import write_result


def _gpu_constants() -> types.ModuleType:
    from sae_core.models import load_model_constants

    source = load_model_constants("smollm2_135m_instruct")
    copy = types.ModuleType("smollm2_135m_instruct")
    for key in dir(source):
        if key.isupper():
            setattr(copy, key, getattr(source, key))
    copy.MODEL_LOAD_CONFIG = {**source.MODEL_LOAD_CONFIG, "device": "cuda", "dtype": "bfloat16"}
    copy.STORE = {**getattr(source, "STORE", {}), "sample_limit": 4000}
    copy.TRAINING = {"total_training_tokens": 1_048_576, "train_batch_size_tokens": 4096}
    return copy


def _on_gpu(what: str, *tensors: torch.Tensor) -> None:
    bad = [str(t.device) for t in tensors if t.device.type != "cuda"]
    assert not bad, f"{what} left the GPU: {bad}"


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    if not torch.cuda.is_available():
        raise SystemExit("bench.gpu_check needs a CUDA GPU (torch.cuda.is_available() is False)")
    from sae_core import pipeline
    from sae_core.config import RunConfig
    from sae_core.steering import ModelSteering, Steer

    run = RunConfig.from_constants(_gpu_constants())
    assert run.device == "cuda" and run.training.device == "cuda"
    seconds, began = {}, time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        t = time.perf_counter()
        model = pipeline.load_model_of(run)
        texts = pipeline.load_texts_of(run)
        _on_gpu("model weights", *list(model.parameters())[:3])
        seconds["load"] = time.perf_counter() - t

        t = time.perf_counter()
        stored = pipeline.collect_activations(model, run, texts, out)
        seconds["store"] = time.perf_counter() - t
        assert stored.meta["model"]["device"].startswith("cuda"), stored.meta["model"]

        t = time.perf_counter()
        whiteners = pipeline.fit_whitening(stored, run, out)
        seconds["whitening"] = time.perf_counter() - t
        _on_gpu("whitener", *(w.mean for w in whiteners.values()))

        t = time.perf_counter()
        reports = pipeline.train_saes(model, texts, run, out)
        seconds["train_and_evaluate"] = time.perf_counter() - t
        manager = pipeline.load_saes(model, run, out)
        hook = run.hook_points[0]
        _on_gpu("SAE", manager[hook].sae.W_dec)

        t = time.perf_counter()
        analysis = pipeline.analyse(model, manager, texts, run, out, hook)
        seconds["analyse"] = time.perf_counter() - t
        x = stored.activations(hook)[:64].to(device=run.device, dtype=torch.float32)
        _on_gpu("encoded latents", manager.encode(hook, x))

        t = time.perf_counter()
        feature = pipeline.steering_latent(run, analysis, None).feature
        steer, comparison = pipeline.steering_example(model, manager, run, hook, feature,
                                                      scale=pipeline.mean_activation_norm(stored, hook))
        steering = ModelSteering(model, manager)
        with steering.apply([Steer(hook, feature, steer.coefficient)]):
            generated = steering.generate_with_steering(run.steering.prompt, max_new_tokens=4, capture=True)
        _on_gpu("steered activations", *generated.captured[hook].after)
        seconds["steer"] = time.perf_counter() - t
        result = reports[hook].eval
    total = time.perf_counter() - began
    write_result("gpu", {
        "device": torch.cuda.get_device_name(0), "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "total_seconds": round(total, 1), "stored_rows": len(stored),
        "store_tokens_per_second": round(len(stored) / seconds["store"]),
        "training_tokens": run.training.total_training_tokens,
        "train_tokens_per_second_incl_eval": round(run.training.total_training_tokens / seconds["train_and_evaluate"]),
        "explained_variance": result.explained_variance, "ce_recovered": result.ce_recovered, "l0": result.l0,
        "dead_fraction": result.dead_fraction, "steering": {"before": comparison.before.completions[0],
                                                            "after": comparison.after.completions[0]}})
    assert total < 300, f"the GPU pipeline took {total:.0f} s (target: under 5 minutes)"
    print(f"gpu check passed in {total:.0f} s: {seconds}")


if __name__ == "__main__":
    main()
