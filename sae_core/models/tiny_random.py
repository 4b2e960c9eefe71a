"""A tiny randomly initialised model for fast unit tests: 2 layers, d_model 32, SmolLM2's tokenizer.

No weights are downloaded beyond the default model's tokenizer (fetched once with it).
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
MODEL_LOAD_CONFIG = {
    "device": "cpu",
    "dtype": "float32",
}

# The last block's residual stream.
HOOK_POINTS = ["blocks.1.hook_resid_post"]

# An in-memory list of texts is supplied by the tests; the fortunes corpus is the fallback.
DATASET = {"source": "fortunes", "sample_limit": 200, "seed": 0}
# Small windows and shards so tests exercise several shards.
EXTRACTION = {"max_text_length": 32, "batch_size": 8, "shard_size": 256, "forward_dtype": "float32",
              "storage_dtype": "float32", "exclude_special_tokens": True, "sample_limit": 64,
              "pack_windows": True}
# Whitening with a small regulariser.
WHITENING = {"method": "zca", "eps": 1e-4, "sample_limit": 64}
# A small SAE that trains in seconds.
TRAINING = {"architecture": "topk", "d_sae": 64, "k": 4, "lr": 1e-3, "total_training_tokens": 4096,
            "train_batch_size_tokens": 256, "max_text_length": 32, "forward_dtype": "float32", "seed": 0}
# Analysis on a handful of documents.
ANALYSIS = {"n_eval_documents": 32, "top_k_examples": 5, "context_window": 4, "similarity_metric": "cosine",
            "cooccurrence_metric": "jaccard", "chunk_size": 16}
# Steering smoke settings.
STEERING = {"prompt": "Hello", "coefficient": 4.0, "max_new_tokens": 5, "feature": None}
