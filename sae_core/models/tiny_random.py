"""A tiny randomly initialised model for fast unit tests: 2 layers, d_model 32, SmolLM2's tokenizer.

The tokenizer ships in the repository (``sae_core/models/tokenizers/smollm2``), so nothing is
downloaded. Only what differs from the section defaults is stated.
"""

MODEL_NAME = "tiny-random"
# Random init from RANDOM_CONFIG (seeded), not pretrained weights.
MODEL_SOURCE = "random"
# The offline default's tokenizer, so tests tokenise real text with real special tokens.
TOKENIZER = "smollm2"
# Small enough that a forward pass takes milliseconds on CPU.
RANDOM_CONFIG = {
    "n_layers": 2,
    "d_model": 32,
    "d_head": 8,
    "n_heads": 4,
    "d_mlp": 64,
    "n_ctx": 128,
    "act_fn": "silu",
    "normalization_type": "RMS",
    "positional_embedding_type": "rotary",
    "gated_mlp": True,
    "seed": 0,
}
# float32 on CPU: tests compare against float32 references.
MODEL_LOAD_CONFIG = {
    "device": "cpu",
    "dtype": "float32",
}

# The last block's residual stream.
HOOK_POINTS = ["blocks.1.hook_resid_post"]

# Tests pass their own texts; the fortunes are the fallback, a slice of them.
DATASET = {"sample_limit": 200}
# Short windows so a handful of documents make several batches.
WINDOWS = {"max_text_length": 32}
# Small batches, packed as in the default model's file.
LOADER = {"batch_size": 8, "pack_windows": True}
# Small shards so tests exercise several of them.
STORE = {"shard_size": 256, "sample_limit": 64}
# A small SAE that trains in seconds.
SAE = {"d_sae": 64, "k": 4}
# A gentler rate for the tiny random model.
OPTIMIZER = {"lr": 1e-3}
# One small budget.
TRAINING = {"total_training_tokens": 4096, "train_batch_size_tokens": 256}
# A small held-out split for the few documents tests pass; half of its windows also scored for CE.
EVALUATION = {"held_out_documents": 32, "ce_windows": 16}
# Analysis on the held-out documents, small blocks.
ANALYSIS = {"n_windows": 32, "top_k_examples": 5, "context_window": 4, "similarity_chunk_size": 16,
            "cooccurrence_chunk_size": 16}
# Steering smoke settings.
STEERING = {"prompt": "Hello", "coefficient": 4.0, "max_new_tokens": 5}
