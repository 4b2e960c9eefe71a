"""Data-parallel SAE training: 2 gloo ranks on CPU match one process trained on the same rows.

The rows come from a :class:`~sae_core.training.sources.TensorChunkSource` of half-batch chunks with
shuffling off: one process trains on batches ``[c0 | c1], [c2 | c3], ...``; rank 0 reads the even
chunks and rank 1 the odd ones, so each step the two ranks together hold exactly the single
process's batch, and the averaged gradients equal the full-batch gradient up to float32 summation
order. Tolerance: after a few Adam steps the weights agree to ~1e-6; we allow 1e-4 absolute.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.multiprocessing as mp
from sae_lens import SAE

from sae_core.config import TrainingConfig, build_flat
from sae_core.training import train_saes
from sae_core.training.sources import TensorChunkSource

pytestmark = [pytest.mark.dist, pytest.mark.slow]  # subprocesses (cold interpreters + imports)

HOOK = "blocks.0.hook_resid_post"
BATCH = 128


def _chunks() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    features = torch.nn.functional.normalize(torch.randn(40, 12, generator=gen), dim=-1)
    codes = (torch.rand(16 * BATCH // 2, 40, generator=gen) < 0.08).float() * (torch.rand(16 * BATCH // 2, 40, generator=gen) + 0.5)
    return list(torch.split(codes @ features + 0.5, BATCH // 2))  # 16 half-batch chunks


def _cfg() -> TrainingConfig:
    return build_flat(TrainingConfig, "training", hook_points=(HOOK,), d_sae=48, k=4, lr=5e-3, total_training_tokens=BATCH * 6,
                          train_batch_size_tokens=BATCH, shuffle_buffer_tokens=0, checkpoint_every_tokens=None,
                          log_every_steps=1, dead_window_tokens=BATCH * 2, sae_dtype="float32")


def _rank_main(rank: int, world: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        chunks = _chunks()
        train_saes(_cfg(), TensorChunkSource(lambda: chunks, [HOOK]), {HOOK: 12}, out)
    finally:
        torch.distributed.destroy_process_group()


def test_two_gloo_ranks_match_one_process(tmp_path, monkeypatch):
    chunks = _chunks()
    single = train_saes(_cfg(), TensorChunkSource(lambda: chunks, [HOOK]), {HOOK: 12}, tmp_path / "single")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # for the spawned ranks only: restored after the test
    mp.spawn(_rank_main, args=(2, str(tmp_path / "init"), str(tmp_path / "ddp")), nprocs=2, join=True)
    one = SAE.load_from_disk(str(tmp_path / "single" / HOOK)).state_dict()
    two = SAE.load_from_disk(str(tmp_path / "ddp" / HOOK)).state_dict()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-4, msg=name)
    curve = single.saes[HOOK].curve
    assert curve[-1]["explained_variance"] > curve[0]["explained_variance"] + 0.02  # it trained
    # the curves (all-reduced metrics, dead-latent counts) agree too
    ddp_curve = json.loads((tmp_path / "ddp" / HOOK / "training_curve.json").read_text())
    for a, b in zip(curve, ddp_curve, strict=True):
        assert a["tokens"] == b["tokens"] and a["dead_fraction"] == b["dead_fraction"]
        assert abs(a["loss"] - b["loss"]) <= 1e-4 * max(1.0, abs(a["loss"]))
