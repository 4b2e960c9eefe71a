"""A small pipeline run on the tiny random model (its constant file, a few overrides) for the stage tests."""

from __future__ import annotations

from sae_core.models import load_run_config

BASE = ["training.total_training_tokens=512", "training.train_batch_size_tokens=256", "training.shuffle_buffer_tokens=256",
        "evaluation.held_out_documents=10", "analysis.n_windows=12"]


def texts() -> list[str]:
    return [f"Entry {i}: " + " ".join(f"token{(i * 5 + j) % 40}" for j in range(10 + i % 7)) for i in range(40)]


def run_with(*overrides: str):
    return load_run_config("tiny_random", [*BASE, *overrides])
