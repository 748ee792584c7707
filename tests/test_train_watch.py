"""A run people can watch and trust: first lines, progress bar or plain lines, log.jsonl, TensorBoard,
loss.png, and a ``last/`` that survives SIGKILL at any moment (a real ``zoo train`` killed and resumed)."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import zoo
import zoo.checkpoint as ckpt
from zoo.cli import main
from zoo.training import train
from zoo.training.loop import NonFiniteError
from zoo.training.monitor import Monitor

RECIPE = Path(__file__).parent / "recipes" / "tiny_train.yaml"


def test_first_lines_logs_tensorboard_and_loss_plot(tmp_path):
    lines = []
    r = zoo.load_recipe(RECIPE, ["train.sample_every=3", "train.ckpt_every=0", "train.log_every=1"])
    train(r, tmp_path, steps=3, log=lines.append)
    notes = [line for line in lines[5:] if line.startswith("zoo train: note:")]  # e.g. bf16 hardware: machine-dependent
    lines = lines[:5] + lines[5 + len(notes):]
    params = sum(p.numel() for p in zoo.build_model(r).parameters())
    assert lines[0] == f"zoo train: run directory {tmp_path.resolve()}"
    assert f"{params:,} parameters" in lines[1] and "device cpu" in lines[2]
    assert lines[3] == "zoo train: data synthetic:train, 64 images of 3x8x8"
    tb = shlex.quote(str(tmp_path / "tb"))
    assert lines[4].endswith(f"tensorboard --logdir {tb}` (loss.png, log.jsonl, samples/)")
    assert [line.split()[1] for line in lines[5:8]] == ["1", "2", "3"]  # not a TTY: one plain line per record
    records = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in records] == [1, 2, 3] and all(x["loss"] > 0 for x in records)
    assert all(x["grad_norm"] > 0 for x in records) and f"grad {records[0]['grad_norm']:.3g}" in lines[5]
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "samples" / "step_0000003.png").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert [s for s, _ in logged] == [1, 2, 3]
    assert all(abs(v - x["loss"]) < 1e-6 * x["loss"] for (_, v), x in zip(logged, records))


def test_a_recipe_without_a_dataset_says_in_its_first_lines_that_it_trains_on_synthetic_images(tmp_path):
    """`--set data=null` (or a recipe with no data section) trained on synthetic colours without a word."""
    lines = []
    r = zoo.load_recipe(RECIPE, ["data=null", "train.sample_every=0", "train.ckpt_every=0"])
    train(r, tmp_path, steps=1, log=lines.append)
    said = [line for line in lines if line.startswith("zoo train: data ")]
    assert said == ["zoo train: data synthetic:train, 64 images of 3x8x8 (the recipe sets no data.dataset: synthetic "
                    "class-coloured images; set data.dataset and data.root to train on real data)"]


def test_the_tensorboard_command_it_prints_can_be_pasted_into_a_shell(tmp_path):
    """`tensorboard --logdir runs/my run/tb` split at the space: the path is shell-quoted."""
    lines = []
    out = tmp_path / "my run"
    train(zoo.load_recipe(RECIPE, ["train.sample_every=0", "train.ckpt_every=0"]), out, steps=1, log=lines.append)
    watch = next(line for line in lines if "tensorboard --logdir" in line)
    assert f"`tensorboard --logdir '{out / 'tb'}'`" in watch
    assert shlex.split(watch.split("`")[1]) == ["tensorboard", "--logdir", str(out / "tb")]


def test_a_run_directory_that_is_not_utf8_is_refused_before_any_step(tmp_path, capsys):
    """`--out $'runs/r\\xfcn'` trained its steps, then failed in TensorBoard's writer at the first log record
    (a UnicodeEncodeError traceback), with no last/."""
    out = tmp_path / "café" / os.fsdecode(b"r\xfcn")  # only the invalid byte is shown escaped
    assert main(["train", str(RECIPE), "--out", str(out), "--steps", "6", "--set", "train.sample_every=0"]) == 2
    err = capsys.readouterr().err
    assert err == (f"zoo: error: the run directory {tmp_path}/café/r\\xfcn is not a valid UTF-8 path (TensorBoard "
                   "cannot write there) (choose a UTF-8 path for --out)\n")
    assert not (out / "last").exists() and not (out / "log.jsonl").exists()


def test_a_run_that_logs_nothing_does_not_point_at_files_it_never_writes(tmp_path):
    """With train.log_every 0 the first lines still said 'watch with tensorboard (loss.png, log.jsonl)'."""
    lines = []
    r = zoo.load_recipe(RECIPE, ["train.sample_every=0", "train.ckpt_every=0", "train.log_every=0"])
    train(r, tmp_path, steps=1, log=lines.append)
    assert ("zoo train: train.log_every is 0: no losses are logged (log.jsonl, loss.png and TensorBoard hold only "
            "the FDs and validation losses of train.eval_every and val_every, if set)") in lines
    assert not any("tensorboard --logdir" in line for line in lines) and not (tmp_path / "log.jsonl").exists()


def _one_step_lines(out, precision: str) -> list[str]:
    """The lines zoo train prints for a one-step run of the tiny recipe at ``precision``."""
    lines = []
    r = zoo.load_recipe(RECIPE, ["train.ckpt_every=0", "train.sample_every=0", f"train.precision={precision}"])
    train(r, out, steps=1, log=lines.append)
    return lines


@pytest.mark.parametrize("precision,amx_fp16,warned", [("fp16", False, True), ("fp16", True, False),
                                                        ("bf16", False, False)])
def test_fp16_on_a_cpu_without_fp16_hardware_is_named_slow_in_the_first_lines(tmp_path, monkeypatch, precision,
                                                                               amx_fp16, warned):
    """On this kind of CPU fp16 autocast measured 8x slower than fp32 (bf16 was not slower): say so up front."""
    monkeypatch.setattr(torch.cpu, "_is_amx_fp16_supported", lambda: amx_fp16, raising=False)
    note = [line for line in _one_step_lines(tmp_path, precision) if "no fast float16 matmuls" in line]
    assert bool(note) == warned and all("use precision bf16 or fp32" in line for line in note)


@pytest.mark.parametrize("precision,avx512_bf16,amx,noted", [("fp32", True, False, True), ("fp32", False, True, True),
                                                              ("fp32", False, False, False), ("bf16", True, True, False)])
def test_an_fp32_run_on_a_cpu_with_bf16_hardware_is_told_bf16_may_be_faster(tmp_path, monkeypatch, precision,
                                                                             avx512_bf16, amx, noted):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    note = [line for line in _one_step_lines(tmp_path, precision) if "multiplies bfloat16 in hardware" in line]
    assert bool(note) == noted and all("--set train.precision=bf16" in line for line in note)


@pytest.mark.parametrize("ignored", [(), (signal.SIGINT,), (signal.SIGTERM,), (signal.SIGINT, signal.SIGTERM)])
def test_a_run_started_ignoring_a_stop_signal_says_how_to_stop_it(tmp_path, ignored):
    """`zoo train ... &` from a script ignores SIGINT: Ctrl-C and kill -INT did nothing, without a word."""
    # the signals not under test are set to handlers, not inherited: a suite started as a script's background
    # job (or under nohup) ignores SIGINT itself, and the note then rightly appeared in the case without one
    wanted = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
    before = {s: signal.signal(s, signal.SIG_IGN if s in ignored else wanted[s]) for s in wanted}
    try:
        note = [line for line in _one_step_lines(tmp_path, "fp32") if "this process ignores" in line]
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
    if not ignored:
        assert note == []
    elif ignored == (signal.SIGINT,):
        assert note == [f"zoo train: note: this process ignores SIGINT (a background job of a script: Ctrl-C and "
                        f"kill -INT do nothing); stop it with kill -TERM {os.getpid()}, which saves last/ first"]
    elif ignored == (signal.SIGTERM,):
        assert note == [f"zoo train: note: this process ignores SIGTERM (its parent started it so: kill and kill "
                        f"-TERM do nothing); stop it with kill -INT {os.getpid()}, which saves last/ first"]
    else:
        assert len(note) == 1 and "only SIGKILL stops it" in note[0]


def test_logged_speed_leaves_out_the_first_steps_warm_up(tmp_path, monkeypatch):
    """A first compiled step (tens of seconds) made the first record read 0.02 steps/s. Here the first
    step takes 5 s more: a record of it and a later step times the later step only. Counting the 5 s,
    it would read at most 2 steps / 5 s = 0.4 steps/s; without them, a step of this tiny model takes
    milliseconds (0.1 s on a loaded 2-core machine without SIMD kernels), so the bound 0.8 holds
    wherever a step takes under 1.25 s. (It compared the record with the next one's speed, which load
    on the machine alone could put below its 0.4.) A record of the first step alone still times it."""
    from zoo.training.loop import Trainer

    real, calls = Trainer.train_step, []

    def slow_first(self, x, y, **kw):
        calls.append(1)
        if len(calls) == 1:
            time.sleep(5)
        return real(self, x, y, **kw)

    monkeypatch.setattr(Trainer, "train_step", slow_first)
    r = zoo.load_recipe(RECIPE, ["train.sample_every=0", "train.ckpt_every=0", "train.log_every=2"])
    records = train(r, tmp_path / "a", steps=4, log=lambda *_: None)
    assert [x["step"] for x in records] == [2, 4], records
    assert records[0]["steps_per_s"] > 0.8, records
    calls.clear()
    r = zoo.load_recipe(RECIPE, ["train.sample_every=0", "train.ckpt_every=0", "train.log_every=1"])
    records = train(r, tmp_path / "b", steps=2, log=lambda *_: None)
    assert records[0]["steps_per_s"] < 1 / 5, records  # one step, and it was the slow one



@pytest.mark.parametrize("gamma", [None, 1e12, 0.01])
def test_the_unweighted_error_is_logged_beside_a_weighted_loss(tmp_path, gamma):
    """Under Min-SNR (the emoji32 demo's) the loss is weighted; the docs promised that the plain error is
    logged too, and no record had it. ε prediction: the weight min(SNR, γ)/SNR is 1 for a γ above every
    SNR (mse = loss) and below 1 for a small γ (mse > loss); without a weight there is one number only."""
    over = ["train.sample_every=0", "train.ckpt_every=0", "train.log_every=1", "train.batch_size=8"]
    r = zoo.load_recipe(RECIPE, over + ([] if gamma is None else [f"diffusion.min_snr_gamma={gamma}"]))
    train(r, tmp_path, steps=2, log=lambda *_: None)
    records = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    if gamma is None:
        assert all("mse" not in x for x in records)
    elif gamma > 1:  # float32 sums of the same 8 numbers, one of them multiplied by 1.0
        assert all(x["mse"] == pytest.approx(x["loss"], rel=1e-6) for x in records)
    else:
        assert all(x["mse"] > 1.2 * x["loss"] for x in records), records

def test_logged_speed_leaves_out_checkpoints_and_grids(tmp_path, monkeypatch):
    """steps/s is the training speed: a save and a grid of 1.5 s each after every step do not show in it.
    Counted, they would make every record < 1/3 step/s; a step of this tiny model takes milliseconds
    (the first, with its warm-up, up to a second on a loaded machine), so > 0.5 steps/s holds without them."""
    from zoo.training.loop import Trainer

    for name in ("save", "sample_grid"):
        real = getattr(Trainer, name)
        monkeypatch.setattr(Trainer, name, lambda self, *a, _real=real, **k: (time.sleep(1.5), _real(self, *a, **k))[1])
    r = zoo.load_recipe(RECIPE, ["train.sample_every=1", "train.ckpt_every=1", "train.log_every=1"])
    records = train(r, tmp_path, steps=2, log=lambda *_: None)
    assert len(records) == 2 and all(x["steps_per_s"] > 0.5 for x in records), records


def test_a_resume_from_an_earlier_checkpoint_logs_each_step_once(tmp_path):
    """Resuming at step 2 of a run that logged to step 4 (e.g. after a NaN stop): log.jsonl and
    TensorBoard hold steps 1..4 once each, the redone steps with the new run's values."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    base = ["train.sample_every=0", "train.ckpt_every=2", "train.log_every=1", "train.keep_last=0"]
    first = train(zoo.load_recipe(RECIPE, base), tmp_path, steps=4, log=lambda *_: None)
    history = {name: (tmp_path / name).read_bytes() for name in ("log.jsonl", "loss.png")}
    events = sorted(p.name for p in (tmp_path / "tb").iterdir())
    # A resume from step 2 that trains nothing (here --steps 2; or one that fails before its first
    # record) dropped steps 3 and 4 from log.jsonl and TensorBoard all the same.
    train(zoo.load_recipe(RECIPE, base), tmp_path, steps=2, resume=tmp_path / "step_0000002", log=lambda *_: None)
    assert {name: (tmp_path / name).read_bytes() for name in history} == history
    assert sorted(p.name for p in (tmp_path / "tb").iterdir()) == events
    train(zoo.load_recipe(RECIPE, [*base, "train.lr=0.5"]), tmp_path, steps=4, resume=tmp_path / "step_0000002",
          log=lambda *_: None)
    records = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[:2] == first[:2] and records[3]["lr"] > 10 * first[3]["lr"]  # steps 3, 4: the new run's
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("train/lr")]
    assert [step for step, _ in logged] == [1, 2, 3, 4]
    assert all(abs(v - r["lr"]) <= 1e-6 * r["lr"] for (_, v), r in zip(logged, records))  # float32 events


def _tb_steps(run: Path, tag: str = "train/lr") -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    return [e.step for e in events.Scalars(tag)]


def test_the_log_follows_last_not_a_branch_that_never_saved(tmp_path):
    """A resume from step 2 that hit a NaN before saving cut log.jsonl and TensorBoard to steps 1..3
    while last/ still held step 4; one with log_every 0 that did save kept the old branch's 3 and 4."""
    base = ["train.sample_every=0", "train.ckpt_every=2", "train.log_every=1", "train.warmup_steps=0"]
    train(zoo.load_recipe(RECIPE, base), tmp_path, steps=4, log=lambda *_: None)
    log = (tmp_path / "log.jsonl").read_text()
    with pytest.raises(NonFiniteError):  # lr 1e30: step 3 finite, step 4 overflows
        train(zoo.load_recipe(RECIPE, [*base, "train.lr=1e30"]), tmp_path, steps=4,
              resume=tmp_path / "step_0000002", log=lambda *_: None)
    assert (tmp_path / "log.jsonl").read_text() == log and _tb_steps(tmp_path) == [1, 2, 3, 4]
    assert ckpt.load_trainer_state(tmp_path / "last")["step"] == 4
    train(zoo.load_recipe(RECIPE, [*base, "train.log_every=0", "train.lr=0.5"]), tmp_path, steps=4,
          resume=tmp_path / "step_0000002", log=lambda *_: None)  # a new branch 3..4, saved, nothing logged
    assert [json.loads(x)["step"] for x in (tmp_path / "log.jsonl").read_text().splitlines()] == [1, 2]
    assert _tb_steps(tmp_path) == [1, 2]


def test_a_new_event_file_sorts_after_one_written_in_the_same_second(tmp_path):
    """TensorBoard reads event files in name order: a resumed run's file must come after the old one,
    even when both are opened in the same second (a per-process counter 10 sorts before 9)."""
    import time

    (tmp_path / "tb").mkdir()
    old = tmp_path / "tb" / f"events.out.tfevents.{int(time.time())}.zzzz.1.9"  # sorts after any host of this second
    old.write_bytes(b"")
    monitor = Monitor(tmp_path, start=0, total=1, log=lambda *_: None, tty=False)
    monitor.record({"step": 1, "loss": 0.5, "lr": 1e-3, "steps_per_s": 2.0, "images_per_s": 64.0})  # opens tb/
    monitor.close()
    new = [f.name for f in (tmp_path / "tb").iterdir() if f != old]
    assert len(new) == 1 and sorted([old.name, new[0]]) == [old.name, new[0]]


def test_a_full_disk_leaves_no_torn_line_in_log_jsonl_and_names_it(tmp_path):
    """A record cut short by a full disk stayed in log.jsonl, and the next record, appended to it,
    was lost with it; the error named no file."""
    import errno

    monitor = Monitor(tmp_path, start=0, total=2, log=lambda *_: None, tty=False)
    rec = {"step": 1, "loss": 1.0, "lr": 1e-3, "steps_per_s": 1.0, "images_per_s": 16.0}
    monitor.record(rec)
    real = monitor.file

    class Full:  # takes 10 bytes, then the disk is full
        def __init__(self):
            self.taken = False

        def write(self, data):
            if self.taken:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.taken = True
            return real.write(data[:10])

        def __getattr__(self, name):
            return getattr(real, name)

    monitor.file = Full()
    with pytest.raises(OSError) as info:
        monitor.record({**rec, "step": 2})
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(tmp_path / "log.jsonl")
    monitor.file = real
    monitor.close()
    assert [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()] == [rec]


def test_records_a_killed_process_wrote_past_the_newest_checkpoint_go_at_once(tmp_path):
    """Resumed from the newest checkpoint (step 2) after a SIGKILL at step 4, records 3-4 are no
    checkpoint's: they went only at the next save (50000 steps apart in the paper recipes), and until then
    log.jsonl and TensorBoard showed the killed process's records and none of this run's."""
    rec = {"loss": 1.0, "lr": 1e-3, "steps_per_s": 1.0, "images_per_s": 16.0}
    (tmp_path / "log.jsonl").write_text("".join(json.dumps({**rec, "step": s}) + "\n" for s in (1, 2, 3, 4)))
    monitor = Monitor(tmp_path, start=2, total=6, log=lambda *_: None, tty=False)
    assert [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()] == [1, 2]
    monitor.record({**rec, "step": 3, "loss": 0.5})
    assert [(r["step"], r["loss"]) for r in map(json.loads, (tmp_path / "log.jsonl").read_text().splitlines())] == [
        (1, 1.0), (2, 1.0), (3, 0.5)]
    monitor.close()


def test_a_resumed_branch_replaces_the_log_in_one_write(tmp_path, monkeypatch):
    """A resume from step 2 of a 4-step log holds its records back until its first save, then drops
    the old steps 3-4 and writes its own. That was two writes: a kill between them lost the new
    records for good (the save is past them). Appending anything during the swap is now a failure."""
    rec = {"loss": 1.0, "lr": 1e-3, "steps_per_s": 1.0, "images_per_s": 16.0}
    (tmp_path / "log.jsonl").write_text("".join(json.dumps({**rec, "step": s}) + "\n" for s in (1, 2, 3, 4)))
    monitor = Monitor(tmp_path, start=2, total=4, log=lambda *_: None, tty=False, branching=True)
    for step in (3, 4):
        monitor.record({**rec, "step": step, "loss": 0.5})
    assert [r["loss"] for r in map(json.loads, (tmp_path / "log.jsonl").read_text().splitlines())] == [1.0] * 4

    def killed(line):  # the old second write: where a SIGKILL fell
        raise RuntimeError("killed between the two writes")

    monkeypatch.setattr(monitor, "_append", killed)
    monitor.branch_saved()
    monkeypatch.undo()
    logged = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in logged] == [(1, 1.0), (2, 1.0), (3, 0.5), (4, 0.5)]
    monitor.record({**rec, "step": 5, "loss": 0.25})  # appended after the swap, to the new file
    monitor.close()
    assert [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5]


def test_progress_bar_on_a_terminal(tmp_path, capsys):
    monitor = Monitor(tmp_path, start=0, total=4, log=lambda *_: pytest.fail("a TTY gets the bar, not lines"), tty=True)
    for step in (1, 2):
        monitor.advance()
        monitor.record({"step": step, "loss": 0.5, "lr": 1e-3, "steps_per_s": 2.0, "images_per_s": 64.0})
    monitor.close()
    err = capsys.readouterr().err
    assert "2/4" in err and "loss=0.5000" in err and "img_s=64.0" in err  # step, loss, img/s; tqdm adds the ETA
    assert "step       2  loss 0.50000" in err


@pytest.mark.parametrize("stdout_tty, bar", [(True, True), (False, False)])
def test_the_bar_needs_both_streams_on_a_terminal(tmp_path, monkeypatch, stdout_tty, bar):
    """`zoo train ... | tee run.txt` (stderr a terminal, stdout a pipe) drew the bar on stderr and wrote
    every record line there too: none reached the file."""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: stdout_tty)
    lines = []
    monitor = Monitor(tmp_path, start=0, total=2, log=lines.append)
    monitor.record({"step": 1, "loss": 0.5, "lr": 1e-3, "steps_per_s": 2.0, "images_per_s": 64.0})
    monitor.close()
    assert (monitor.bar is not None) == bar and (lines == []) == bar


def _zoo_train(out: Path, *extra: str) -> subprocess.Popen:
    argv = [sys.executable, "-m", "zoo", "train", str(RECIPE), "--out", str(out), "--steps", "100000",
            "--set", "train.ckpt_every=1", "--set", "train.log_every=1", "--set", "train.sample_every=0",
            "--set", "train.keep_last=2", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"zoo train ended early: {proc.stderr.read().decode()}")
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError("timed out")
        time.sleep(0.0005)


def _saving(out: Path) -> bool:
    """A checkpoint directory is being written (its temporary name exists)."""
    return any(out.glob("last.tmp-*")) or any(out.glob("step_*.tmp-*"))


def _saved_step(out: Path) -> int:
    try:
        return int(torch.load(out / "last" / "trainer_state.pt", weights_only=True)["step"])
    except Exception:
        return -1


@pytest.mark.slow
def test_sigkill_at_any_moment_leaves_a_usable_last(tmp_path):
    out = tmp_path / "run"
    moments = [
        lambda: _saving(out),  # in the middle of writing a checkpoint
        lambda: _saved_step(out) >= resumed_from + 3,  # between saves, a few steps after resuming
        lambda: _saving(out) and _saved_step(out) > resumed_from,  # mid-save again
    ]
    resumed_from = 0
    for i, moment in enumerate(moments):
        proc = _zoo_train(out, *(["--resume", str(out)] if i else []))
        if i == 0:
            _wait_for(lambda: _saved_step(out) >= 2, proc)
        _wait_for(moment, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        step = _saved_step(out)
        resumed_from = max(step, 0)
    # A resume repairs whatever the kill interrupted, continues from the newest complete checkpoint and finishes.
    argv = ["train", str(RECIPE), "--out", str(out), "--resume", str(out), "--steps", str(resumed_from + 2),
            "--set", "train.sample_every=0", "--set", "train.ckpt_every=1", "--set", "train.keep_last=2"]
    assert main(argv) == 0
    assert _saved_step(out) == resumed_from + 2
    model, _ = ckpt.load_checkpoint(out / "last", weights="ema")
    assert sum(p.numel() for p in model.parameters()) > 0
    assert main(["sample", str(out / "last"), "--n", "2", "--out", str(tmp_path / "grid.png")]) == 0
    assert main(["sample", str(out), "--n", "2", "--out", str(tmp_path / "run.png")]) == 0  # the run: its last/
    assert (tmp_path / "run.png").read_bytes() == (tmp_path / "grid.png").read_bytes()
    assert not _saving(out)


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130), (signal.SIGHUP, 129),
                                       (signal.SIGUSR1, 138)])
def test_a_signal_to_the_process_group_with_data_workers_still_saves_last(tmp_path, sig, code):
    """A terminal's Ctrl-C, torchrun and SLURM signal the whole process group. The DataLoader
    workers died of it, and the trainer's save on that signal failed ('DataLoader worker exited
    unexpectedly', exit 1): every step since the last checkpoint was lost. A closed terminal's SIGHUP
    and SLURM's --signal=USR1@SECONDS ended the run at once, with no save."""
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "zoo", "train", str(RECIPE), "--out", str(out), "--steps", "100000",
            "--set", "train.ckpt_every=0", "--set", "train.log_every=1", "--set", "train.sample_every=0",
            "--set", "data.num_workers=1"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    _wait_for(lambda: (out / "log.jsonl").is_file() and (out / "log.jsonl").stat().st_size > 0, proc)
    os.killpg(proc.pid, sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err.decode()
    assert torch.load(out / "last" / "trainer_state.pt", weights_only=True)["step"] >= 1
    if sig != signal.SIGINT:
        assert f"zoo: stopped by {signal.Signals(sig).name} at step" in err.decode()


def test_a_rank_stopped_by_another_ranks_signal_does_not_name_a_signal_it_never_got():
    """Rank 0 said 'stopped by SIGTERM' when only rank 1 had been sent a signal (SIGINT, say)."""
    from zoo.training.signals import StopRequested

    assert str(StopRequested(None, 80)) == "stopped at step 80: another rank was signalled"
    assert StopRequested(None, 80).exit_status == 143 and StopRequested(signal.SIGHUP, 3).exit_status == 129
    assert str(StopRequested(signal.SIGUSR1, 3)) == "stopped by SIGUSR1 at step 3"


def test_a_resume_into_a_running_runs_directory_is_refused_before_it_reads_a_checkpoint(tmp_path, monkeypatch,
                                                                                         capsys):
    """The resume read the live run's checkpoints (and repaired its saves) before it asked for the
    lock: while the live run pruned a step directory it named, the refusal was "file not found"."""
    import zoo.training.loop as loop
    from zoo.training.runlock import RunLock

    recipe = zoo.load_recipe(RECIPE, ["train.sample_every=0", "train.log_every=0"])
    train(recipe, tmp_path, steps=1, log=lambda *_: None)
    live = RunLock(tmp_path)
    live.acquire()  # stands in for the live run: a lock taken through another open file
    try:
        monkeypatch.setattr(loop.Trainer, "_load", lambda *a: pytest.fail("read the checkpoint"))
        with pytest.raises(zoo.errors.UserError, match=f"another zoo train \\(pid {os.getpid()}\\) is writing"):
            train(recipe, tmp_path, steps=2, resume=tmp_path, log=lambda *_: None)
        # a new run (no --resume) into it was told "already holds a run: continue it with --resume", which
        # the lock then refused: the live run is what to say
        assert main(["train", str(RECIPE), "--out", str(tmp_path), "--steps", "2"]) == 2
        assert f"another zoo train (pid {os.getpid()}) is writing {tmp_path}" in capsys.readouterr().err
    finally:
        live.release()


def test_a_run_that_ended_while_a_new_one_started_in_its_directory_is_not_replaced(tmp_path):
    """The --out check runs seconds before the lock is taken: a run there without a checkpoint yet that
    finished in between had its last/ replaced and log.jsonl cut by the new run, both exiting 0."""
    from zoo.training import Trainer

    recipe = zoo.load_recipe(RECIPE, ["train.sample_every=0", "train.ckpt_every=0", "train.log_every=1"])
    late = Trainer(recipe, tmp_path, log=lambda *_: None)  # checked and built; not yet locked
    train(recipe, tmp_path, steps=2, log=lambda *_: None)  # meanwhile another run finishes there
    log = (tmp_path / "log.jsonl").read_text()
    try:
        with pytest.raises(zoo.errors.UserError, match=r"now holds a run \(last/\), which ended while this one "
                                                       r"started; .* \(continue it with --resume"):
            late.run(3)
    finally:
        late.close()
    assert (tmp_path / "log.jsonl").read_text() == log
    assert torch.load(tmp_path / "last" / "trainer_state.pt", weights_only=True)["step"] == 2
    train(recipe, tmp_path, steps=3, resume=tmp_path, log=lambda *_: None)  # the lock was given back


@pytest.mark.slow
def test_a_second_run_into_a_running_runs_directory_is_refused(tmp_path, capsys):
    """Two zoo train into one --out (the second with --resume, or both started before either saved)
    both trained and both said done, replacing each other's checkpoints and interleaving log.jsonl."""
    out = tmp_path / "run"
    proc = _zoo_train(out)  # ckpt_every 1: last/ appears after step 1
    try:
        _wait_for(lambda: (out / "last" / "config.json").is_file(), proc)
        code = main(["train", str(RECIPE), "--out", str(out), "--resume", str(out), "--steps", "100000"])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1, err
        assert f"another zoo train (pid {proc.pid}) is writing {out}" in err
    finally:
        proc.kill()
        proc.wait()
    # the lock goes with its process, however it ended: the run resumes now
    assert main(["train", str(RECIPE), "--out", str(out), "--resume", str(out), "--set", "train.sample_every=0"]) == 0


KEEP_TRAINER = """
import sys
import zoo
from zoo.training import Trainer
recipe = zoo.load_recipe(sys.argv[1], ["data.num_workers=1", "train.steps=2", "train.sample_every=0"])
trainer = Trainer(recipe, sys.argv[2], log=lambda *_: None)
trainer.run()
print("trained")
"""


@pytest.mark.slow
def test_a_process_that_keeps_its_trainer_exits(tmp_path):
    """Workers that ignore SIGTERM outlived multiprocessing's exit handler (terminate, then join): a
    script holding its Trainer (or an error's traceback holding the data stream) never exited."""
    script = tmp_path / "keep.py"
    script.write_text(KEEP_TRAINER)
    proc = subprocess.run([sys.executable, str(script), str(RECIPE), str(tmp_path / "run")], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0 and "trained" in proc.stdout, proc.stderr


class _Unreadable(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int):
        raise zoo.errors.UserError(f"cannot read item {i}")


def test_a_worker_error_ends_the_workers_at_once():
    """A data error in a worker stops the run, and its workers end with it: the error's traceback keeps
    the stream alive, and when the garbage collector freed it later its stop could be lost, leaving
    an idle worker that hung the test suite's exit (seen on a loaded machine)."""
    import multiprocessing

    from zoo.training.data import batches

    before = set(multiprocessing.active_children())
    stream = batches(_Unreadable(), 4, seed=0, num_workers=1)
    workers = set(multiprocessing.active_children()) - before
    assert len(workers) == 1
    with pytest.raises(zoo.errors.UserError, match="cannot read item") as caught:
        next(stream)
    assert caught.value is not None  # the traceback, and with it the stream, is still held here
    assert not any(w.is_alive() for w in workers)


LOST_STOP = """
from torch.utils.data import DataLoader, TensorDataset
import torch
from zoo.training.data_workers import ended_at_exit, workers_ignore_stop_signals
loader = DataLoader(TensorDataset(torch.arange(8.0)), batch_size=2, num_workers=1, persistent_workers=True,
                    worker_init_fn=workers_ignore_stop_signals)
it = ended_at_exit(iter(loader))
next(it)
it._index_queues[0]._close()  # the queue's finalizer: the garbage collector runs it first when it frees the iterator in a cycle
it._shutdown_workers()       # so the DataLoader's stop never reaches the worker; its SIGTERM is ignored
print("worker alive:", it._workers[0].is_alive(), flush=True)
"""


SHARER_CUT = """
import sys, threading
sys.path.insert(0, sys.argv[1])
from zoo.training.data_workers import workers_ignore_stop_signals
import resource_sharer  # a file of that name: the frame multiprocessing's fd server raises in
workers_ignore_stop_signals(0)
for work in (resource_sharer.serve, resource_sharer.elsewhere):
    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
"""


@pytest.mark.parametrize("error, message", [("ConnectionResetError(104", "Connection reset by peer"),
                                            ("BrokenPipeError(32", "Broken pipe")], ids=["reset", "broken_pipe"])
def test_a_worker_drops_the_reset_of_a_handle_the_stopped_reader_left_but_no_other_error(tmp_path, error, message):
    """A SIGTERM landing while the main process received a batch's shared-memory handle printed the worker's
    resource_sharer thread's ConnectionResetError traceback between zoo's lines (prepare-latents --workers);
    a reader gone before the sharer wrote to it gives a BrokenPipeError, dropped alike. An error of the same
    type raised elsewhere in a worker's thread is still reported."""
    (tmp_path / "resource_sharer.py").write_text(f"def serve():\n    raise {error}, '{message}')\n")
    (tmp_path / "resource_sharer.py").write_text((tmp_path / "resource_sharer.py").read_text() + "\n".join([
        "import other_place", "elsewhere = other_place.elsewhere", ""]))
    (tmp_path / "other_place.py").write_text(f"def elsewhere():\n    raise {error}, 'not the sharer')\n")
    script = tmp_path / "sharer_cut.py"
    script.write_text(SHARER_CUT)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("Traceback") == 1 and "not the sharer" in proc.stderr, proc.stderr
    assert message not in proc.stderr


@pytest.mark.slow
def test_a_process_whose_worker_missed_its_stop_still_exits(tmp_path):
    """The exit handler kills a worker the DataLoader's own shutdown left alive (its stop lost)."""
    script = tmp_path / "lost_stop.py"
    script.write_text(LOST_STOP)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0 and "worker alive: True" in proc.stdout, proc.stderr


def test_closing_a_trainer_ends_its_data_workers(tmp_path):
    """Trainer.close() (train() calls it) ends the workers while the Trainer is still referenced."""
    from zoo.training import Trainer

    recipe = zoo.load_recipe(RECIPE, ["data.num_workers=1", "train.sample_every=0", "train.ckpt_every=0"])
    trainer = Trainer(recipe, tmp_path / "run", log=lambda *_: None)
    workers = list(trainer.batches.gi_frame.f_locals["it"]._workers)
    trainer.run(1)
    assert all(w.is_alive() for w in workers)  # persistent between run() calls
    trainer.close()
    assert not any(w.is_alive() for w in workers)


@pytest.mark.slow
def test_a_terminal_that_hangs_up_still_gets_last_saved(tmp_path):
    """SIGHUP asked the run to save, but every later write to the closed terminal failed with EIO: the next log
    line ended the run with a traceback, exit 1 and no last/. Run on a pseudo-terminal that is its controlling
    terminal, whose closing sends the hang-up as a real terminal's does."""
    import fcntl
    import pty
    import select
    import termios

    out = tmp_path / "run"
    master, slave = pty.openpty()

    def controlling_terminal() -> None:
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    argv = [sys.executable, "-m", "zoo", "train", str(RECIPE), "--out", str(out), "--steps", "100000",
            "--set", "train.ckpt_every=0", "--set", "train.log_every=1", "--set", "train.sample_every=0"]
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, preexec_fn=controlling_terminal,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    os.close(slave)
    try:
        deadline = time.monotonic() + 120
        while not ((out / "log.jsonl").is_file() and (out / "log.jsonl").stat().st_size > 0):
            assert proc.poll() is None and time.monotonic() < deadline
            if select.select([master], [], [], 0.2)[0]:
                os.read(master, 65536)  # a terminal reads what the run prints
    finally:
        os.close(master)  # the terminal closes: the kernel hangs up the session
    assert proc.wait(timeout=120) == 128 + signal.SIGHUP
    assert torch.load(out / "last" / "trainer_state.pt", weights_only=True)["step"] >= 1


def test_an_unwritable_matplotlib_config_directory_prints_nothing(tmp_path):
    """A read-only HOME: matplotlib's own 'mkdir -p failed' and 'created a temporary cache directory'
    lines appeared among zoo train's (zoo reads no matplotlib configuration; loss.png is drawn anyway)."""
    import subprocess
    import sys

    (tmp_path / "a_file").write_text("")
    env = {**os.environ, "MPLCONFIGDIR": str(tmp_path / "a_file" / "matplotlib")}  # cannot be made
    plain = "import matplotlib; matplotlib.use('Agg'); import matplotlib.pyplot"
    ours = "from zoo.plotting import agg_matplotlib; agg_matplotlib(); import matplotlib.pyplot"
    said = [subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
            for code in (plain, ours)]
    assert "mkdir -p failed" in said[0].stderr  # what the unfiltered import prints there
    assert said[1].returncode == 0 and said[1].stderr == ""
