"""Qwen3-0.6B (28 layers, d_model 1024), loaded from the Hugging Face hub through TransformerLens.

Needs hub access (set HF_TOKEN for gated models). To run offline, download the HF folder elsewhere,
copy it here and set MODEL_SOURCE = "hf_folder" and MODEL_PATH to that folder.
"""

# The TransformerLens official name.
MODEL_NAME = "Qwen/Qwen3-0.6B"
# Loaded with HookedTransformer.from_pretrained (needs the hub).
MODEL_SOURCE = "transformerlens"
# Used only when MODEL_SOURCE is "hf_folder" or "gguf".
MODEL_PATH = None
# Passed to from_pretrained unchanged. No weight processing, so hook points hold what the HF model computes.
# On a GPU: "device": "cuda", "dtype": "bfloat16"; on several: "n_devices": 2, or HF kwargs such as
# "device_map": "auto" / "load_in_4bit": True.
MODEL_LOAD_CONFIG = {
    "device": "cpu",
    "dtype": "float32",
    "n_devices": 1,
    "fold_ln": False, "center_writing_weights": False, "center_unembed": False,
}

# A middle layer's residual stream.
HOOK_POINTS = ["blocks.14.hook_resid_post"]

# Pretrained SAELens release and SAE id for HOOK_POINTS[0] (None: train your own).
SAE_RELEASE = None
SAE_ID = None

# The offline corpus; swap in {"source": "hf", "name": "...", "split": "train", "text_field": "text"}.
DATASET = {"source": "fortunes", "sample_limit": None, "seed": 0}
# Activation collection: bf16 autocast is the fast path on GPUs and recent CPUs.
EXTRACTION = {"max_text_length": 128, "batch_size": 32, "shard_size": 65536, "forward_dtype": "bfloat16",
              "storage_dtype": "float32", "exclude_special_tokens": True, "sample_limit": None,
              "batch_tokens": 4096, "pack_windows": True}
# Whitening statistics.
WHITENING = {"method": "zca", "eps": 1e-4, "sample_limit": 20000}
# A TopK SAE like the released ones.
TRAINING = {"architecture": "topk", "d_sae": 8192, "k": 64, "lr": 2e-4, "total_training_tokens": 50_000_000,
            "train_batch_size_tokens": 4096, "max_text_length": 128, "forward_dtype": "bfloat16", "seed": 0}
# Feature analysis.
ANALYSIS = {"n_eval_documents": 5000, "top_k_examples": 20, "context_window": 8, "similarity_metric": "cosine",
            "cooccurrence_metric": "jaccard", "chunk_size": 1024}
# A steering example.
STEERING = {"prompt": "The weather today is", "coefficient": 8.0, "max_new_tokens": 30}
