"""Model loading: offline conversion parity against the HF model, constant files, the default model."""

from __future__ import annotations

import pytest
import torch

from sae_core.config.run import MODEL_NAMES
from sae_core.model_loading import FAMILIES, load_hf_folder, load_model, resolve_dtype
from sae_core.models import check_constants, known_models, load_model_constants


def _tiny_hf(arch: str):
    """A tiny random HF causal LM of the given architecture, built from its config class."""
    import transformers as tf

    common = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, max_position_embeddings=64)
    configs = {
        "LlamaForCausalLM": lambda: tf.LlamaConfig(num_key_value_heads=2, **common),
        "MistralForCausalLM": lambda: tf.MistralConfig(num_key_value_heads=2, sliding_window=None, **common),
        "Qwen2ForCausalLM": lambda: tf.Qwen2Config(num_key_value_heads=2, **common),
        "Qwen3ForCausalLM": lambda: tf.Qwen3Config(num_key_value_heads=2, head_dim=8, **common),
        "GPT2LMHeadModel": lambda: tf.GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64),
        "GemmaForCausalLM": lambda: tf.GemmaConfig(num_key_value_heads=2, head_dim=8, **common),
        "Gemma2ForCausalLM": lambda: tf.Gemma2Config(num_key_value_heads=2, head_dim=8, sliding_window=4, **common),
    }
    torch.manual_seed(0)
    cfg = configs[arch]()
    cfg.architectures = [arch]
    model = getattr(tf, arch)(cfg)
    # random init leaves norms at 1 / 0: perturb every parameter so conversion mistakes show
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("arch", sorted(FAMILIES))
def test_offline_family_matches_hf_logprobs(arch, tmp_path, tiny_model):
    hf = _tiny_hf(arch)
    hf.save_pretrained(tmp_path)
    tiny_model.tokenizer.save_pretrained(tmp_path)  # any tokenizer; ids below stay < 97
    model = load_hf_folder(tmp_path, {"device": "cpu", "dtype": "float32"})
    tokens = torch.randint(0, 97, (3, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(tokens).log_softmax(-1)
        ref = hf(tokens).logits.log_softmax(-1)
    assert (ours - ref).abs().max().item() < 1e-4


def test_unknown_architecture_names_known_ones(tmp_path, tiny_model):
    import transformers as tf

    hf = tf.OPTForCausalLM(tf.OPTConfig(vocab_size=97, hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                                        num_attention_heads=2, word_embed_proj_dim=16))
    hf.save_pretrained(tmp_path)
    tiny_model.tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="LlamaForCausalLM"):
        load_hf_folder(tmp_path)


@pytest.mark.parametrize("name", known_models())
def test_every_constant_file_defines_required_names(name):
    module = load_model_constants(name)
    for key, kind in MODEL_NAMES.items():
        assert isinstance(getattr(module, key), kind), key
    assert module.MODEL_LOAD_CONFIG.get("device"), "MODEL_LOAD_CONFIG needs a device"
    resolve_dtype(module.MODEL_LOAD_CONFIG.get("dtype", "float32"))
    assert all(isinstance(h, str) for h in module.HOOK_POINTS) and module.HOOK_POINTS


def test_unknown_model_lists_known_ones():
    with pytest.raises(ValueError, match="smollm2_135m_instruct"):
        load_model_constants("smollm3")


def test_constant_file_with_missing_name_is_rejected(tmp_path):
    path = tmp_path / "mine.py"
    path.write_text("MODEL_NAME = 'x'\nMODEL_SOURCE = 3\n")
    with pytest.raises(ValueError, match="MODEL_SOURCE should be str"):
        load_model_constants(str(path))
    with pytest.raises(ValueError, match="HOOK_POINTS is missing"):
        check_constants(load_model_constants.__globals__["importlib"].import_module("sae_core.models"))


def test_user_constant_file_by_path(tmp_path):
    src = load_model_constants("tiny_random").__file__
    path = tmp_path / "my_tiny.py"
    path.write_text(open(src).read().replace('"d_model": 32', '"d_model": 16'))
    model = load_model(str(path))
    assert model.cfg.d_model == 16


def test_bad_dtype_is_named():
    with pytest.raises(ValueError, match="unknown dtype 'float33'"):
        resolve_dtype("float33")


@pytest.mark.slow
def test_smollm2_logprobs_match_hf(smollm2, smollm2_hf):
    prompts = ["The capital of France is", "def fibonacci(n):\n    return",
               "Once upon a time, in a small village", "2 + 2 ="]
    for prompt in prompts:
        tokens = smollm2.to_tokens(prompt, prepend_bos=False)
        with torch.no_grad():
            ours = smollm2(tokens).log_softmax(-1)
            ref = smollm2_hf(tokens).logits.log_softmax(-1)
        assert (ours - ref).abs().max().item() < 1e-3, prompt


@pytest.mark.slow
def test_smollm2_says_paris(smollm2):
    out = smollm2.generate("The capital of France is", max_new_tokens=8, do_sample=False,
                           prepend_bos=False, verbose=False)
    assert "Paris" in out


@pytest.mark.slow
def test_smollm2_config(smollm2):
    assert (smollm2.cfg.n_layers, smollm2.cfg.d_model, smollm2.cfg.d_vocab) == (30, 576, 49152)
