"""Held-out explained variance of a trained SAE by document length, on the run's own held-out split.

    python -m bench.heldout_mix [model] [section.key=value ...]     # after `make demo`

The held-out split (``sae/<hook>/split.json``) draws documents uniformly, so on the mixed corpus almost
all of them are short (fortunes), while training draws windows in proportion to document length and
spends most of its tokens in long documents. This scores the run's SAE (first hook point) on both
kinds apart: every ``max_text_length - 1``-token window of each short held-out document, and
``--long-windows`` random windows of each long one (more than ``--long-tokens`` tokens), each with
BOS first (not scored), float32 forward to the hook. Scores as ``bench.lr_sweep.held_out_scores``
(EV against the mean of those rows). Writes ``bench/results/heldout_mix.json``.
"""

from __future__ import annotations

import argparse
import random
import sys
import time

import torch

from bench.common import write_result
from bench.lr_sweep import held_out_scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", nargs="*", help="model constants and section.key=value overrides (as the scripts)")
    parser.add_argument("--long-tokens", type=int, default=2000, help="a document longer than this is long")
    parser.add_argument("--long-windows", type=int, default=16, help="random windows scored per long document")
    args = parser.parse_args()
    if args.long_tokens <= 0 or args.long_windows <= 0:
        raise SystemExit(f"--long-tokens ({args.long_tokens}) and --long-windows ({args.long_windows}) must be positive")
    from sae_core import pipeline
    from sae_core.files import read_json
    from sae_core.hooks import stop_layer_for

    began = time.perf_counter()
    run = pipeline.run_from_argv(args.run)
    out, hook = pipeline.output_dir(run.name), run.hook_points[0]
    split_path = out / "sae" / hook / "split.json"
    if not split_path.exists():
        raise SystemExit(f"no held-out split at {split_path}: train the run's SAE first (make demo or scripts.train_sae)")
    model, texts = pipeline.load_model_of(run), pipeline.load_texts_of(run)
    sae = pipeline.load_saes(model, run, out, [hook])[hook].sae
    held_out, width, rng = read_json(split_path)["held_out"], run.windows.max_text_length - 1, random.Random(0)
    stop = stop_layer_for([hook], model.cfg.n_layers)
    rows: dict[str, list[torch.Tensor]] = {"short": [], "long": []}
    documents = {"short": 0, "long": 0}
    with torch.no_grad():
        for index in held_out:
            ids = model.tokenizer(texts[index])["input_ids"]
            kind = "long" if len(ids) > args.long_tokens else "short"
            documents[kind] += 1
            windows = [ids[s:s + width] for s in range(0, len(ids), width)]
            for window in windows if kind == "short" else rng.sample(windows, min(args.long_windows, len(windows))):
                tokens = torch.tensor([[model.tokenizer.bos_token_id, *window]], device=run.device)
                _, cache = model.run_with_cache(tokens, names_filter=[hook], stop_at_layer=stop)
                rows[kind].append(cache[hook][0, 1:].float().cpu())
    scores = {kind: {"documents": documents[kind], "rows": sum(len(r) for r in parts),
                     **(held_out_scores(sae, torch.cat(parts)) if parts else {})} for kind, parts in rows.items()}
    pooled = torch.cat(rows["short"] + rows["long"])
    scores["pooled"] = {"documents": len(held_out), "rows": len(pooled), **held_out_scores(sae, pooled)}
    record = {"model": run.model_name, "hook": hook, "split": str(split_path.relative_to(out.parent)), "long_tokens": args.long_tokens,
              "long_windows": args.long_windows, "command": " ".join(sys.argv), "scores": scores,
              "wall_seconds": time.perf_counter() - began}
    path = write_result("heldout_mix", record)
    for kind, score in scores.items():
        print(f"{kind}: {score['documents']} documents, {score['rows']:,} rows, EV {score.get('explained_variance', float('nan')):.3f}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
