"""Multi-process runs: a 2-process gloo group on 127.0.0.1 (the torchrun environment variables set by
hand) runs the camera and memory transformers sequence-parallel, with and without FSDP2-sharded
weights, and must reproduce the single-process output (float32, atol 1e-5).

The CLI under a real ``torchrun`` (2 CPU processes, gloo, loopback) on tiny checkpoints in the
models-folder layout: ``--sp 2`` camera-control over every example image scene and multi-traj over
every reconstruction scene (fresh with FSDP2-sharded weights, then resumed from a partial output
folder) give the single-process CLI's frames (float frames within 1e-5, identical on the ranks of
a group; see each test for the MP4 comparison), write one copy of the outputs (the same file
list, every video of the non-writer rank under the temp dir, no scratch folder left there);
``--sp 1`` spreads the scenes so each is run by exactly one rank, with bit-identical MP4s.
Every torchrun is bounded by a timeout and killed (whole process group) on failure."""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from conftest import REPO, TESTS, example_dirs
from worldstereo_core import distributed
from worldstereo_core.runtime import parallel
from worldstereo_core.runtime.parallel import DistContext, split_work
from worldstereo_core.errors import InputError

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
    from worldstereo_core.loading import load_state_dict_strict
    from worldstereo_core.models import build_transformer

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
    ctx = parallel.init_distributed()
    assert ctx.world_size == WORLD and ctx.sp_size == WORLD and ctx.backend == "gloo"
    out = {}
    try:
        for i, (model_type, overrides, shard) in enumerate(CASES):
            model, inputs = _tiny(model_type, overrides)
            with torch.inference_mode():
                single = model(**inputs, return_dict=False)[0]  # before any parallelism: the reference
            lengths = []
            model.blocks[1].register_forward_pre_hook(lambda m, a: lengths.append(a[0].shape[1]))
            parallel.enable_sequence_parallel(model, ctx)
            processors = [p for p in parallel._attention_processors(model)]
            if shard:
                parallel.shard_weights(model, ctx)
            with torch.inference_mode():
                split = model(**inputs, return_dict=False)[0]
            local = model.blocks[0].attn1.to_q.weight
            out[i] = {
                "max_diff": (split - single).abs().max().item(),
                "tokens_in_block1": lengths[0], "tokens": inputs["hidden_states"].shape[2] * 6,
                "all_parallel": all(p._parallel_config is ctx.parallel_config for p in processors),
                "local_weight_rows": local.to_local().shape[0] if shard else local.shape[0],
                "weight_rows": model.config.num_attention_heads * model.config.attention_head_dim,
            }
    finally:
        parallel.shutdown()
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
        ctx = parallel.init_distributed()
        assert (ctx.world_size, ctx.rank, ctx.sp_size, ctx.mesh) == (1, 0, 1, None)
        assert parallel.current() is ctx
        with pytest.raises(InputError, match="torchrun"):
            parallel.enable_sequence_parallel(torch.nn.Linear(1, 1), ctx)
        with pytest.raises(InputError, match="divide"):
            parallel.init_distributed(sp_size=3)
    finally:
        parallel.shutdown()
    assert parallel.current() is None

    model, _ = _tiny("worldstereo-camera", {})
    fake = DistContext(world_size=3, sp_size=3, parallel_config=object())
    with pytest.raises(InputError, match="heads"):
        parallel.enable_sequence_parallel(model, fake)


def test_torchrun_entry_runs_the_cli_with_a_context(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    seen = {}

    def fake_cli(argv):
        seen["argv"], seen["ctx"] = list(argv), parallel.current()
        return 0

    import worldstereo_core.cli as cli

    monkeypatch.setattr(cli, "main", fake_cli)
    assert distributed.main(["--sp", "1", "camera-control", "scene", "--out", "o"]) == 0
    assert seen["argv"] == ["camera-control", "scene", "--out", "o"] and seen["ctx"].sp_size == 1
    assert parallel.current() is None


# ------------------------------------------------------------------------------------------------
# Scratch outputs of non-writer ranks
# ------------------------------------------------------------------------------------------------

def _output_worker(rank: int, port: int, root: str, results) -> None:
    sys.path[:0] = [str(TESTS), str(TESTS.parent)]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank), TMPDIR=str(Path(root) / f"tmp{rank}"))
    import tempfile

    tempfile.tempdir = None  # pick up this process's TMPDIR
    out = Path(root) / "out"
    ctx = parallel.init_distributed()
    seen = {}
    try:
        with parallel.rank_output_dir(out, "scene", ctx, mirror=True) as folder:
            seen["folder"] = str(folder)
            seen["copied"] = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
            (folder / "scene" / "new.txt").write_text(f"rank {rank}")
        seen["left"] = sorted(os.listdir(Path(root) / f"tmp{rank}"))
        if rank == 1:  # the non-writer cannot read the writer's folder: both ranks must raise
            def unreadable(src, dst):
                raise PermissionError(f"cannot read {src}")

            shutil.copytree = unreadable
        try:
            with parallel.rank_output_dir(out, "scene", ctx, mirror=True):
                seen["entered"] = True
        except InputError as exc:
            seen["error"] = str(exc)
    finally:
        parallel.shutdown()
    results[rank] = seen


def test_rank_output_dir_mirrors_the_writer(tmp_path):
    out = tmp_path / "out" / "scene"
    (out / "state").mkdir(parents=True)
    (out / "state" / "state.json").write_text("{}")
    (out / "result.mp4").write_bytes(b"x" * 100)
    for rank in range(WORLD):
        (tmp_path / f"tmp{rank}").mkdir()
    results = mp.get_context("spawn").Manager().dict()
    mp.spawn(_output_worker, args=(_free_port(), str(tmp_path), results), nprocs=WORLD, join=True)
    writer, other = results[0], results[1]
    assert writer["folder"] == str(tmp_path / "out")
    assert Path(other["folder"]).parent == tmp_path / "tmp1"          # scratch under the temp dir ...
    assert other["copied"] == writer["copied"] == ["scene/result.mp4", "scene/state/state.json"]
    assert other["left"] == []                                         # ... deleted afterwards
    assert (out / "new.txt").read_text() == "rank 0"                   # only the writer wrote here
    for r in (writer, other):
        assert "entered" not in r and "filesystem every process sees" in r["error"]


# ------------------------------------------------------------------------------------------------
# The CLI under torchrun
# ------------------------------------------------------------------------------------------------

SIZE = "32x48"
TORCHRUN_TIMEOUT = 240
#: Sequence parallelism reorders float sums (observed |diff| <= 4e-6 on the tiny models' frames in [0, 1]).
FRAME_ATOL = 1e-5
#: Runs the torchrun entry point with every clip's float frames saved as <PROBE_DIR>/rank<R>_<NN>.npy
#: and the path of every video the rank writes listed in <PROBE_DIR>/rank<R>_videos.txt (patched
#: before the tasks import write_video).
PROBE = """
import os, sys
import numpy as np
sys.path.insert(0, {repo!r})
from worldstereo_core import distributed
from worldstereo_core.io import video
from worldstereo_core.tasks import generate

probe, rank = os.environ["PROBE_DIR"], os.environ["RANK"]
real_call, real_write, count = generate.PipelineClipGenerator.__call__, video.write_video, [0]

def call(self, request, progress=None):
    out = real_call(self, request, progress)
    np.save(os.path.join(probe, "rank%s_%02d.npy" % (rank, count[0])), out)
    count[0] += 1
    return out

def write_video(path, *args, **kwargs):
    with open(os.path.join(probe, "rank%s_videos.txt" % rank), "a") as f:
        f.write(os.path.realpath(path) + "\\n")
    return real_write(path, *args, **kwargs)

generate.PipelineClipGenerator.__call__ = call
video.write_video = write_video
raise SystemExit(distributed.main())
"""


@pytest.fixture(scope="module")
def models_root(tmp_path_factory):
    from tiny_models import write_models_root

    return write_models_root(tmp_path_factory.mktemp("models"), ("worldstereo-camera", "worldstereo-memory"))


@pytest.fixture(scope="module")
def image_scenes(tmp_path_factory):
    """Every example image scene (at least two: the first is copied under a second name when alone)
    and a depth file for each."""
    import numpy as np
    from PIL import Image

    found = example_dirs("images")
    if not found:
        pytest.skip("no example image scenes (set WORLDSTEREO_EXAMPLES)")
    root = tmp_path_factory.mktemp("image_scenes")
    sources = [(p, p.name) for p in found] + ([(found[0], found[0].name + "-copy")] if len(found) == 1 else [])
    scenes, depths = [], []
    for src, name in sources:
        scene = shutil.copytree(src, root / "in" / name)
        h, w = np.asarray(Image.open(scene / "image.png")).shape[:2]
        yy, xx = np.mgrid[0:h, 0:w]
        depths.append(root / f"{name}.npy")
        np.save(depths[-1], (2.0 + xx / w + 0.5 * yy / h).astype(np.float32))
        scenes.append(scene)
    return scenes, depths


def _torchrun(sp: int, cli_args, tmp: Path, probe: Path | None = None) -> str:
    """The CLI under torchrun, 2 CPU processes (``-m worldstereo_core.distributed``, or the same entry
    point through :data:`PROBE` saving frames to ``probe``); returns the output, fails on error."""
    tmp.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, TMPDIR=str(tmp), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    if probe is None:
        entry = ["-m", "worldstereo_core.distributed"]
    else:
        probe.mkdir(parents=True)
        script = probe.parent / "probe.py"
        script.write_text(PROBE.format(repo=str(REPO)))
        entry, env["PROBE_DIR"] = [str(script)], str(probe)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(WORLD), "--master-addr",
           "127.0.0.1", "--master-port", str(_free_port()), *entry, "--sp", str(sp), *[str(a) for a in cli_args]]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=TORCHRUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish in {TORCHRUN_TIMEOUT} s:\n{output[-4000:]}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, output[-4000:]
    return output


def _probed(probe: Path, rank: int) -> list:
    import numpy as np

    return [np.load(p) for p in sorted(probe.glob(f"rank{rank}_*.npy"))]


def _assert_only_the_writer_wrote(probe: Path, out: Path, tmp: Path) -> None:
    """Rank 0 wrote its videos under ``out``; rank 1 wrote the same ones, under the temp dir only."""
    writes = {r: (probe / f"rank{r}_videos.txt").read_text().split() for r in range(WORLD)}
    out, tmp = os.path.realpath(out), os.path.realpath(tmp)
    assert writes[0] and all(p.startswith(out + os.sep) for p in writes[0])
    assert len(writes[1]) == len(writes[0]) and all(p.startswith(tmp + os.sep) for p in writes[1])


def _single(cli_args, monkeypatch) -> list:
    """The CLI in this process with one thread (as each torchrun worker); returns the clips' float frames."""
    from worldstereo_core import cli
    from worldstereo_core.tasks import generate

    frames, real, threads = [], generate.PipelineClipGenerator.__call__, torch.get_num_threads()

    def call(self, request, progress=None):
        frames.append(real(self, request, progress))
        return frames[-1]

    with monkeypatch.context() as patch:
        patch.setattr(generate.PipelineClipGenerator, "__call__", call)
        torch.set_num_threads(1)
        try:
            assert cli.main([str(a) for a in cli_args]) == 0
        finally:
            torch.set_num_threads(threads)
    return frames


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def _mp4(folder: Path, name: str):
    from worldstereo_core.io.video import read_video

    return read_video(folder / name)


def _eight_bit(frames):
    from worldstereo_core.io.video import _as_uint8_frames

    return _as_uint8_frames(frames)


def _no_scratch_left(tmp: Path) -> None:
    assert not [p.name for p in tmp.iterdir() if p.name.startswith("worldstereo-rank")]


def _ranks_of(output: str, pattern: str) -> set[int]:
    return {int(m) for m in re.findall(r"\[rank (\d+)/2\] " + pattern, output)}


def test_torchrun_sequence_parallel_camera_control(models_root, image_scenes, tmp_path, monkeypatch):
    """Float frames within FRAME_ATOL of the single-process run and equal on both ranks, so the 8-bit
    frames given to the encoder differ by at most one level, in at most 0.1% of the values; the
    decoded MP4 equal wherever those 8-bit frames are equal (H.264 is deterministic, but one
    flipped level may change its choices)."""
    import numpy as np

    scenes, depths = image_scenes
    common = ["camera-control", *scenes, "--models", models_root, "--size", SIZE, "--steps", 2, "--depth", *depths]
    single = _single([*common, "--out", tmp_path / "single"], monkeypatch)
    output = _torchrun(2, [*common, "--out", tmp_path / "sp2"], tmp_path / "tmp", probe=tmp_path / "probe")
    assert _ranks_of(output, "sequence parallel over 2 processes") == {0, 1}   # both ranks split the sequence
    assert _ranks_of(output, "wrote ") == {0}                                   # only the writer reports files
    assert _ranks_of(output, "group 1 of 1: " + re.escape(", ".join(s.name for s in scenes))) == {0}
    assert _files(tmp_path / "sp2") == _files(tmp_path / "single")              # one copy of every output
    _assert_only_the_writer_wrote(tmp_path / "probe", tmp_path / "sp2", tmp_path / "tmp")
    _no_scratch_left(tmp_path / "tmp")
    rank0, rank1 = _probed(tmp_path / "probe", 0), _probed(tmp_path / "probe", 1)
    assert len(rank0) == len(rank1) == len(single) == len(scenes)
    for scene, a, b, ref in zip(scenes, rank0, rank1, single):
        assert np.array_equal(a, b)                     # the ranks of a group compute the same frames
        assert np.abs(a - ref).max() <= FRAME_ATOL, scene.name
        flipped = _eight_bit(a) != _eight_bit(ref)
        assert flipped.mean() <= 1e-3 and np.abs(_eight_bit(a).astype(int) - _eight_bit(ref)).max() <= 1
        if not flipped.any():
            name = f"{scene.name}/worldstereo-camera_result.mp4"
            assert np.array_equal(_mp4(tmp_path / "sp2", name), _mp4(tmp_path / "single", name))


def test_torchrun_data_parallel_spreads_scenes(models_root, image_scenes, tmp_path, monkeypatch):
    """``--sp 1``: every rank runs whole clips, so each scene's outputs equal the single-process
    run's exactly (same computation, one thread each)."""
    import numpy as np

    scenes, depths = image_scenes
    common = ["camera-control", *scenes, "--models", models_root, "--size", SIZE, "--steps", 2, "--depth", *depths]
    output = _torchrun(1, [*common, "--out", tmp_path / "sp1"], tmp_path / "tmp")
    assert _ranks_of(output, "whole sequence") == {0, 1}
    for index, scene in enumerate(scenes):  # split_work: scene i goes to rank i mod 2, and to no other
        assert _ranks_of(output, r"wrote \S*/" + re.escape(scene.name) + "/") == {index % WORLD}
    _single([*common, "--out", tmp_path / "single"], monkeypatch)
    assert _files(tmp_path / "sp1") == _files(tmp_path / "single")
    for scene in scenes:
        name = f"{scene.name}/worldstereo-camera_result.mp4"
        assert np.array_equal(_mp4(tmp_path / "sp1", name), _mp4(tmp_path / "single", name))


@pytest.mark.parametrize("scene_dir", example_dirs("reconstruction"), ids=lambda p: p.name)
def test_torchrun_sequence_parallel_multi_traj_resumes_in_step(scene_dir, models_root, tmp_path, monkeypatch):
    """A fresh ``--sp 2 ... --shard-weights`` run (memory model, FSDP2-sharded), then a resume from a
    partial folder (no saved state, last result gone): the ranks must read back the same results
    and generate the same clip, in step. The first clip's float frames are within FRAME_ATOL of
    the single-process run's (later clips depend on the MP4s written before them); the regenerated
    clip equals the fresh run's exactly."""
    import numpy as np

    scene = shutil.copytree(scene_dir, tmp_path / "in" / scene_dir.name)
    common = ["multi-traj", scene, "--task", "reconstruction", "--model-type", "worldstereo-memory", "--models",
              models_root, "--size", SIZE, "--steps", 2, "--nframe", 9, "--align-nframe", 4]
    single = _single([*common, "--out", tmp_path / "single"], monkeypatch)
    common.append("--shard-weights")
    output = _torchrun(2, [*common, "--out", tmp_path / "sp2"], tmp_path / "tmp", probe=tmp_path / "probe")
    out = tmp_path / "sp2" / scene.name
    assert _ranks_of(output, "sequence parallel over 2 processes, weights sharded") == {0, 1}
    assert _files(out) == _files(tmp_path / "single" / scene.name)
    _assert_only_the_writer_wrote(tmp_path / "probe", tmp_path / "sp2", tmp_path / "tmp")
    fresh = _probed(tmp_path / "probe", 0)
    assert len(fresh) == len(single) and all(np.array_equal(a, b) for a, b in zip(fresh, _probed(tmp_path / "probe", 1)))
    assert np.abs(fresh[0] - single[0]).max() <= FRAME_ATOL

    results = re.findall(r"\[rank 0/2\] \S+: generated .*-> (\S+)", output)  # in the order of generation
    assert len(results) == len(fresh)
    last = Path(results[-1])
    before = _mp4(last.parent, last.name)
    shutil.rmtree(out / "worldstereo-memory_state")
    last.unlink()
    output = _torchrun(2, [*common, "--out", tmp_path / "sp2"], tmp_path / "tmp", probe=tmp_path / "probe_resume")
    assert len(re.findall(r"\[rank 0/2\] \S+: read back", output)) == len(results) - 1
    assert len(re.findall(r"\[rank 0/2\] \S+: generated", output)) == 1
    again = _probed(tmp_path / "probe_resume", 0)
    assert len(again) == 1 and np.array_equal(again[0], fresh[-1])
    assert np.array_equal(_probed(tmp_path / "probe_resume", 1)[0], again[0])
    assert np.array_equal(_mp4(last.parent, last.name), before)
    assert _files(out) == _files(tmp_path / "single" / scene.name)
    _no_scratch_left(tmp_path / "tmp")
