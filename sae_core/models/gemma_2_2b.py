"""Gemma-2-2B (26 layers, d_model 2304), with Gemma Scope SAEs, loaded from the Hugging Face hub through TransformerLens.

Needs hub access (set HF_TOKEN for gated models). To run offline, download the HF folder elsewhere,
copy it here and set MODEL_SOURCE = "hf_folder" and MODEL_PATH to that folder.
"""

# The TransformerLens official name.
MODEL_NAME = "google/gemma-2-2b"
# Loaded with HookedTransformer.from_pretrained (needs the hub).
MODEL_SOURCE = "transformerlens"
# Used only when MODEL_SOURCE is "hf_folder" or "gguf".
MODEL_PATH = None
# Passed to from_pretrained unchanged. Gemma Scope SAEs were trained on unprocessed weights (from_pretrained_no_processing).
# On a GPU: "device": "cuda", "dtype": "bfloat16"; on several: "n_devices": 2, or HF kwargs such as
# "device_map": "auto" / "load_in_4bit": True.
MODEL_LOAD_CONFIG = {
    "device": "cpu",
    "dtype": "float32",
    "n_devices": 1,
    "fold_ln": False, "center_writing_weights": False, "center_unembed": False,
}

# A middle layer's residual stream.
HOOK_POINTS = ["blocks.12.hook_resid_post"]

# Pretrained SAELens release and SAE id per layer ({layer} is filled in; None: train your own).
SAE_RELEASE = "gemma-scope-2b-pt-res-canonical"
SAE_ID_TEMPLATE = "layer_{layer}/width_16k/canonical"

# The offline corpus; swap in {"source": "hf", "name": "...", "split": "train"} (the column: WINDOWS["text_field"]).
DATASET = {}
# "auto": bf16 autocast where the device has native bf16 matmuls (GPUs, CPUs with AVX512-BF16 or AMX),
# float32 elsewhere (bf16 runs ~8x slower than float32 on an AVX2-only CPU); the run records the choice.
FORWARD = {"dtype": "auto"}
# Token-budget batches of packed windows: short documents share rows, nearly no padding.
LOADER = {"batch_tokens": 4096, "pack_windows": True}
# A TopK SAE like the released ones.
SAE = {"d_sae": 16384, "k": 82}
# Long hub runs: SAELens's learning rate for 50M tokens.
OPTIMIZER = {"lr": 2e-4}
# A hub-scale budget.
TRAINING = {"total_training_tokens": 50_000_000}
# More held-out documents for analysis.
ANALYSIS = {"n_windows": 5000, "top_k_examples": 20}
# A stronger push than the small default.
STEERING = {"coefficient": 8.0, "max_new_tokens": 30}
