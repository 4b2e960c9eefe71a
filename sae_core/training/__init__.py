"""SAE training: activation sources, the sparse TopK step, SAE state and checkpoints, and the loop.

* :mod:`.sources` — activation streams (model forwards or stored rows) and the block shuffler.
* :mod:`.sparse_topk` — the TopK step with a sparse decoder backward.
* :mod:`.state` — one SAE with its optimiser and schedules; safetensors checkpoints.
* :mod:`.loop` — :func:`train_saes` and its entry points on a model or on stored rows.
"""

from sae_core.texts import split_documents
from sae_core.training.loop import (
    HeldOutEvaluator,
    TrainedSAE,
    TrainingRun,
    checkpoint_dir_for,
    init_distributed,
    model_source,
    train_from_activations,
    train_from_model,
    train_saes,
)
from sae_core.training.sources import hook_widths, rank_and_world
from sae_core.training.state import SAE_CLASSES, build_training_sae, to_inference_sae

__all__ = ["SAE_CLASSES", "HeldOutEvaluator", "TrainedSAE", "TrainingRun", "build_training_sae", "checkpoint_dir_for",
           "hook_widths", "init_distributed", "model_source", "rank_and_world", "split_documents",
           "to_inference_sae", "train_from_activations", "train_from_model", "train_saes"]
