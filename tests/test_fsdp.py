"""``train.parallel: fsdp`` on 2 CPU processes (gloo): a resume from a one-process checkpoint,
sharded checkpoints written with torch.distributed.checkpoint, which a SIGKILL mid-save leaves
loadable, a resume from them that continues the uninterrupted run exactly, consolidated weights
equal to one process's, and the shards resumed on one process and under DDP; a one-process
checkpoint at step 0 resumed under FSDP, and one this recipe groups differently (refused)."""

import io
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train_distributed import (RECIPE, SETTINGS, _error_lines, _zoo_frames, max_diff,  # noqa: F401 - single: fixture
                                    single, torchrun)

import zoo
import zoo.checkpoint as ckpt
from zoo.errors import UserError
from zoo.training import train
from zoo.training.fsdp_checkpoint import shard_reader, is_sharded

FSDP = ("--set", "train.parallel=fsdp")
WEIGHTS = ("model.safetensors", "ema.safetensors")

# Rank 0 SIGKILLs itself when its second save of last/ reaches the seal: every rank's shards and
# the consolidated files are written into last.tmp-*, config.json is not.
KILL_AT_SEAL = """
import os, signal, sys
from zoo import atomic
from zoo.cli import main
seals = []
def stop(step, path):
    if step == "seal" and path.name.startswith("last.tmp-") and os.environ.get("RANK") == "0":
        seals.append(path)
        if len(seals) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
atomic._reached = stop
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def start(tmp_path_factory) -> Path:
    """Two steps on one process: an ordinary (consolidated) checkpoint at step 2."""
    out = tmp_path_factory.mktemp("start")
    train(zoo.load_recipe(RECIPE, SETTINGS), out, steps=2, device="cpu", log=lambda *_: None)
    return out


@pytest.fixture(scope="module")
def whole(tmp_path_factory, start) -> Path:
    """``start`` resumed under 2-process FSDP to step 5 without interruption; checkpoints at 4 and 5,
    EMA sample grids at steps 4 and 5 (drawn by rank 0 while the others wait: they must not change the run)."""
    out = tmp_path_factory.mktemp("fsdp")
    every = ("--set", "train.ckpt_every=2", "--set", "train.sample_every=2")
    stdout = torchrun(out, 5, *FSDP, *every, "--resume", str(start)).stdout
    assert "2 processes (gloo)" in stdout and stdout.count("zoo train: run directory") == 1
    return out


@pytest.mark.slow
def test_fsdp_writes_shards_and_the_consolidated_weights_of_one_process(whole, single):
    last = whole / "last"
    assert is_sharded(last) and sorted(p.name for p in last.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert ckpt.is_checkpoint(last)  # shards count as zoo's files: the next save may replace it
    state = ckpt.load_trainer_state(last)
    assert state["step"] == 5 and state["sharded_optimizer"] and "optimizer" not in state  # moments: in the shards
    # Steps 3-5 re-shard a one-process checkpoint (weights, EMA, full AdamW state) onto FSDP.
    # Same global batch and per-sample draws as one process; only float32 summation order differs
    # (FSDP's reduce-scatter of two 8-sample sums vs one 16-sample sum), ~1e-7 relative per step on
    # weights of size ~0.1-1, so 5 steps stay far below 1e-5.
    for name in WEIGHTS:
        assert max_diff(single, whole, name) < 1e-5, name
    model, _ = ckpt.load_checkpoint(last, weights="ema")  # zoo sample's path: a plain, unsharded model
    assert not any(hasattr(p, "device_mesh") for p in model.parameters())


@pytest.mark.slow
def test_fsdp_sample_grid_is_the_grid_of_the_consolidated_ema(tmp_path, whole):
    from PIL import Image

    from zoo.sample import SampleRequest, sample_latents, save_grid, to_images

    grids = sorted((whole / "samples").glob("*.png"))
    assert [g.name for g in grids] == ["step_0000004.png", "step_0000005.png"]  # every 2 steps, and the last
    grid = grids[0]
    model, recipe = ckpt.load_checkpoint(whole / "step_0000004", weights="ema")
    x, _ = sample_latents(model, recipe, SampleRequest(n=recipe["train"]["sample_n"], seed=0), device="cpu")
    again = save_grid(to_images(x, recipe, None, device="cpu"), tmp_path / "grid.png")
    # The same weights (gathered from all ranks' shards) through the same CPU sampler: identical pixels.
    assert np.array_equal(np.asarray(Image.open(grid)), np.asarray(Image.open(again)))


@pytest.mark.slow
def test_a_kill_mid_save_leaves_last_loadable_and_the_resume_equals_the_uninterrupted_run(tmp_path, start, whole):
    out = tmp_path / "killed"
    script = tmp_path / "kill_at_seal.py"
    script.write_text(KILL_AT_SEAL)
    every = ("--set", "train.ckpt_every=1")
    proc = torchrun(out, 5, *FSDP, *every, "--resume", str(start), program=(str(script),), check=False)
    assert proc.returncode != 0
    left = list(out.glob("last.tmp-*"))
    assert len(left) == 1, f"the kill did not land in the step-4 save of last/: {left}\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
    (unsealed,) = left  # the step-4 save of last/: shards written, never sealed
    assert (unsealed / "__1_0.distcp").is_file() and not (unsealed / "config.json").exists()
    assert ckpt.load_trainer_state(out / "last")["step"] == 3  # repaired on read: the step-3 last/ stands
    assert not list(out.glob("last.tmp-*"))
    torchrun(out, 5, *FSDP, *every, "--resume", str(out))  # from the shards; replaces the killed run's step_0000004/
    # The resumed run repeats the uninterrupted run's operations on the same values: the shards hold
    # the fp32 weights, EMA and AdamW moments bit for bit, the processes and reduction order are the same
    # (checkpoints are read-only snapshots: saving every step or every other changes no number).
    for name in WEIGHTS:
        assert max_diff(whole, out, name) == 0.0, name
    assert ckpt.load_trainer_state(out / "last")["step"] == 5


@pytest.mark.slow
def test_two_process_shards_resume_on_one_process(tmp_path, whole, single):
    out = tmp_path / "one"
    recipe = zoo.load_recipe(RECIPE, [*SETTINGS, "train.parallel=fsdp"])
    train(recipe, out, steps=5, device="cpu", resume=whole / "step_0000004", log=lambda *_: None)
    # The 2-process shards, read whole onto one process; the tolerance of the 1-vs-2-process comparison above.
    for name in WEIGHTS:
        assert max_diff(single, out, name) < 1e-5, name
    assert not is_sharded(out / "last")  # one process writes the ordinary consolidated checkpoint


@pytest.mark.slow
def test_fsdp_shards_resume_under_ddp(tmp_path, whole, single):
    out = tmp_path / "ddp"
    torchrun(out, 5, "--set", "train.parallel=ddp", "--resume", str(whole / "step_0000004"))
    # Every DDP rank reads the whole tensors from the 2 FSDP shards; tolerance as for 1 vs 2 processes above.
    for name in WEIGHTS:
        assert max_diff(single, out, name) < 1e-5, name
    assert not is_sharded(out / "last")


@pytest.mark.slow
def test_a_step_0_checkpoint_resumed_under_fsdp_trains_as_one_process(tmp_path, single):
    """A step-0 checkpoint holds no AdamW moments: the FSDP resume starts them fresh, as one process does
    (not from a state made by a zero-gradient step, whose step count would shift every bias correction)."""
    zero = tmp_path / "zero"
    train(zoo.load_recipe(RECIPE, SETTINGS), zero, steps=0, device="cpu", log=lambda *_: None)
    out = tmp_path / "fsdp"
    torchrun(out, 5, *FSDP, "--resume", str(zero))
    for name in WEIGHTS:  # tolerance of the 1-vs-2-process comparisons above
        assert max_diff(single, out, name) < 1e-5, name


@pytest.mark.slow
def test_a_consolidated_checkpoint_grouped_otherwise_is_refused_under_fsdp_in_one_line(tmp_path, start):
    proc = torchrun(tmp_path / "run", 3, *FSDP, "--set", "train.no_weight_decay_1d=true", "--resume", str(start),
                    check=False)
    errors = _error_lines(proc)
    assert proc.returncode != 0 and len(errors) == 1, proc.stderr[-3000:]
    assert "train.no_weight_decay_1d differs from the checkpoint's" in errors[0]
    assert not _zoo_frames(proc)


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_shard_index_that_would_run_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".metadata").write_bytes(pickle.dumps(_Payload()))
    with pytest.raises(UserError, match="not part of a checkpoint index"):
        shard_reader(tmp_path).read_metadata()
    assert not (tmp_path / "pwned").exists()


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_a_shard_index_listing_objects_is_refused(tmp_path):
    """zoo writes only tensors into shards (DCP loads any other object with a full unpickler)."""
    import torch.distributed.checkpoint as dcp

    dcp.save({"w": torch.ones(2), "extra": {"lr": 0.1}}, checkpoint_id=tmp_path)
    with pytest.raises(UserError, match=r"lists objects \(extra"):
        shard_reader(tmp_path).read_metadata()


@pytest.mark.parametrize("module", ["pathlib", "pathlib._local"])
def test_a_shard_index_pickled_by_any_python_is_read(module):
    """Python 3.13 pickles pathlib's classes as pathlib._local.PosixPath, which the index reader refused
    (every FSDP resume failed on 3.13), and which an older Python cannot import."""
    from zoo.training.fsdp_checkpoint import _MetadataUnpickler

    data = f"c{module}\nPosixPath\n(X".encode() + len(b"ckpt").to_bytes(4, "little") + b"ckptt" + b"R."
    assert _MetadataUnpickler(io.BytesIO(data)).load() == Path("ckpt")
    with pytest.raises(pickle.UnpicklingError, match="os.system is not part of a checkpoint index"):
        _MetadataUnpickler(io.BytesIO(b"cos\nsystem\n(X\x02\x00\x00\x00lst" + b"R.")).load()


TIME_SEEN = """
import sys, torch, zoo
from zoo.training import distributed
ctx = distributed.init("cpu")
model = zoo.build_model(zoo.load_recipe(sys.argv[1], []))
seen = []
model.t_embedder.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
distributed.shard_fsdp(model, "bf16")
t = torch.tensor([997.0, 501.0])
with torch.autocast("cpu", dtype=torch.bfloat16):
    model(torch.randn(2, 3, 8, 8), t, torch.tensor([1, 2]))
if ctx.main:
    print(seen[0].dtype, seen[0].tolist())
distributed.shutdown()
"""


def test_fsdp_bf16_keeps_the_time_input_exact(tmp_path):
    """FSDP2's mixed-precision policy cast every forward input to bf16, the time too: the model trained on
    997 -> 996 and 501 -> 500 (1000 DDPM steps on ~507 values), times sampling never gives it; DDP kept them."""
    import subprocess
    import sys

    script = tmp_path / "time_seen.py"
    script.write_text(TIME_SEEN)
    (tmp_path / "tmp").mkdir()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(RECIPE)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path / "tmp")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "torch.float32 [997.0, 501.0]"
