"""Data-parallel extraction: two CPU ranks (gloo, launched with torchrun) against one process."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from sae_core.store import ActivationRun, save

pytestmark = pytest.mark.slow  # subprocesses (cold interpreters + imports)

HOOK = "blocks.0.hook_resid_post"
SETTINGS = dict(batch_size=4, shard_size=64, max_text_length=24)

RANK_SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path

    import torch.distributed as dist

    from sae_core.corpora import fortunes_corpus
    from sae_core.model_loading import load_model
    from sae_core.store import save

    dist.init_process_group("gloo")
    model = load_model("tiny_random")
    run_id = save(model, "{hook}", fortunes_corpus()[:40], sys.argv[1], progress=False, **{settings})
    if dist.get_rank() == 0:
        Path(sys.argv[2]).write_text(run_id)
    dist.destroy_process_group()
""")


def _by_origin(run: ActivationRun):
    order = np.lexsort((run.position().numpy(), run.doc_index().numpy()))
    return run.doc_index()[order], run.position()[order], run.token_ids()[order], run.activations()[order]


def _torchrun(tmp_path, script):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(tmp_path / "store"), str(tmp_path / "run_id")],
                          env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.dist
def test_two_ranks_union_equals_a_single_process_run(tiny_model, corpus_texts, tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT.format(hook=HOOK, settings=SETTINGS))
    result = _torchrun(tmp_path, script)
    assert result.returncode == 0, result.stderr[-3000:]
    run_id = (tmp_path / "run_id").read_text()
    parallel = ActivationRun.open(tmp_path / "store", run_id)
    single = ActivationRun.open(tmp_path, save(tiny_model, HOOK, list(corpus_texts[:40]), tmp_path,
                                               progress=False, **SETTINGS))
    meta = parallel.meta
    assert meta["complete"] and meta["world_size"] == 2
    assert {r.rank for r in parallel.shards} == {0, 1}
    assert all(r.file.startswith(f"shard-r{r.rank}-") for r in parallel.shards)
    assert [p["rank"] for p in meta["ranks"]] == [0, 1]
    for key in ("sample_count", "row_count", "token_count", "empty_text_count"):
        assert meta[key] == single.meta[key], key
    assert meta["batch_count"] == sum(p["batch_count"] for p in meta["ranks"])
    docs_p, pos_p, ids_p, acts_p = _by_origin(parallel)
    docs_s, pos_s, ids_s, acts_s = _by_origin(single)
    assert torch.equal(docs_p, docs_s) and torch.equal(pos_p, pos_s) and torch.equal(ids_p, ids_s)
    torch.testing.assert_close(acts_p, acts_s, rtol=1e-5, atol=1e-5)  # batch padding differs: float noise only
    for shard in parallel.iter_shards():  # rank r collects documents r, r + 2, ...
        assert set((shard.doc_index % 2).tolist()) == {shard.record.rank}
    parallel.verify()
    # a second launch with the same run id finds every rank complete and changes nothing
    hashes = [r.sha256 for r in parallel.shards]
    script.write_text(RANK_SCRIPT.format(hook=HOOK, settings=SETTINGS).replace(
        "sys.argv[1], progress", f"sys.argv[1], run_id='{run_id}', progress"))
    again = _torchrun(tmp_path, script)
    assert again.returncode == 0, again.stderr[-3000:]
    assert [r.sha256 for r in ActivationRun.open(tmp_path / "store", run_id).shards] == hashes
