"""Run SAEDashboard's ``SaeVisRunner`` on given tokens / SAE / features; run in SAEDashboard's own venv.

    .venv-saedashboard/bin/python bench/saedashboard_child.py SPEC.json     # written by bench.bench_browser_peer

Imports nothing from sae_core (its pins differ). The model is SmolLM2 from the float32 HF folder,
converted with TransformerLens 2's own Llama converter (TransformerLens 2 has no SmolLM2 entry),
no weight processing, like ``sae_core.model_loading``; its ``rotary_base`` is set from the config's
``rope_theta`` (TransformerLens 2 leaves it at 10,000, which changes every activation). The layout is
the Neuronpedia runner's (sequences, activation and logit histograms, logit table, feature tables
of 3 rows) with the spec's example counts. The clock starts after the model, SAE and tokens are
loaded and stops when ``SaeVisRunner.run`` returns (all its forwards included). Prints one JSON
line: wall and process CPU seconds and, per feature, the largest activation and its token id in
SAEDashboard's top group.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path


def load_model(folder: str):
    import torch
    from sae_lens import HookedSAETransformer
    from transformer_lens import HookedTransformerConfig
    from transformer_lens.loading_from_pretrained import convert_hf_model_config
    from transformer_lens.pretrained.weight_conversions import convert_llama_weights
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with tempfile.TemporaryDirectory() as tmp:  # a neutral folder name: TransformerLens reads the architecture
        (Path(tmp) / "model").mkdir()
        (Path(tmp) / "model" / "config.json").write_text(hf.config.to_json_string())
        cfg = convert_hf_model_config(str(Path(tmp) / "model"))
    for key in ("tokenizer_name", "quantization_method", "trust_remote_code"):
        cfg.pop(key, None)
    # TransformerLens 2 leaves rotary_base at 10000 for this config; SmolLM2's rope_theta is 100000
    saved = json.loads((Path(folder) / "config.json").read_text())  # written by transformers 5
    cfg["rotary_base"] = float((saved.get("rope_parameters") or {}).get("rope_theta") or saved["rope_theta"])
    cfg.update({"model_name": "smollm2", "original_architecture": "LlamaForCausalLM", "init_weights": False,
                "device": "cpu", "dtype": torch.float32})
    cfg = HookedTransformerConfig(**cfg)
    # the folder's tokenizer_config.json is transformers 5's ("TokenizersBackend"); 4.x reads tokenizer.json
    special = json.loads((Path(folder) / "tokenizer_config.json").read_text())
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(Path(folder) / "tokenizer.json"),
                                        **{k: special[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token")})
    tokenizer_dir = tempfile.mkdtemp(prefix="sd-tokenizer-")  # TransformerLens reloads it by name_or_path
    tokenizer.save_pretrained(tokenizer_dir)
    model = HookedSAETransformer(cfg, tokenizer=AutoTokenizer.from_pretrained(tokenizer_dir), move_to_device=False)
    model.load_and_process_state_dict(convert_llama_weights(hf, cfg), fold_ln=False, center_writing_weights=False,
                                      center_unembed=False, fold_value_biases=False)
    model.eval()
    return model


def main() -> None:
    import torch
    from sae_dashboard.components_config import (
        ActsHistogramConfig,
        FeatureTablesConfig,
        LogitsHistogramConfig,
        LogitsTableConfig,
        SequencesConfig,
    )
    from sae_dashboard.layout import Column, SaeVisLayoutConfig
    from sae_dashboard.sae_vis_data import SaeVisConfig
    from sae_dashboard.sae_vis_runner import SaeVisRunner
    from sae_lens import SAE

    spec = json.loads(Path(sys.argv[1]).read_text())
    torch.set_grad_enabled(False)
    model = load_model(spec["hf_folder"])
    sae = SAE.load_from_disk(spec["sae_folder"], device="cpu")
    tokens = torch.load(spec["tokens"])
    tokenizer = model.tokenizer
    examples = spec["examples"]
    layout = SaeVisLayoutConfig(columns=[Column(
        SequencesConfig(stack_mode="stack-all", buffer=(examples["context"], examples["context"]),
                        compute_buffer=True, n_quantiles=examples["n_quantiles"], top_acts_group_size=examples["top"],
                        quantile_group_size=examples["per_quantile"]),
        ActsHistogramConfig(), LogitsHistogramConfig(), LogitsTableConfig(), FeatureTablesConfig(n_rows=3))])
    config = SaeVisConfig(hook_point=spec["hook"], features=list(range(spec["n_features"])),
                          minibatch_size_features=spec["features_per_batch"],
                          minibatch_size_tokens=spec["prompts_per_forward"], device="cpu", dtype="float32",
                          ignore_tokens={t for t in (tokenizer.pad_token_id, tokenizer.bos_token_id,
                                                     tokenizer.eos_token_id) if t is not None},
                          feature_centric_layout=layout, perform_ablation_experiments=False, verbose=False)
    start, cpu = time.perf_counter(), time.process_time()
    data = SaeVisRunner(config).run(encoder=sae, model=model, tokens=tokens)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    top = {}
    for feature, fd in data.feature_data_dict.items():
        group = fd.sequence_data.seq_group_data[0] if fd.sequence_data.seq_group_data else None
        if group is None or not group.seq_data:
            top[feature] = None
            continue
        seq = group.seq_data[0]
        best = max(range(len(seq.feat_acts)), key=lambda i: seq.feat_acts[i])
        top[feature] = [float(seq.feat_acts[best]), int(seq.token_ids[best])]
    n_examples = {len(g.seq_data) for fd in data.feature_data_dict.values() for g in fd.sequence_data.seq_group_data[:1]}
    print(json.dumps({"seconds": round(seconds, 2), "cpu_seconds": round(cpu_seconds, 2),
                      "top_group_sizes": sorted(n_examples), "top": top}))


if __name__ == "__main__":
    main()
