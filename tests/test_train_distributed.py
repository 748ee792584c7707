"""``torchrun -m zoo train``: 2 CPU processes (gloo) give the weights of 1 process, and resume under 2
processes too (FSDP2: tests/test_fsdp.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import zoo
import zoo.checkpoint as ckpt
from zoo.training import train
from zoo.weights import load_weights

RECIPE = Path(__file__).parent / "recipes" / "tiny_train.yaml"
SETTINGS = ["train.log_every=1", "train.sample_every=0", "train.ckpt_every=0"]


def torchrun(out: Path, steps: int, *extra: str, program: tuple[str, ...] = ("-m", "zoo"),
             check: bool = True, launcher: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node 2 [LAUNCHER] PROGRAM train`` of the tiny recipe (``check``: it must succeed)."""
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *launcher,
            *program, "train", str(RECIPE), "--out", str(out), "--steps", str(steps), "--device", "cpu"]
    for s in SETTINGS:
        argv += ["--set", s]
    tmp = out.parent / "tmp"  # torchrun leaves an empty torchelastic_* folder in $TMPDIR per run
    tmp.mkdir(exist_ok=True)
    proc = subprocess.run([*argv, *extra], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp)})
    assert not check or proc.returncode == 0, proc.stderr[-3000:]
    return proc


def max_diff(a: Path, b: Path, name: str) -> float:
    x, y = load_weights(a / "last" / name), load_weights(b / "last" / name)
    assert x.keys() == y.keys()
    return max((x[k].double() - y[k].double()).abs().max().item() for k in x)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    train(zoo.load_recipe(RECIPE, SETTINGS), out, steps=5, device="cpu", log=lambda *_: None)
    return out


@pytest.mark.slow
def test_two_processes_and_a_resume_give_the_weights_of_one(tmp_path, single):
    out = tmp_path / "ddp"
    stdout = torchrun(out, 3, "--set", "train.grad_accum=2").stdout
    assert "2 processes (gloo)" in stdout and stdout.count("zoo train: run directory") == 1  # rank 0 speaks
    torchrun(out, 5, "--resume", str(out))
    # Same global batch and per-sample draws; only float32 summation order differs (2 x 8 vs 16 samples,
    # gloo's all-reduce), ~1e-7 relative per step on weights of size ~0.1-1.
    for name in ("model.safetensors", "ema.safetensors"):
        assert max_diff(single, out, name) < 1e-5, name
    steps = [json.loads(x)["step"] for x in (out / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]  # one writer
    # `python -m zoo` ends without interpreter teardown: TensorBoard's writer must still have written everything
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4, 5]


SIGNAL_RANK_1 = """
import os, signal, sys
from zoo.cli import main
from zoo.training.ema import EMA
real, calls = EMA.update, []
def update(self):  # rank 1 alone gets the signals during step 3's EMA update, after that step's all-reduce
    calls.append(1)
    if len(calls) == 3 and os.environ.get("RANK") == "1":
        for signum in os.environ["SIGNALS"].split(","):
            os.kill(os.getpid(), int(signum))
    real(self)
EMA.update = update
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("signals", ["15", "2,2"], ids=["sigterm", "ctrl-c-from-terminal-and-torchrun"])
def test_a_signal_to_one_rank_stops_every_rank_after_the_same_step(tmp_path, single, monkeypatch, signals):
    """The stop request rides on the next step's loss all-reduce: rank 0, which got no signal, stops
    after step 4 with rank 1, both save last/ together, and a resume ends with the weights of one process.
    A Ctrl-C reaches a worker twice (the terminal, then torchrun's relay): still one orderly stop."""
    monkeypatch.setenv("SIGNALS", signals)
    script = tmp_path / "signal_rank_1.py"
    script.write_text(SIGNAL_RANK_1)
    out = tmp_path / "ddp"
    proc = torchrun(out, 5, program=(str(script),), check=False)
    assert proc.returncode != 0  # the workers exit 143; torchrun reports them failed
    assert "zoo train: stopping at step 4 (a signal to another rank)" in proc.stdout
    # rank 0's line only, not one per rank; rank 0 got no signal, so it names none (it said SIGTERM, even after a Ctrl-C)
    assert proc.stderr.count("zoo: stopped at step 4: another rank was signalled") == 1
    assert ckpt.load_trainer_state(out / "last")["step"] == 4
    torchrun(out, 5, "--resume", str(out))
    for name in ("model.safetensors", "ema.safetensors"):
        assert max_diff(single, out, name) < 1e-5, name  # as in the test above: float32 summation order only


SIGNAL_RANK_0_IN_ITS_GRID = """
import os, signal, sys
from zoo.cli import main
from zoo.training import loop
real, signalled = loop.Trainer.ema_copy, []
def ema_copy(self):  # rank 0 gets a SIGTERM as it starts step 2's grid (the other rank waits for it)
    model = real(self)
    if self.step == 2 and os.environ["RANK"] == "0" and not signalled:
        signalled.append(1)
        os.kill(os.getpid(), signal.SIGTERM)
    return model
loop.Trainer.ema_copy = ema_copy
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_stop_that_cuts_rank_0s_grid_short_saves_that_step_on_every_rank_and_the_resume_draws_it(tmp_path):
    """Rank 0 alone knows its grid was cut short: every rank stops at that step together (rank 0's word for
    it), so the resume starts there and draws the grid the stop dropped."""
    script = tmp_path / "signal_rank_0_in_its_grid.py"
    script.write_text(SIGNAL_RANK_0_IN_ITS_GRID)
    out, grids = tmp_path / "ddp", ("--set", "train.sample_every=2", "--set", "train.sample_n=4")
    proc = torchrun(out, 5, *grids, program=(str(script),), check=False)
    assert proc.returncode != 0, proc.stderr[-3000:]
    assert "the sample grid of step 2 was cut short by SIGTERM; the run stops now" in proc.stdout
    assert ckpt.load_trainer_state(out / "last")["step"] == 2
    assert not (out / "samples" / "step_0000002.png").exists()
    resumed = torchrun(out, 3, *grids, "--resume", str(out)).stdout
    assert "note: step 2's sample grid was not done before the run stopped" in resumed
    assert (out / "samples" / "step_0000002.png").is_file() and ckpt.load_trainer_state(out / "last")["step"] == 3


KILL_RANK_1_ONCE = """
import os, signal, sys
from zoo.cli import main
from zoo.training.ema import EMA
real, calls = EMA.update, []
def update(self):  # the first attempt's rank 1 dies in step 4, after step 3's checkpoint
    calls.append(1)
    if len(calls) == 4 and os.environ["RANK"] == "1" and os.environ["TORCHELASTIC_RESTART_COUNT"] == "0":
        os.kill(os.getpid(), signal.SIGKILL)
    real(self)
EMA.update = update
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_torchrun_max_restarts_with_resume_auto_continues_after_a_killed_rank(tmp_path, single, parallel):
    """One command line, as on a cluster: a rank dies (OOM killer, lost node), torchrun restarts every
    rank and `--resume auto` continues from last/ (FSDP: from its shards). The restarted ranks used to read
    the dead ones' addresses from torchrun's store and never connected; now the run ends with the weights
    of one process."""
    script = tmp_path / "kill_rank_1_once.py"
    script.write_text(KILL_RANK_1_ONCE)
    out = tmp_path / parallel
    proc = torchrun(out, 5, "--resume", "auto", "--set", "train.ckpt_every=3", "--set", f"train.parallel={parallel}",
                    program=(str(script),), launcher=("--max-restarts", "1"), check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("zoo train: run directory") == 2  # the first attempt and the restart
    assert f"resumed from {out / 'last'} at step 3" in proc.stdout
    steps = [json.loads(x)["step"] for x in (out / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]  # rank 0 may have logged step 4 before its peer died: once
    for name in ("model.safetensors", "ema.safetensors"):
        assert max_diff(single, out, name) < 1e-5, name  # as above: float32 summation order only


FAIL_ON_RANK_1 = """
import os, sys
from zoo.cli import main
from zoo.errors import UserError
import zoo.training.loop as loop
from zoo.training.ema import EMA
if os.environ["FAIL_AT"] == "setup":  # a file only rank 1 cannot read, say
    real_build = loop.build_dataset
    def build_dataset(*args, **kwargs):
        if os.environ.get("RANK") == "1":
            raise UserError("cannot read image /data/x.png: truncated (delete or replace the file)")
        return real_build(*args, **kwargs)
    loop.build_dataset = build_dataset
elif os.environ["FAIL_AT"] == "data":  # an image in rank 1's slice of step 3's batch
    real_batches = loop.batches
    def batches(*args, **kwargs):
        stream = real_batches(*args, **kwargs)
        for n, batch in enumerate(stream):
            if n == 2 and os.environ.get("RANK") == "1":
                raise UserError("cannot read image /data/z.png: truncated", suggestion="delete or replace the file")
            yield batch
    loop.batches = batches
else:  # an image that rank 1 reads at step 2
    real_update, calls = EMA.update, []
    def update(self):
        calls.append(1)
        if len(calls) == 2 and os.environ.get("RANK") == "1":
            raise UserError("cannot read image /data/y.png: truncated (delete or replace the file)")
        real_update(self)
    EMA.update = update
sys.exit(main(sys.argv[1:]))
"""


def _error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    """zoo's error lines from all ranks, in the order printed."""
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("zoo") and "error" in line]


def _fail_on_rank_1(tmp_path: Path, monkeypatch, when: str, steps: int) -> tuple[subprocess.CompletedProcess, list[str]]:
    """2-process ``zoo train`` whose rank 1 alone hits a mistake at ``when`` (setup | step); its error lines."""
    monkeypatch.setenv("FAIL_AT", when)
    script = tmp_path / "fail_on_rank_1.py"
    script.write_text(FAIL_ON_RANK_1)
    proc = torchrun(tmp_path / "run", steps, program=(str(script),), check=False)
    return proc, _error_lines(proc)


def _zoo_frames(proc: subprocess.CompletedProcess) -> list[str]:
    """Traceback lines that point into zoo (a worker's traceback; torchrun's own has none)."""
    return [line for line in proc.stderr.splitlines() if 'File "' in line and f"{os.sep}zoo{os.sep}" in line]


@pytest.mark.slow
@pytest.mark.parametrize("extra, expected", [
    (("--set", "train.batch_size=3"), "train.batch_size 3 is not divisible by 2 processes"),  # in the trainer
    (("--set", "model.depht=3"), "did you mean depth?"),  # before the process group
    (("--set", "train.batch_size=128"), "the dataset has 64 samples, fewer than train.batch_size=128"),  # the data
    # rank 0's work alone: it read 'rank 0: reference file ...', as if one process lacked the file
    (("--set", "train.eval_every=1", "--set", "train.eval_ref=/no/such/ref.npz"),
     "zoo: error: reference file /no/such/ref.npz does not exist"),
])
def test_a_mistake_under_torchrun_is_one_line_from_rank_0(tmp_path, extra, expected):
    proc = torchrun(tmp_path / "run", 2, *extra, check=False)
    errors = _error_lines(proc)
    assert proc.returncode != 0 and len(errors) == 1 and expected in errors[0], proc.stderr[-3000:]
    assert "rank 0" not in errors[0]
    assert not _zoo_frames(proc)


SLOW_RANK_0 = """
import os, sys, time
if os.environ.get("RANK") == "0":
    time.sleep(3)  # rank 0 reaches the recipe's mistake last (a loaded machine)
from zoo.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_mistake_rank_0_reaches_last_is_still_printed(tmp_path):
    """Rank 1 failed first and quietly; torchrun then ended rank 0 before it printed: no message at all."""
    script = tmp_path / "slow_rank_0.py"
    script.write_text(SLOW_RANK_0)
    proc = torchrun(tmp_path / "run", 2, "--set", "model.depht=3", program=(str(script),), check=False)
    errors = _error_lines(proc)
    assert proc.returncode != 0 and len(errors) == 1 and "did you mean depth?" in errors[0], proc.stderr[-3000:]


@pytest.mark.slow
def test_a_mistake_on_one_rank_in_setup_stops_both_with_one_line_naming_the_rank(tmp_path, monkeypatch):
    proc, errors = _fail_on_rank_1(tmp_path, monkeypatch, "setup", steps=3)
    assert errors == ["zoo: error: rank 1: cannot read image /data/x.png: truncated (delete or replace the file)"], \
        proc.stderr[-3000:]
    assert not _zoo_frames(proc)  # torchrun prints its own ChildFailedError traceback; none from zoo


@pytest.mark.slow
def test_a_mistake_on_one_rank_mid_run_is_its_line_and_one_line_from_the_other(tmp_path, monkeypatch):
    proc, errors = _fail_on_rank_1(tmp_path, monkeypatch, "step", steps=4)
    assert proc.returncode != 0 and len(errors) == 2, proc.stderr[-3000:]
    assert "zoo: error: cannot read image /data/y.png: truncated (delete or replace the file)" in errors
    # rank 0 lost its peer in the next all-reduce; torchrun's SIGTERM, when first, is held by the loop until
    # it said so (it used to kill rank 0 silently while the error unwound)
    assert "zoo train: error: rank 0 stopped: another process of the run stopped first (its own message says " \
           "why)" in errors
    assert not _zoo_frames(proc)


KILL_RANK_1 = """
import os, signal, sys
from zoo.cli import main
from zoo.training.ema import EMA
real, calls = EMA.update, []
def update(self):  # rank 1 is killed (the OOM killer) in step 2
    calls.append(1)
    if len(calls) == 2 and os.environ["RANK"] == "1":
        os.kill(os.getpid(), signal.SIGKILL)
    real(self)
EMA.update = update
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_killed_rank_leaves_one_line_from_the_other(tmp_path):
    """The surviving rank's line was lost in 2 of 2 tries: torchrun's SIGTERM killed it mid-unwinding."""
    script = tmp_path / "kill_rank_1.py"
    script.write_text(KILL_RANK_1)
    proc = torchrun(tmp_path / "run", 5, program=(str(script),), check=False)
    assert proc.returncode != 0
    assert _error_lines(proc) == ["zoo train: error: rank 0 stopped: another process of the run stopped first "
                                  "(its own message says why)"], proc.stderr[-3000:]
    assert not _zoo_frames(proc)


@pytest.mark.slow
def test_an_unreadable_image_on_one_rank_keeps_the_steps_before_it(tmp_path, monkeypatch, single):
    """Rank 1 cannot read its slice of step 3: both ranks drop that step together (rank 1 on a stand-in
    batch, so the step's collectives complete), save step 2 as last/, and rank 1 alone says what to fix
    and how to go on. Going on gives the weights of an uninterrupted single process."""
    proc, errors = _fail_on_rank_1(tmp_path, monkeypatch, "data", steps=5)
    out = tmp_path / "run"
    assert proc.returncode != 0 and errors == [
        f"zoo: error: cannot read image /data/z.png: truncated (delete or replace the file; then go on with "
        f"--resume {out})"], proc.stderr[-3000:]
    assert "zoo train: stopping at step 2 (the data could not be read)" in proc.stdout
    assert ckpt.load_trainer_state(out / "last")["step"] == 2
    assert not _zoo_frames(proc)
    torchrun(out, 5, "--resume", str(out))
    for name in ("model.safetensors", "ema.safetensors"):
        assert max_diff(single, out, name) < 1e-5, name  # the dropped step left no trace (summation order only)


@pytest.mark.parametrize("device, expected", [
    ("cuda", "torchrun --nproc_per_node 2: this node has 1 CUDA GPU, and every process runs on a GPU of its own"
             " (use --nproc_per_node 1 (or fewer), or --device cpu)"),
    ("mps", "--device mps: under torchrun zoo runs on CUDA GPUs (NCCL) or on the CPU (gloo) "
            "(use --device cuda or --device cpu)"),
])
def test_a_launch_the_node_cannot_run_is_one_line_before_any_rank_joins(tmp_path, monkeypatch, capsys, device, expected):
    """torchrun --nproc_per_node 2 on a 1-GPU node: rank 1's set_device was a CUDA traceback while rank 0
    waited for it; --device mps under torchrun trained on the CPU without a word."""
    import torch

    from zoo.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    for key, value in {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    assert main(["train", str(RECIPE), "--out", str(tmp_path / "run"), "--device", device]) == 2
    assert capsys.readouterr().err == f"zoo: error: {expected}\n"
    assert not (tmp_path / "run").exists()


def test_each_attempt_on_one_node_has_its_own_keys_in_torchruns_store(monkeypatch):
    """Restarted processes read the dead ones' keys from torchrun's one store. On one node the prefix is
    the agent's restart count; on several nodes the agents' counts differ (an agent whose processes were
    healthy restarts them uncounted: seen with two agents), so there torch's store stays and a note says
    what to set."""
    import torch.distributed as dist

    from zoo.training.distributed import restart_note, restart_safe_store

    agent = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)  # what torchrun's agent serves
    env = {"TORCHELASTIC_USE_AGENT_STORE": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(agent.port),
           "TORCHELASTIC_RESTART_COUNT": "1", "TORCHELASTIC_MAX_RESTARTS": "3", "GROUP_WORLD_SIZE": "1",
           "WORLD_SIZE": "2"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    restart_safe_store().set("rank_1", "10.0.0.2:4242")
    assert agent.get("zoo/restart_1/rank_1") == b"10.0.0.2:4242" and not agent.check(["rank_1"])
    assert restart_note() is None
    monkeypatch.setenv("GROUP_WORLD_SIZE", "2")  # two nodes
    assert restart_safe_store() is None
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in restart_note()
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")  # what that setting gives: a fresh store per attempt
    assert restart_safe_store() is None and restart_note() is None
