"""GPT-2 small (124M, 12 layers, d_model 768), loaded from the Hugging Face hub through TransformerLens.

Needs hub access (set HF_TOKEN for gated models). To run offline, download the HF folder elsewhere,
copy it here and set MODEL_SOURCE = "hf_folder" and MODEL_PATH to that folder.
"""

# The TransformerLens official name.
MODEL_NAME = "gpt2"
# Loaded with HookedTransformer.from_pretrained (needs the hub).
MODEL_SOURCE = "transformerlens"
# Used only when MODEL_SOURCE is "hf_folder" or "gguf".
MODEL_PATH = None
# Passed to from_pretrained unchanged. LN models: TransformerLens folds and centres weights by default, as SAELens's gpt2-small SAEs expect.
# On a GPU: "device": "cuda", "dtype": "bfloat16"; on several: "n_devices": 2, or HF kwargs such as
# "device_map": "auto" / "load_in_4bit": True.
MODEL_LOAD_CONFIG = {
    "device": "cpu",
    "dtype": "float32",
    "n_devices": 1,
    "fold_ln": True, "center_writing_weights": True, "center_unembed": True,
}

# A middle layer's residual stream.
HOOK_POINTS = ["blocks.8.hook_resid_pre"]

# Pretrained SAELens release and SAE id per layer ({layer} is filled in; None: train your own).
SAE_RELEASE = "gpt2-small-res-jb"
SAE_ID_TEMPLATE = "blocks.{layer}.hook_resid_pre"

# The offline corpus; swap in {"source": "hf", "name": "...", "split": "train"} (the column: WINDOWS["text_field"]).
DATASET = {}
# "auto": bf16 autocast where the device has native bf16 matmuls (GPUs, CPUs with AVX512-BF16 or AMX),
# float32 elsewhere (bf16 runs ~8x slower than float32 on an AVX2-only CPU); the run records the choice.
FORWARD = {"dtype": "auto"}
# Token-budget batches of packed windows: short documents share rows, nearly no padding.
LOADER = {"batch_tokens": 4096, "pack_windows": True}
# A TopK SAE at the released width.
SAE = {"d_sae": 24576, "k": 64}
# Long hub runs: SAELens's learning rate for 50M tokens.
OPTIMIZER = {"lr": 2e-4}
# A hub-scale budget.
TRAINING = {"total_training_tokens": 50_000_000}
# More held-out documents for analysis.
ANALYSIS = {"n_windows": 5000, "top_k_examples": 20}
# A stronger push than the small default.
STEERING = {"coefficient": 8.0, "max_new_tokens": 30}
