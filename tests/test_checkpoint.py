"""Checkpoint directories: round trip, atomic replace, strict loading, tied tensors, trainer state."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from zoo import checkpoint as ckpt
from zoo.errors import UserError
from zoo.weights import key_mismatch, load_state_dict_strict, load_weights, save_weights, weights_on_meta

RECIPE = {
    "model": {"type": "dit", "input_size": 8, "patch_size": 2, "in_channels": 4, "hidden_size": 32,
              "depth": 2, "num_heads": 2, "num_classes": 10},
    "train": {"steps": 10, "batch_size": 2, "lr": 1e-4, "ckpt_every": 0, "sample_every": 0, "log_every": 0},
}  # fmt: skip


def _model() -> nn.Module:
    import zoo

    model = zoo.build_model(RECIPE)
    for p in model.parameters():
        if p.requires_grad:
            nn.init.normal_(p, std=0.05)  # non-zero everywhere, so a lost tensor shows
    return model


def test_round_trip_with_ema_and_trainer_state(tmp_path):
    model, ema = _model(), _model()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model(*model.example_inputs(2)).sum().backward()
    opt.step()
    state = {"step": 7, "optimizer": opt.state_dict(), "rng": torch.get_rng_state(), "history": [1.0, 0.5]}
    out = ckpt.save_checkpoint(tmp_path / "run" / "last", model, RECIPE, ema=ema, state=state)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "ema.safetensors", "model.safetensors", "trainer_state.pt"]
    payload = json.loads((out / "config.json").read_text())
    assert payload["recipe"] == RECIPE and payload["versions"]["torch"] == torch.__version__ and "zoo" in payload["versions"]
    assert "classes" not in payload and ckpt.read_classes(out) == []  # none given: unknown, not an empty list stored
    named = ckpt.save_checkpoint(tmp_path / "named", model, RECIPE, classes=("n01", "n02"))
    assert ckpt.read_classes(named) == ["n01", "n02"]

    loaded, config = ckpt.load_checkpoint(out)
    assert config == RECIPE
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    loaded_ema, _ = ckpt.load_checkpoint(out, weights="ema")
    assert torch.equal(loaded_ema.blocks[1].attn.qkv.weight, ema.blocks[1].attn.qkv.weight)

    restored = ckpt.load_trainer_state(out)  # weights_only=True inside
    assert restored["step"] == 7 and torch.equal(restored["rng"], state["rng"])
    opt2 = torch.optim.AdamW([p for p in loaded.parameters() if p.requires_grad], lr=1e-4)
    opt2.load_state_dict(restored["optimizer"])
    assert opt2.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]


def test_incomplete_ema_is_an_error(tmp_path):
    model = _model()
    ema = {k: v for k, v in model.state_dict().items() if k != "blocks.0.mlp.fc1.bias"}
    ckpt.save_checkpoint(tmp_path / "c", model, RECIPE, ema=ema)
    with pytest.raises(UserError, match=r"ema.safetensors does not match the model; missing keys: blocks.0.mlp.fc1.bias"):
        ckpt.load_checkpoint(tmp_path / "c", weights="ema")
    with pytest.raises(UserError, match="weights must be"):
        ckpt.load_checkpoint(tmp_path / "c", weights="best")


def test_replace_is_atomic_and_leaves_no_temporaries(tmp_path, monkeypatch):
    model = _model()
    target = tmp_path / "last"
    ckpt.save_checkpoint(target, model, RECIPE, state={"step": 1})
    ckpt.save_checkpoint(target, model, RECIPE, state={"step": 2})
    assert ckpt.load_trainer_state(target)["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_weights", fail)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(target, model, RECIPE, state={"step": 3})
    assert ckpt.load_trainer_state(target)["step"] == 2  # the old checkpoint is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]


def test_trainer_state_must_be_plain(tmp_path):
    with pytest.raises(TypeError, match=r"trainer state\['args'\] is a Namespace"):
        ckpt.save_checkpoint(tmp_path / "c", _model(), RECIPE, state={"step": 1, "args": argparse.Namespace(lr=1)})
    assert not (tmp_path / "c").exists()


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(5, 4)
        self.head = nn.Linear(4, 5, bias=False)
        self.head.weight = self.emb.weight  # tied weights: one tensor, two names
        self.t = nn.Parameter(torch.randn(4, 6).t())  # non-contiguous
        self.register_buffer("part", torch.arange(12.0)[2:8])  # a view into a larger storage


def test_tied_and_non_contiguous_tensors(tmp_path):
    src, dst = Tied(), Tied()
    save_weights(tmp_path / "w.safetensors", src.state_dict())
    state = load_weights(tmp_path / "w.safetensors")
    load_state_dict_strict(dst, state)
    assert torch.equal(dst.emb.weight, src.emb.weight) and dst.head.weight is dst.emb.weight
    assert torch.equal(dst.t, src.t) and torch.equal(dst.part, src.part)


def test_the_same_state_saves_to_the_same_bytes(tmp_path):
    """safetensors wrote __metadata__ in hash-map order, which changes between saves (and processes):
    one state gave two files and two sha256, and zoo eval keys its samples by that sha256."""
    state = Tied().state_dict()
    saved = set()
    for i in range(12):
        save_weights(tmp_path / f"w{i}.safetensors", state)
        saved.add((tmp_path / f"w{i}.safetensors").read_bytes())
    assert len(saved) == 1
    loaded = load_weights(tmp_path / "w0.safetensors")
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "w0.safetensors"), framework="pt") as f:
        assert f.metadata().keys() == {"aliases", "format"} and f.metadata()["format"] == "pt"


def test_a_full_disk_while_saving_is_an_oserror_naming_the_checkpoint_and_keeps_the_old_one(tmp_path, monkeypatch):
    """torch.save to a path reported a full disk as 'unexpected pos' (a RuntimeError, exit 1): the
    trainer state's short write is now an OSError(ENOSPC) naming the checkpoint, which zoo's CLI
    turns into one line; the previous checkpoint stays and no temporary directory is left."""
    import errno
    import io

    class FullAfter(io.FileIO):
        budget = 100  # bytes the disk takes: one short write, then ENOSPC

        def write(self, data):
            if FullAfter.budget <= 0:
                raise OSError(errno.ENOSPC, "No space left on device")
            n = min(len(memoryview(data).cast("B")), FullAfter.budget)
            FullAfter.budget -= n
            return super().write(memoryview(data).cast("B")[:n])

    model = _model()
    ckpt.save_checkpoint(tmp_path / "c", model, RECIPE, state={"step": 1})
    monkeypatch.setattr(ckpt, "open", lambda path, mode, buffering=-1: FullAfter(path, mode.replace("b", "")),
                        raising=False)
    with pytest.raises(OSError) as info:
        ckpt.save_checkpoint(tmp_path / "c", model, RECIPE, state={"step": 2, "big": torch.zeros(1000)})
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(tmp_path / "c")
    assert ckpt.load_trainer_state(tmp_path / "c")["step"] == 1 and [p.name for p in tmp_path.iterdir()] == ["c"]


def test_an_interrupt_inside_the_trainer_states_write_stays_an_interrupt(tmp_path, monkeypatch):
    """torch turns a KeyboardInterrupt raised by its writer into RuntimeError('unexpected pos'): a second Ctrl-C
    landing in the trainer state's write was a traceback and exit 1, not 'stopped at once' (130). It is raised as
    itself, and the previous checkpoint stays."""
    from zoo import atomic
    from zoo.training.signals import Terminated

    model = _model()
    ckpt.save_checkpoint(tmp_path / "c", model, RECIPE, state={"step": 1})
    real = atomic.write_all
    for stop in (KeyboardInterrupt(), Terminated()):
        calls = []

        def interrupted(raw, data):
            calls.append(1)
            if len(calls) == 3:  # mid-file: torch has written its first records
                raise stop
            return real(raw, data)

        monkeypatch.setattr(atomic, "write_all", interrupted)
        with pytest.raises(type(stop)):
            ckpt.save_checkpoint(tmp_path / "c", model, RECIPE, state={"step": 2, "big": torch.zeros(1000)})
        assert len(calls) == 3
        assert ckpt.load_trainer_state(tmp_path / "c")["step"] == 1 and [p.name for p in tmp_path.iterdir()] == ["c"]


def test_strict_loading_names_the_problem(tmp_path):
    model = _model()
    ckpt.save_checkpoint(tmp_path / "c", model, RECIPE)
    other = dict(RECIPE, model=dict(RECIPE["model"], depth=3))
    (tmp_path / "c" / "config.json").write_text(json.dumps({"format": ckpt.FORMAT, "versions": {}, "recipe": other}))
    with pytest.raises(UserError, match=r"missing keys: blocks\.2\.norm1\.linear\.weight"):
        ckpt.load_checkpoint(tmp_path / "c")


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(UserError, match="not a zoo checkpoint"):
        ckpt.load_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(UserError, match="not valid JSON"):
        ckpt.read_config(tmp_path)
    with pytest.raises(UserError, match="no trainer state"):
        ckpt.load_trainer_state(tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        load_weights(tmp_path / "model.safetensors")


# ----------------------------------------------------------------------------- crash safety

from zoo import atomic  # noqa: E402

STEPS = ("fill", "seal", "set-aside", "install", "discard")  # zoo.atomic's protocol, in order
SEALED_AT = STEPS.index("set-aside")  # a stop at or after this step rolls forward to the new checkpoint


def _step_of(directory) -> int:
    return ckpt.load_trainer_state(directory)["step"]


def _names(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def _save_and_stop_at(tmp_path, monkeypatch, stop: str, existing: bool):
    """Save step 2 over step 1 (or into nothing) and stop at ``stop``; return (live run dir, crash snapshot).

    The snapshot is a copy of the run directory taken at the instant of the stop: what a power
    cut or SIGKILL there would leave, with no exception handler run.
    """
    import shutil

    run, snap = tmp_path / "run", tmp_path / "snapshot"
    model = _model()
    if existing:
        ckpt.save_checkpoint(run / "last", model, RECIPE, state={"step": 1})

    def stop_here(step, path):
        if step == stop:
            shutil.copytree(run, snap)
            raise RuntimeError(f"stopped at {step}")

    monkeypatch.setattr(atomic, "_reached", stop_here)
    with pytest.raises(RuntimeError, match=f"stopped at {stop}"):
        ckpt.save_checkpoint(run / "last", model, RECIPE, state={"step": 2})
    monkeypatch.undo()
    return run, snap


@pytest.mark.parametrize(("stop", "existing"), [(s, True) for s in STEPS] + [(s, False) for s in ("fill", "seal", "install")],
                         ids=[f"replace-{s}" for s in STEPS] + [f"first-save-{s}" for s in ("fill", "seal", "install")])
def test_a_save_stopped_at_any_step_is_repaired_to_the_newest_complete_checkpoint(tmp_path, monkeypatch, stop, existing):
    run, snap = _save_and_stop_at(tmp_path, monkeypatch, stop, existing)
    rolled_forward = STEPS.index(stop) >= SEALED_AT
    expected = 2 if rolled_forward else 1 if existing else None

    # the crash state: leftovers as the protocol left them, then the repair a resume/sample runs
    leftovers = [n for n in _names(snap) if n != "last"]
    assert leftovers and all(atomic._LEFTOVER.match(n) for n in leftovers), _names(snap)
    assert ckpt.repair_run(snap) == ([snap / "last"] if expected else [])
    assert _names(snap) == (["last"] if expected else [])
    if expected:
        assert _step_of(snap / "last") == expected
        assert ckpt.is_checkpoint(snap / "last") and atomic.is_sealed(snap / "last", ckpt.CONFIG)

    # the same stop as an exception in a live process: the handler already left a clean state
    assert _names(run) == (["last"] if expected else [])
    if expected:
        assert _step_of(run / "last") == expected


def test_half_written_record_and_half_deleted_old_copy_are_repaired(tmp_path, monkeypatch):
    # stopped while writing config.json (the seal): the new copy is incomplete, the old one wins
    _, snap = _save_and_stop_at(tmp_path / "a", monkeypatch, "seal", existing=True)
    (tmp,) = [p for p in snap.iterdir() if ".tmp-" in p.name]
    (tmp / ckpt.CONFIG).write_text('{"format": "zoo-checkpoint/1", "recipe": {}, "fil')
    assert not atomic.is_sealed(tmp, ckpt.CONFIG)
    ckpt.repair_checkpoint(snap / "last")
    assert _names(snap) == ["last"] and _step_of(snap / "last") == 1

    # stopped while deleting the old copy: the installed new one stays, the rest of the old goes
    _, snap = _save_and_stop_at(tmp_path / "b", monkeypatch, "discard", existing=True)
    (old,) = [p for p in snap.iterdir() if ".old-" in p.name]
    (old / ckpt.MODEL).unlink()
    ckpt.repair_checkpoint(snap / "last")
    assert _names(snap) == ["last"] and _step_of(snap / "last") == 2

    # DIR lost between the renames and the new copy unsealed: the old copy is restored
    _, snap = _save_and_stop_at(tmp_path / "c", monkeypatch, "set-aside", existing=True)
    (tmp,) = [p for p in snap.iterdir() if ".tmp-" in p.name]
    (tmp / ckpt.MODEL).write_bytes(b"")  # its record no longer matches: not complete
    old = snap / "last.old-0123abcd"
    (snap / "last").rename(old)
    ckpt.repair_checkpoint(snap / "last")
    assert _names(snap) == ["last"] and _step_of(snap / "last") == 1


def test_repair_touches_only_protocol_names(tmp_path):
    ckpt.save_checkpoint(tmp_path / "last", _model(), RECIPE, state={"step": 1})
    keep = ["last.tmp-notes", "last.old-123", "last.backup", "last.tmp-0123abcdx", "other.txt",
            "notes.old-0123abcd", ".notes.txt.tmp-0123abcd"]  # protocol forms, but of names zoo train never writes
    for name in keep:
        (tmp_path / name).write_text("user data")
    (tmp_path / ".loss.png.tmp-0123abcd").write_bytes(b"half a png")
    (tmp_path / "last.tmp-89abcdef").mkdir()  # an unsealed copy: an interrupted save
    (tmp_path / ".step_0000010.del-0123abcd").mkdir()  # a delete_dir a crash interrupted
    (tmp_path / ".step_0000010.del-0123abcd" / "model.safetensors").write_bytes(b"half")
    ckpt.repair_run(tmp_path)
    assert _names(tmp_path) == sorted(["last", *keep])
    assert all((tmp_path / n).read_text() == "user data" for n in keep)


def test_save_refuses_to_replace_what_zoo_did_not_write(tmp_path):
    model = _model()
    (tmp_path / "file").write_text("precious")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "thesis.tex").write_text("precious")
    ckpt.save_checkpoint(tmp_path / "ckpt", model, RECIPE)
    (tmp_path / "ckpt" / "notes.txt").write_text("precious")
    for name, message in (("file", "is not a directory"), ("dir", "is not a zoo checkpoint"),
                          ("ckpt", r"also holds files zoo did not write \(notes.txt\)")):
        with pytest.raises(UserError, match=message):
            ckpt.save_checkpoint(tmp_path / name, model, RECIPE)
    assert (tmp_path / "file").read_text() == (tmp_path / "dir" / "thesis.tex").read_text() == "precious"
    assert _names(tmp_path) == ["ckpt", "dir", "file"]
    (tmp_path / "empty").mkdir()
    ckpt.save_checkpoint(tmp_path / "empty", model, RECIPE)  # an empty directory loses nothing
    assert ckpt.is_checkpoint(tmp_path / "empty")


def test_incomplete_or_corrupt_checkpoint_files_are_named(tmp_path):
    ckpt.save_checkpoint(tmp_path / "c", _model(), RECIPE, ema=_model(), state={"step": 3})
    ema = tmp_path / "c" / ckpt.EMA
    ema.write_bytes(ema.read_bytes()[:100])
    with pytest.raises(UserError, match=r"checkpoint .*c is incomplete: ema.safetensors has 100 bytes, config.json says \d+"):
        ckpt.load_checkpoint(tmp_path / "c", weights="ema")
    ema.unlink()
    with pytest.raises(UserError, match="incomplete: ema.safetensors is missing"):
        ckpt.load_checkpoint(tmp_path / "c")
    (tmp_path / "w.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(UserError, match=r"cannot read weights file .*w.safetensors: not a complete safetensors file"):
        load_weights(tmp_path / "w.safetensors")



def test_a_checkpoint_deleted_while_it_is_read_is_not_called_incomplete(tmp_path, monkeypatch):
    """A running zoo train prunes an old step_* (keep_last) after a reader opened its record: the reader
    is told that, not that the save was broken."""
    import shutil

    step = ckpt.save_checkpoint(tmp_path / "run" / "step_0000002", _model(), RECIPE, state={"step": 2})
    real = atomic.read_record

    def record_then_pruned(directory, record):
        payload = real(directory, record)
        shutil.rmtree(directory)
        return payload

    monkeypatch.setattr(atomic, "read_record", record_then_pruned)
    with pytest.raises(UserError, match=r"step_0000002 was deleted while it was being read") as err:
        ckpt.load_checkpoint(step)
    assert "train.keep_last" in err.value.suggestion and "incomplete" not in err.value.message

@pytest.mark.slow
def test_a_process_killed_between_the_two_renames_leaves_a_repairable_state(tmp_path):
    """The stop-at-step tests raise; here the process really dies (os._exit) with DIR renamed away."""
    import subprocess
    import sys

    script = f"""
import os, torch, zoo
from zoo import atomic, checkpoint as ckpt
recipe = {RECIPE!r}
model = zoo.build_model(recipe)
ckpt.save_checkpoint({str(tmp_path / "last")!r}, model, recipe, state={{"step": 1}})
atomic._reached = lambda step, path: os._exit(9) if step == "install" else None
ckpt.save_checkpoint({str(tmp_path / "last")!r}, model, recipe, state={{"step": 2}})
"""
    assert subprocess.run([sys.executable, "-c", script], timeout=300).returncode == 9
    names = _names(tmp_path)
    assert "last" not in names and len(names) == 2  # DIR.old-* and DIR.tmp-*: between the renames
    ckpt.repair_run(tmp_path)
    assert _names(tmp_path) == ["last"] and _step_of(tmp_path / "last") == 2


def test_sample_and_resume_repair_a_run_stopped_between_the_two_renames(tmp_path, monkeypatch, capsys):
    """zoo sample and zoo train --resume find last/ gone (set aside, new copy not yet installed) and repair it."""
    import shutil
    from pathlib import Path

    from zoo.cli import main

    recipe = str(Path(__file__).parent / "recipes" / "tiny_train.yaml")
    fast = ["--set", "train.sample_every=0", "--set", "train.ckpt_every=0", "--set", "train.batch_size=4"]
    run, crashed = tmp_path / "run", tmp_path / "crashed"
    assert main(["train", recipe, "--out", str(run), "--steps", "1", *fast]) == 0

    def power_cut(step, path):
        if step == "install":
            shutil.copytree(run, crashed)
            raise RuntimeError("power cut")

    monkeypatch.setattr(atomic, "_reached", power_cut)
    with pytest.raises(RuntimeError, match="power cut"):
        main(["train", recipe, "--out", str(run), "--resume", str(run), "--steps", "2", *fast])
    monkeypatch.undo()
    assert "last" not in _names(crashed) and len([n for n in _names(crashed) if n.startswith("last.")]) == 2
    resumable = tmp_path / "resumable"
    shutil.copytree(crashed, resumable)

    capsys.readouterr()
    assert main(["sample", str(crashed / "last"), "--n", "1", "--out", str(tmp_path / "grid.png")]) == 0
    assert [n for n in _names(crashed) if n.startswith("last")] == ["last"] and _step_of(crashed / "last") == 2
    assert (tmp_path / "grid.png").read_bytes()[:4] == b"\x89PNG"

    assert main(["train", recipe, "--out", str(resumable), "--resume", str(resumable), "--steps", "3", *fast]) == 0
    assert f"resumed from {resumable / 'last'} at step 2" in capsys.readouterr().out
    assert [n for n in _names(resumable) if n.startswith("last")] == ["last"] and _step_of(resumable / "last") == 3


def test_a_checkpoint_names_the_plugin_it_needs_when_that_plugin_is_gone(tmp_path):
    """A run of a plugin's block, loaded where the plugin is not installed: the unknown name says
    which distribution (and version) the checkpoint was written with."""
    import json as json_module

    import zoo
    from fake_plugins import on_sys_path

    recipe = {"model": {"type": "fake_net", "in_features": 3, "dim": 8, "depth": 1,
                        "block": {"type": "fake_block", "norm": "rmsnorm"}}}
    with on_sys_path():
        ckpt.save_checkpoint(tmp_path / "run", zoo.build_model(recipe), recipe)
        assert ckpt.load_checkpoint(tmp_path / "run")[1]["model"]["type"] == "fake_net"  # loads while installed
    config = json_module.loads((tmp_path / "run" / ckpt.CONFIG).read_text())
    assert config["plugins"] == {"zoo-fake-plugin": "0.1"}  # rmsnorm is zoo's own: not listed
    with pytest.raises(UserError, match=r"unknown backbone 'fake_net'.*pip install zoo-fake-plugin==0\.1"):
        ckpt.load_checkpoint(tmp_path / "run")
    ckpt.save_checkpoint(tmp_path / "plain", _model(), RECIPE)
    assert "plugins" not in json_module.loads((tmp_path / "plain" / ckpt.CONFIG).read_text())


def test_a_recorded_plugins_dataset_name_gets_the_install_hint_too():
    """An unknown name in a key with a list of choices ('dataset must be one of ..., got lab_data') got no
    'pip install' hint, where unknown blocks and solvers did."""
    err = UserError("key data.dataset: dataset must be one of emoji32, image_folder, synthetic, got 'lab_data'")
    ckpt.add_plugin_hint(err, {"zoo-not-installed-plugin": "0.2"})
    assert err.suggestion == ("it was written with the plugin zoo-not-installed-plugin==0.2 installed: pip install "
                              "zoo-not-installed-plugin==0.2")


def test_an_unreadable_weights_file_is_said_so_not_missing(tmp_path, monkeypatch):
    """safetensors reports EACCES as 'No such file', so a chmod 000 model.safetensors read 'not a complete
    safetensors file (No such file or directory ...)' beside a file that is there and whole."""
    ckpt.save_checkpoint(tmp_path / "c", _model(), RECIPE)
    real_open = Path.open

    def no_access(self, mode="r", *args, **kwargs):  # chmod 000 as a user without root's override
        if self.name == "model.safetensors":
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, mode, *args, **kwargs)

    monkeypatch.setattr(Path, "open", no_access)
    with pytest.raises(UserError) as err:
        load_weights(tmp_path / "c" / "model.safetensors")
    assert err.value.message == f"cannot read weights file {tmp_path / 'c' / 'model.safetensors'}: permission denied"


def test_a_write_whose_temporary_file_another_writer_took_for_stale_says_so(tmp_path):
    """A writer paused 15 minutes (Ctrl-Z, a sleeping laptop) can have its temporary file removed by another
    writer of the same path as a killed write's leftover; it died with a FileNotFoundError naming the temporary."""
    import os
    import time

    from zoo import atomic

    path = tmp_path / "x.npz"

    def paused(tmp):
        tmp.write_text("x")
        old = time.time() - atomic.STALE_AFTER_S - 1
        os.utime(tmp, (old, old))  # untouched for longer than the limit
        atomic.write_file(path, lambda t: t.write_text("y"))  # meanwhile, another writer of the same file

    with pytest.raises(UserError, match=r"x.npz was not written: its temporary file \.x\.npz\.tmp-\w+ was removed"):
        atomic.write_file(path, paused)
    assert path.read_text() == "y"


def test_a_temporary_file_removed_at_once_is_not_said_to_be_15_minutes_old(tmp_path):
    """A writer that removes leftovers whatever their age (zoo prepare-latents, for its own shards) took a live
    write's; the message claimed a 15-minute rule that was not applied."""
    from zoo import atomic

    path = tmp_path / "shard.safetensors"

    def removed(tmp):
        tmp.write_text("x")
        atomic.remove_file_leftovers(path)  # untouched_for=0

    with pytest.raises(UserError) as err:
        atomic.write_file(path, removed)
    assert "was removed meanwhile by another process" in str(err.value) and "minutes" not in str(err.value)


def test_a_checkpoint_holding_a_retired_key_loads_with_a_note(tmp_path, capsys):
    """data.name was accepted (and read by nothing) until 2026-12-07: runs trained with it stayed
    unreadable ('unknown key name in data') once it became unknown."""
    model = _model()
    out = ckpt.save_checkpoint(tmp_path / "c", model, RECIPE)
    payload = json.loads((out / "config.json").read_text())
    payload["recipe"]["data"] = {"name": "mydata", "dataset": "synthetic"}
    (out / "config.json").write_text(json.dumps(payload))
    loaded, recipe = ckpt.load_checkpoint(out)
    assert recipe["data"] == {"dataset": "synthetic"}
    assert torch.equal(loaded.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)
    assert "data.name ignored (read by nothing" in capsys.readouterr().err
    with pytest.raises(UserError, match="unknown key 'name' in data"):  # a new recipe is still refused it
        import zoo

        zoo.load_recipe({**RECIPE, "data": {"name": "mydata"}})


@pytest.mark.parametrize("change", ["shared_gate", "mlp_width"])
def test_weights_of_an_earlier_construction_name_the_change(tmp_path, change):
    """Such a checkpoint was told 'restore the recipe they were trained with', though its recipe was unchanged."""
    import zoo
    from safetensors.torch import save_file

    tiny_dimr = Path(__file__).parent / "recipes" / "tiny_dimr_pixels.yaml"
    recipe = {"model": {**RECIPE["model"], "mlp_ratio": 2.7}} if change == "mlp_width" else {
        "model": zoo.load_recipe(tiny_dimr, ["model.norm=td_layernorm_paper",
                                             "model.branches.0.block.norm=td_layernorm_paper"])["model"]}
    out = ckpt.save_checkpoint(tmp_path / "c", zoo.build_model(recipe), recipe)
    state = load_weights(out / ckpt.MODEL)
    if change == "shared_gate":  # the shift's own gate, as saved before 2026-12-07
        for key in [k for k in state if k.endswith(".bias.p0")]:
            state[key[:-3] + ".w"], state[key[:-3] + ".b"] = torch.zeros(1), torch.zeros(1)
    else:  # one feature more than int(width x mlp_ratio), as rounding to the nearest gave for some widths
        for key in [k for k in state if k.endswith("fc1.weight")]:
            state[key] = torch.zeros(state[key].shape[0] + 1, state[key].shape[1])
    save_file(state, str(out / ckpt.MODEL))
    payload = json.loads((out / "config.json").read_text())
    payload["files"][ckpt.MODEL] = (out / ckpt.MODEL).stat().st_size
    (out / "config.json").write_text(json.dumps(payload))
    with pytest.raises(UserError) as err:
        ckpt.load_checkpoint(out)
    expected = {"shared_gate": "td_layernorm_paper shares one gate", "mlp_width": "int(width x mlp_ratio)"}[change]
    assert expected in err.value.suggestion and "load them with a zoo from before then" in err.value.suggestion


def test_weights_on_meta_gives_the_tied_names_too(tmp_path):
    """A tied tensor is written once with its other names in the 'aliases' metadata: the header-only read
    gives every name of the state dict (a fit check on it would call the tied names missing otherwise)."""
    module = Tied()
    save_weights(tmp_path / "w.safetensors", module.state_dict())
    meta = weights_on_meta(tmp_path / "w.safetensors")
    assert set(meta) == set(module.state_dict())
    assert all(t.device.type == "meta" and t.shape == module.state_dict()[k].shape for k, t in meta.items())


def test_weights_on_meta_of_broken_aliases_metadata_is_none(tmp_path):
    """An 'aliases' metadata that is not JSON makes the file unreadable here (None, for load_weights to
    say why), not an exception out of the header read."""
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "w.safetensors"), metadata={"aliases": "[", "format": "pt"})
    assert weights_on_meta(tmp_path / "w.safetensors") is None


def test_key_mismatch_lists_three_keys_in_full():
    """Up to three keys are all named; the '... (N in all)' tail starts past three."""
    t = torch.zeros(1)
    assert key_mismatch({"a": t, "b": t, "c": t}, {}) == "missing keys: a, b, c"
    assert key_mismatch({"a": t, "b": t, "c": t, "d": t}, {}) == "missing keys: a, b, c, ... (4 in all)"
