"""Multi-process runs: a 2-process gloo group on 127.0.0.1 (the torchrun environment variables set by
hand) runs the camera and memory transformers sequence-parallel, with and without FSDP2-sharded
weights, and must reproduce the single-process output (float32, atol 1e-5)."""
from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from worldstereo_core import distributed
from worldstereo_core.distributed import DistContext, split_work
from worldstereo_core.errors import InputError

TESTS = Path(__file__).resolve().parent
WORLD = 2
#: (model type, ControlNet overrides, shard weights): every model kind, FSDP on two of them.
CASES = [("worldstereo-camera", {}, False), ("worldstereo-camera", {}, True),
         ("worldstereo-memory", {}, True), ("worldstereo-memory", {"update_ref": False}, False)]
ATOL = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny(model_type, overrides):
    from tiny_checkpoints import random_state_dict, tiny_controlnet_cfg, tiny_inputs, tiny_transformer_config
    from worldstereo_core.models import build_transformer, load_state_dict_strict

    tcfg = tiny_transformer_config()
    ccfg = tiny_controlnet_cfg(model_type, tcfg, **overrides)
    model = build_transformer(tcfg, ccfg, memory=model_type != "worldstereo-camera", device="meta",
                              dtype=torch.float32)
    load_state_dict_strict(model, random_state_dict(model_type, tcfg, ccfg, seed=7), source="random")
    # 3 frames x 2 x 3 tokens = 18 video tokens and 2 references x 6 tokens: both split in two
    return model.eval(), tiny_inputs(model_type, tcfg, ccfg, frames=3, height=4, width=6, ref_index=(1, 0),
                                     batch=2, seed=8)


def _worker(rank: int, port: int, results) -> None:
    sys.path[:0] = [str(TESTS), str(TESTS.parent)]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    ctx = distributed.init_distributed()
    assert ctx.world_size == WORLD and ctx.sp_size == WORLD and ctx.backend == "gloo"
    out = {}
    try:
        for i, (model_type, overrides, shard) in enumerate(CASES):
            model, inputs = _tiny(model_type, overrides)
            with torch.inference_mode():
                single = model(**inputs, return_dict=False)[0]  # before any parallelism: the reference
            lengths = []
            model.blocks[1].register_forward_pre_hook(lambda m, a: lengths.append(a[0].shape[1]))
            distributed.enable_sequence_parallel(model, ctx)
            processors = [p for p in distributed._attention_processors(model)]
            if shard:
                distributed.shard_weights(model, ctx)
            with torch.inference_mode():
                parallel = model(**inputs, return_dict=False)[0]
            local = model.blocks[0].attn1.to_q.weight
            out[i] = {
                "max_diff": (parallel - single).abs().max().item(),
                "tokens_in_block1": lengths[0], "tokens": inputs["hidden_states"].shape[2] * 6,
                "all_parallel": all(p._parallel_config is ctx.parallel_config for p in processors),
                "local_weight_rows": local.to_local().shape[0] if shard else local.shape[0],
                "weight_rows": model.config.num_attention_heads * model.config.attention_head_dim,
            }
    finally:
        distributed.shutdown()
    results[rank] = out


@pytest.fixture(scope="module")
def parallel_results():
    manager = mp.get_context("spawn").Manager()
    results = manager.dict()
    mp.spawn(_worker, args=(_free_port(), results), nprocs=WORLD, join=True)
    return {rank: dict(v) for rank, v in results.items()}


@pytest.mark.parametrize("index", range(len(CASES)),
                         ids=[f"{t.split('-', 1)[1]}{'_noupdate' if o else ''}{'_fsdp' if s else ''}"
                              for t, o, s in CASES])
def test_sequence_parallel_matches_single_process(parallel_results, index):
    for rank in range(WORLD):
        r = parallel_results[rank][index]
        assert r["max_diff"] <= ATOL, f"rank {rank}: max |diff| {r['max_diff']:.3g}"
        assert r["tokens_in_block1"] * WORLD == r["tokens"]   # each rank holds its chunk of the sequence
        assert r["all_parallel"]                               # every attention runs Ulysses all-to-all
        shard = CASES[index][2]
        assert r["local_weight_rows"] * (WORLD if shard else 1) == r["weight_rows"]


def test_split_work_covers_every_item_once():
    items = list(range(7))
    for world, sp in ((1, 1), (4, 1), (4, 2), (6, 3)):
        seen = []
        for rank in range(world):
            ctx = DistContext(rank=rank, world_size=world, sp_size=sp)
            mine = split_work(items, ctx)
            if ctx.sp_rank:  # the ranks of one group work on the same items
                assert mine == split_work(items, DistContext(rank=rank - ctx.sp_rank, world_size=world, sp_size=sp))
            else:
                seen += mine
        assert sorted(seen) == items
        assert sum(DistContext(rank=r, world_size=world, sp_size=sp).is_writer for r in range(world)) == world // sp


def test_single_process_context_and_errors(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    try:
        ctx = distributed.init_distributed()
        assert (ctx.world_size, ctx.rank, ctx.sp_size, ctx.mesh) == (1, 0, 1, None)
        assert distributed.current() is ctx
        with pytest.raises(InputError, match="torchrun"):
            distributed.enable_sequence_parallel(torch.nn.Linear(1, 1), ctx)
        with pytest.raises(InputError, match="divide"):
            distributed.init_distributed(sp_size=3)
    finally:
        distributed.shutdown()
    assert distributed.current() is None

    model, _ = _tiny("worldstereo-camera", {})
    fake = DistContext(world_size=3, sp_size=3, parallel_config=object())
    with pytest.raises(InputError, match="heads"):
        distributed.enable_sequence_parallel(model, fake)


def test_torchrun_entry_runs_the_cli_with_a_context(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    seen = {}

    def fake_cli(argv):
        seen["argv"], seen["ctx"] = list(argv), distributed.current()
        return 0

    import worldstereo_core.cli as cli

    monkeypatch.setattr(cli, "main", fake_cli)
    assert distributed.main(["--sp", "1", "camera-control", "scene", "--out", "o"]) == 0
    assert seen["argv"] == ["camera-control", "scene", "--out", "o"] and seen["ctx"].sp_size == 1
    assert distributed.current() is None
