"""``zoo train``: loss goes down, checkpoints are atomic and resumable, EMA math, optimizer groups, CLI."""

import json
import os
import signal
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import zoo
import zoo.checkpoint as ckpt
from zoo.cli import main
from zoo.training.ema import EMA
from zoo.training.optim import build_optimizer
from zoo.training import Trainer, train
from zoo.weights import load_weights

RECIPE = Path(__file__).parent / "recipes" / "tiny_train.yaml"
QUIET = lambda *_: None  # noqa: E731


def recipe(*overrides):
    return zoo.load_recipe(RECIPE, list(overrides))


def test_loss_decreases_on_a_fixed_small_dataset(tmp_path):
    records = train(recipe("train.ckpt_every=0", "train.sample_every=0"), tmp_path, log=QUIET)
    losses = [r["loss"] for r in records]
    assert len(losses) == 6 and losses[0] > 0.95 and losses[-1] < 0.8 * losses[0], losses
    assert (tmp_path / "last" / "trainer_state.pt").is_file() and (tmp_path / "log.jsonl").read_text().count("\n") == 6


def test_checkpoint_layout_and_resume_gives_identical_losses(tmp_path):
    r = recipe("train.log_every=1", "train.sample_every=0", "train.steps=12", "train.ckpt_every=6")
    full = train(r, tmp_path / "a", log=QUIET)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "last", "log.jsonl", "loss.png", "step_0000006", "step_0000012", "tb"]
    for d in ("step_0000006", "last"):
        assert sorted(p.name for p in (tmp_path / "a" / d).iterdir()) == [
            "config.json", "ema.safetensors", "model.safetensors", "trainer_state.pt"]
    state = torch.load(tmp_path / "a" / "last" / "trainer_state.pt", weights_only=True)
    assert state["step"] == 12
    train(r, tmp_path / "b", steps=6, log=QUIET)
    resumed = train(r, tmp_path / "b", resume=tmp_path / "b" / "last", log=QUIET)
    assert [x["loss"] for x in resumed] == [x["loss"] for x in full[6:]]  # same batches, noise, label drops
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = load_weights(tmp_path / "a" / "last" / name), load_weights(tmp_path / "b" / "last" / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_previous_last_survives_a_failure_mid_save(tmp_path, monkeypatch):
    trainer = Trainer(recipe("train.sample_every=0", "train.ckpt_every=0"), tmp_path, log=QUIET)
    trainer.run(2)
    before = (tmp_path / "last" / "model.safetensors").read_bytes()

    def broken(path, state):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_weights", broken)
    trainer.step = 5
    with pytest.raises(OSError):
        trainer.save(also_step_dir=False)
    assert (tmp_path / "last" / "model.safetensors").read_bytes() == before
    assert torch.load(tmp_path / "last" / "trainer_state.pt", weights_only=True)["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last", "log.jsonl", "loss.png", "tb"]  # no temp dirs left


def test_ema_math_and_fp32_shadow_of_a_bf16_model():
    model = nn.Linear(4, 4)
    ema = EMA(model, decay=0.9)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update()
    torch.testing.assert_close(ema.state_dict()["weight"], 0.9 * start + 0.1 * (start + 1.0))
    bf = nn.Linear(4, 4).to(torch.bfloat16)
    with torch.no_grad():
        bf.weight.fill_(1.0)
    ema = EMA(bf, decay=0.9999)
    with torch.no_grad():
        bf.weight.fill_(1.5)
    for _ in range(10):
        ema.update()
    shadow = ema.state_dict()["weight"]
    assert shadow.dtype == torch.float32
    expected = 1.5 - 0.5 * 0.9999 ** 10  # a bf16 shadow would stay at exactly 1.0
    torch.testing.assert_close(shadow, torch.full_like(shadow, expected))


def test_ema_loads_strictly_with_one_line_naming_the_tensor():
    ema = EMA(nn.Linear(4, 4), decay=0.9)
    good = {k: v.clone() for k, v in ema.state_dict().items()}
    cases = {  # a (1,) tensor was broadcast by copy_, an extra key ignored, a missing one a bare KeyError
        "wrong shape keys: bias (1,) (model: (4,))": {**good, "bias": torch.zeros(1)},
        "unexpected keys: extra": {**good, "extra": torch.zeros(4)},
        "missing keys: weight": {"bias": good["bias"]},
    }
    for words, state in cases.items():
        with pytest.raises(zoo.errors.UserError) as info:
            ema.load_state_dict(state, "ckpt/ema.safetensors")
        assert str(info.value).startswith("ckpt/ema.safetensors does not match the model") and words in str(info.value)
    ema.load_state_dict(good)


def test_resume_refuses_an_ema_file_that_does_not_match_the_model(tmp_path, capsys):
    r = recipe("train.sample_every=0", "train.ckpt_every=0")
    train(r, tmp_path / "a", steps=2, log=QUIET)
    last = tmp_path / "a" / "last"
    ema = load_weights(last / "ema.safetensors")
    ema["final_layer.linear.bias"] = ema["final_layer.linear.bias"][:1]
    state = torch.load(last / "trainer_state.pt", weights_only=True)
    ckpt.save_checkpoint(tmp_path / "bad", load_weights(last / "model.safetensors"), r, ema=ema, state=state)
    capsys.readouterr()
    assert main(["train", str(RECIPE), "--out", str(tmp_path / "b"), "--resume", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ema.safetensors does not match the model" in err, err
    assert "final_layer.linear.bias (1,)" in err and not (tmp_path / "b").exists()


def test_no_decay_on_time_dependent_gates_and_frozen_table_not_optimized():
    dimr = zoo.build_model(Path(__file__).parent / "recipes" / "tiny_dimr_pixels.yaml")
    opt = build_optimizer(dimr, {"lr": 1e-3, "weight_decay": 0.03})
    decayed, free = opt.param_groups
    assert decayed["weight_decay"] == 0.03 and free["weight_decay"] == 0.0
    assert free["names"] and all(n.rsplit(".", 1)[-1] in ("w", "b") for n in free["names"])
    assert not any(n in free["names"] for n in decayed["names"])
    dit = zoo.build_model(RECIPE)
    opt = build_optimizer(dit, {"lr": 1e-3})
    ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not dit.pos_embed.requires_grad and id(dit.pos_embed) not in ids
    assert len(ids) == sum(p.requires_grad for p in dit.parameters())


def test_cli_end_to_end_and_missing_data_root(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", str(RECIPE), "--out", str(out), "--steps", "10"]) == 0
    assert (out / "last" / "model.safetensors").is_file() and (out / "step_0000010").is_dir()
    capsys.readouterr()
    code = main(["train", str(RECIPE), "--out", str(tmp_path / "new"), "--set", "data.dataset=image_folder"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "data.root" in err


def test_out_defaults_to_runs_and_the_recipe_name(tmp_path, monkeypatch, capsys):
    """The mission's literal command, `zoo train recipes/dimr_xl_2r.yaml`, reaches the data check (exit 2, one line
    naming the latents) instead of an argparse complaint; a recipe that trains writes runs/<recipe name>/."""
    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(tmp_path)
    assert main(["train", str(repo / "recipes" / "dimr_xl_2r.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "zoo prepare-latents" in err and not (tmp_path / "runs").exists()
    assert main(["train", str(RECIPE), "--steps", "1", "--set", "train.sample_every=0"]) == 0
    assert (tmp_path / "runs" / "tiny_train" / "last" / "model.safetensors").is_file()
    assert "runs/tiny_train/last" in capsys.readouterr().out
    assert main(["train", str(RECIPE), "--steps", "1"]) == 2  # the default directory is never overwritten
    assert "--resume runs/tiny_train" in capsys.readouterr().err


def test_sample_grid_written(tmp_path):
    train(recipe("train.steps=2", "train.sample_every=2", "train.ckpt_every=0"), tmp_path, log=QUIET)
    assert (tmp_path / "samples" / "step_0000002.png").stat().st_size > 0


def test_a_run_ending_between_grids_also_draws_the_final_weights(tmp_path):
    train(recipe("train.steps=5", "train.sample_every=2", "train.ckpt_every=0"), tmp_path, log=QUIET)
    assert sorted(p.name for p in (tmp_path / "samples").glob("*.png")) == [
        "step_0000002.png", "step_0000004.png", "step_0000005.png"]
    train(recipe("train.steps=5", "train.sample_every=2", "train.ckpt_every=0"), tmp_path / "none", log=QUIET,
          steps=0)  # nothing trained in this call: no grid
    assert not (tmp_path / "none" / "samples").exists()


def test_image_folder_and_latent_shards_load(tmp_path):
    from PIL import Image
    from safetensors.torch import save_file

    from zoo.training.data import build_dataset

    for c, colour in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
        (tmp_path / "img" / c).mkdir(parents=True)
        Image.new("RGB", (12, 10), colour).save(tmp_path / "img" / c / "a.png")
    ds = build_dataset({"dataset": "image_folder", "root": str(tmp_path / "img"), "image_size": 8}, (3, 8, 8), 2)
    x, y = ds[1]
    assert x.shape == (3, 8, 8) and y == 1 and x[2].eq(1.0).all() and x[0].eq(-1.0).all()
    (tmp_path / "lat").mkdir()
    z = torch.randn(5, 4, 2, 2)
    save_file({"latents": z, "labels": torch.arange(5)}, str(tmp_path / "lat" / "0.safetensors"))
    save_file({"latents": z, "labels": torch.arange(5)}, str(tmp_path / "lat" / "1.safetensors"),
              metadata={"scaled": "true"})
    ds = build_dataset({"dataset": "imagenet", "latent": True, "root": str(tmp_path / "lat"), "vae_scale": 0.5},
                       (4, 2, 2), 5)
    assert len(ds) == 10 and torch.equal(ds[0][0], z[0] * 0.5) and torch.equal(ds[5][0], z[0])
    (tmp_path / "empty").mkdir()
    with pytest.raises(zoo.errors.UserError, match="data.root.*holds no"):
        build_dataset({"dataset": "latents", "root": str(tmp_path / "empty")}, (4, 2, 2), 5)


def test_a_relative_data_root_is_stored_absolute_so_the_run_samples_from_anywhere(tmp_path, monkeypatch, capsys):
    """config.json used to keep data.root=img as typed: from another directory `--class dog` found no
    class names (or a same-named folder there supplied other ones)."""
    import json

    from PIL import Image

    for c in ("cat", "dog", "eel", "fox"):
        (tmp_path / "img" / c).mkdir(parents=True)
        Image.new("RGB", (8, 8), (40, 80, 120)).save(tmp_path / "img" / c / "a.png")
    monkeypatch.chdir(tmp_path)
    assert main(["train", str(RECIPE), "--out", "run", "--steps", "1", "--set", "data.dataset=image_folder",
                 "--set", "data.root=img", "--set", "train.batch_size=4", "--set", "train.sample_every=0",
                 "--set", "data.cache=cache"]) == 0
    data = json.loads((tmp_path / "run" / "last" / "config.json").read_text())["recipe"]["data"]
    assert data["root"] == str(tmp_path / "img") and data["cache"] == str(tmp_path / "cache")  # a cache yet to be made too
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    capsys.readouterr()
    assert main(["sample", "../run", "--n", "1", "--class", "dog", "--out", "g.png"]) == 0


def test_data_and_train_typos_name_file_and_line(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text(f"_base_: {RECIPE}\ndata:\n  random_flp: true\n")
    with pytest.raises(zoo.errors.UserError, match=rf"{path}:3: key data.random_flp: unknown key.*random_flip"):
        zoo.load_recipe(path)
    with pytest.raises(zoo.errors.UserError, match="precision"):
        recipe("train.precision=fp8")


@pytest.fixture
def terminal_sigint():
    """SIGINT as in a terminal: a shell that starts a job in the background (`pytest &`) hands it
    SIGINT ignored, and then a held Ctrl-C is rightly dropped (test_a_sigint_the_process_ignores_...)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def _signal_at(calls: list, when: dict, real):
    """The method ``real`` (``Trainer.train_step``, ``EMA.update``: one call a step) sending the process
    the signal ``when[n]`` at the start of its n-th call."""
    def method(self, *args):
        calls.append(1)
        if len(calls) in when:
            os.kill(os.getpid(), when[len(calls)])
        return real(self, *args)

    return method


def test_ctrl_c_finishes_the_step_saves_last_and_exits_130(tmp_path, monkeypatch, capsys, terminal_sigint):
    calls = []
    monkeypatch.setattr(Trainer, "train_step", _signal_at(calls, {4: signal.SIGINT}, Trainer.train_step))
    assert main(["train", str(RECIPE), "--out", str(tmp_path), "--set", "train.ckpt_every=0"]) == 130
    assert torch.load(tmp_path / "last" / "trainer_state.pt", weights_only=True)["step"] == 4 == len(calls)
    err = capsys.readouterr()
    assert "stopping at step 4 (SIGINT)" in err.out and "zoo: interrupted" in err.err


def test_a_stop_on_a_checkpoint_step_keeps_that_steps_directory(tmp_path, monkeypatch, terminal_sigint):
    """Ctrl-C landing on step 4 with ckpt_every 2 saved last/ only: step_0000004 was never written."""
    monkeypatch.setattr(Trainer, "train_step", _signal_at([], {4: signal.SIGINT}, Trainer.train_step))
    assert main(["train", str(RECIPE), "--out", str(tmp_path), "--set", "train.ckpt_every=2",
                 "--set", "train.sample_every=0"]) == 130
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_0000002", "step_0000004"]
    assert torch.load(tmp_path / "step_0000004" / "trainer_state.pt", weights_only=True)["step"] == 4


def test_a_sigterm_during_the_final_save_lets_it_finish(tmp_path, monkeypatch):
    """The stop handlers were put back before the run's last save, so a SIGTERM there (a preemption
    during a long save) killed the process and left no checkpoint at all."""
    real = Trainer.save

    def save(self, *args, **kwargs):
        if self.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "save", save)
    train(recipe("train.ckpt_every=0", "train.sample_every=0"), tmp_path, steps=3, log=QUIET)
    assert torch.load(tmp_path / "last" / "trainer_state.pt", weights_only=True)["step"] == 3
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_sigterm_stops_like_ctrl_c_with_status_143(tmp_path, monkeypatch, capsys):
    """SLURM and torchrun send SIGTERM before they kill (preemption): the run saves last/ and exits 143."""
    calls = []
    monkeypatch.setattr(Trainer, "train_step", _signal_at(calls, {2: signal.SIGTERM}, Trainer.train_step))
    assert main(["train", str(RECIPE), "--out", str(tmp_path), "--set", "train.ckpt_every=0"]) == 143
    assert torch.load(tmp_path / "last" / "trainer_state.pt", weights_only=True)["step"] == 2 == len(calls)
    assert "zoo: stopped by SIGTERM at step 2" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handler lives only as long as the run


def test_a_stop_said_while_the_bar_is_on_screen_gets_its_own_line(tmp_path, monkeypatch, capsys):
    """On a terminal the stop line was printed onto the end of the progress bar's line (and a stale copy of
    the bar left under it): "... loss=0.2108]zoo train: stopping at step 261 (SIGTERM); saving ..."."""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    monkeypatch.setattr(Trainer, "train_step", _signal_at([], {2: signal.SIGTERM}, Trainer.train_step))
    assert main(["train", str(RECIPE), "--out", str(tmp_path), "--set", "train.ckpt_every=0",
                 "--set", "train.sample_every=0"]) == 143
    out, err = capsys.readouterr()
    assert "stopping at step 2" not in out  # not printed to stdout past the bar's back
    lines = err.replace("\r", "\n").splitlines()  # tqdm redraws with \r; a written line starts after one
    assert any(line.startswith("zoo train: stopping at step 2 (SIGTERM); saving") for line in lines), err


def _sigint_when_the_ema_is_copied(monkeypatch, step: int | None = None) -> list:
    """Send this process one SIGINT as the trainer first copies its EMA (at ``step``, else at any): as rank 0
    starts a grid or an evaluation, the moment a stop cuts them short. Returns a list that is non-empty once sent."""
    import zoo.training.loop as loop

    real, signalled = loop.Trainer.ema_copy, []

    def ema_copy(self):
        model = real(self)
        if (step is None or self.step == step) and not signalled:
            signalled.append(1)
            os.kill(os.getpid(), signal.SIGINT)
        return model

    monkeypatch.setattr(loop.Trainer, "ema_copy", ema_copy)
    return signalled


@pytest.mark.parametrize("phase, keys", [
    ("the sample grid", ["train.sample_every=2"]),
    ("the validation loss", ["train.sample_every=0", "train.val_every=2", "train.val_n=64"]),
])
def test_a_stop_during_a_grid_or_evaluation_cuts_it_short_saves_that_step_and_the_resume_does_it(
        tmp_path, monkeypatch, capsys, terminal_sigint, phase, keys):
    """A grid or an evaluation ran to its end before the stop was looked at: under torchrun, whose
    SIGTERM gives 30 s before its kill, rank 0 was killed mid-grid and last/ not saved. Cut short, it then
    trained one step more and saved that: the resume started after the cut step, whose grid or validation
    loss was lost for good."""
    _sigint_when_the_ema_is_copied(monkeypatch, step=2)  # as rank 0 starts the grid or evaluation of step 2
    argv = ["train", str(RECIPE), "--out", str(tmp_path), "--set", "train.ckpt_every=0", "--set", "train.steps=10"]
    assert main(argv + [x for k in keys for x in ("--set", k)]) == 130
    out = capsys.readouterr().out
    assert f"zoo train: {phase} of step 2 was cut short by SIGINT; the run stops now" in out
    assert "stopping at step 2 (SIGINT)" in out
    assert torch.load(tmp_path / "last" / "trainer_state.pt", weights_only=True)["step"] == 2
    assert not (tmp_path / "samples" / "step_0000002.png").exists()
    assert '"val_loss"' not in (tmp_path / "log.jsonl").read_text()
    assert main(argv + [x for k in keys for x in ("--set", k)] + ["--resume", str(tmp_path), "--steps", "3"]) == 0
    assert "note: step 2's" in capsys.readouterr().out
    if phase == "the sample grid":
        assert (tmp_path / "samples" / "step_0000002.png").is_file()
    else:
        assert '"step": 2, "val_loss"' in (tmp_path / "log.jsonl").read_text()


def test_a_stop_during_the_last_steps_grid_ends_the_run_as_done(tmp_path, monkeypatch, capsys, terminal_sigint):
    """A stop that cuts the grid of the run's last step short has nothing left to stop: the run ends as a
    finished one (exit 0, 'done'), not as interrupted (exit 130) with a resume to do that trains nothing."""
    signalled = _sigint_when_the_ema_is_copied(monkeypatch, step=2)  # as rank 0 starts step 2's grid, the last
    assert main(["train", str(RECIPE), "--out", str(tmp_path), "--set", "train.ckpt_every=0", "--set", "train.steps=2",
                 "--set", "train.sample_every=2", "--set", "train.sample_n=4"]) == 0
    captured = capsys.readouterr()
    assert signalled and "the sample grid of step 2 was cut short by SIGINT" in captured.out
    assert "zoo train: done;" in captured.out and "interrupted" not in captured.err
    assert torch.load(tmp_path / "last" / "trainer_state.pt", weights_only=True)["step"] == 2


def test_an_evaluation_cut_short_on_rank_0_still_meets_the_other_ranks():
    """The other ranks wait at the barrier after rank 0's evaluation: rank 0 must reach it however it ends."""
    from zoo.training.eval_hook import evaluation
    from zoo.training.signals import CutShort

    met = []

    class Ctx:
        def barrier(self):
            met.append(1)

    def hook(model, step):
        raise CutShort(signal.SIGTERM)

    with pytest.raises(CutShort):
        evaluation(hook, lambda: torch.nn.Linear(1, 1), 5, Ctx())
    assert met == [1]


def test_a_resume_calls_neither_a_data_default_spelled_out_nor_a_retired_key_a_change(tmp_path, capsys):
    """data.latent false, num_workers 0 and vae_scale 0.18215 written out (what the datasets read when left out)
    were listed as 'the recipe differs from the checkpoint's in data.latent (None -> False), ...', and a
    checkpoint's retired data.name (ignored with a note by zoo sample) as a change the user made."""
    import json

    out = tmp_path / "run"
    base = ["--set", "train.sample_every=0", "--set", "train.batch_size=4", "--set", "train.steps=4"]
    assert main(["train", str(RECIPE), "--out", str(out), "--steps", "2", *base]) == 0
    config = out / "last" / "config.json"
    payload = json.loads(config.read_text())
    payload["recipe"]["data"]["name"] = "mydata"  # as zoo wrote it before the key was retired
    config.write_text(json.dumps(payload))
    capsys.readouterr()
    spelled = ["--set", "data.latent=false", "--set", "data.num_workers=0", "--set", "data.vae_scale=0.18215",
               "--set", "data.split=train"]
    assert main(["train", str(RECIPE), "--resume", str(out), *base, *spelled]) == 0
    said = capsys.readouterr()
    assert "differs from the checkpoint's" not in said.out, said.out
    assert "data.name ignored (read by nothing" in said.err
    assert main(["train", str(RECIPE), "--resume", str(out), *base, "--set", "train.steps=5",
                 "--set", "data.random_flip=false"]) == 0  # the recipe's true: a change, said
    assert "data.random_flip (True -> False); the run goes on" in capsys.readouterr().out


def test_a_resume_takes_the_data_paths_of_the_checkpoint_and_names_what_else_differs(tmp_path, capsys):
    """The README's resume line gives no data.root: the run stopped with 'data.root is not set'."""
    from PIL import Image

    for c in ("a", "b"):
        (tmp_path / "img" / c).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (12, 12), (60 * i, 200 * (c == "a"), 30)).save(tmp_path / "img" / c / f"{i}.png")
    base = ["--set", "data.dataset=image_folder", "--set", "train.sample_every=0", "--set", "train.batch_size=4",
            "--set", "train.steps=4"]
    assert main(["train", str(RECIPE), "--out", str(tmp_path / "run"), "--steps", "2", *base,
                 "--set", f"data.root={tmp_path / 'img'}"]) == 0
    capsys.readouterr()
    assert main(["train", str(RECIPE), "--resume", str(tmp_path / "run"), *base, "--set", "train.lr=5e-4"]) == 0
    out = capsys.readouterr().out
    assert f"note: data.root is the checkpoint's, {tmp_path / 'img'}" in out
    assert "note: the recipe differs from the checkpoint's in train.lr (0.001 -> 0.0005); the run goes on" in out
    assert torch.load(tmp_path / "run" / "last" / "trainer_state.pt", weights_only=True)["step"] == 4
    # a root given again is the one read
    assert main(["train", str(RECIPE), "--resume", str(tmp_path / "run"), *base, "--set", "train.steps=5",
                 "--set", f"data.root={tmp_path / 'gone'}"]) == 2
    assert f"data.root {tmp_path / 'gone'} is not a directory" in capsys.readouterr().err
    # a recipe naming no dataset (the first start's --set data.dataset not given again) took the checkpoint's
    # root and then refused it: 'data.root is set, but dataset synthetic reads no root'
    assert main(["train", str(RECIPE), "--resume", str(tmp_path / "run"), "--set", "data=null", *base[2:]]) == 2
    assert capsys.readouterr().err.endswith(
        f"zoo: error: key data.dataset: the checkpoint in {tmp_path / 'run'} trained on data.dataset 'image_folder' "
        f"(data.root {tmp_path / 'img'}), and this recipe names no dataset (the default is 'synthetic') (give the "
        f"first start's --set options again: --set data.dataset=image_folder --set data.root={tmp_path / 'img'}, or "
        "pass --allow-recipe-change to go on with 'synthetic' (its own images and labels))\n")
    # a recipe naming another dataset that reads no root (emoji32's recipe, the first start's --set
    # data.dataset=image_folder not given again): refused naming both, not 'the data's classes differ ... or pass
    # --allow-recipe-change', which went on with another dataset's images under other labels
    assert main(["train", str(RECIPE), "--resume", str(tmp_path / "run"), *base[2:]]) == 2
    assert capsys.readouterr().err.startswith(
        f"zoo: error: key data.dataset: the checkpoint in {tmp_path / 'run'} trained on data.dataset 'image_folder' "
        f"(data.root {tmp_path / 'img'}), and this recipe's is 'synthetic' (give the first start's --set options "
        f"again: --set data.dataset=image_folder --set data.root={tmp_path / 'img'}, or pass --allow-recipe-change")
    # a recipe naming another dataset that reads a root (a paper recipe's imagenet): not its 'data.root is not
    # set: ... make ImageNet latents', which sent the user to hours of encoding
    assert main(["train", str(RECIPE), "--resume", str(tmp_path / "run"), "--set", "data.dataset=latents",
                 *base[2:]]) == 2
    err = capsys.readouterr().err
    assert (f"trained on data.dataset 'image_folder' (data.root {tmp_path / 'img'}), and this recipe's is 'latents', "
            "with no data.root") in err and "--set data.dataset=image_folder" in err
    assert "--allow-recipe-change to go on with 'latents' and --set data.root=..." in err
    # a run without last/ resumes from its newest step_*/: the check read no checkpoint there and let the
    # run go on with the recipe's synthetic images (a note only)
    import shutil

    shutil.copytree(tmp_path / "run", tmp_path / "nolast")
    shutil.rmtree(tmp_path / "nolast" / "last")
    assert (tmp_path / "nolast" / "step_0000004").is_dir()
    assert main(["train", str(RECIPE), "--resume", str(tmp_path / "nolast"), *base[2:], "--set", "train.steps=5"]) == 2
    assert (f"the checkpoint in {tmp_path / 'nolast'} trained on data.dataset 'image_folder'"
            in capsys.readouterr().err)
    assert main(["train", str(RECIPE), "--resume", str(tmp_path / "run"), *base[2:], "--set", "train.steps=5",
                 "--allow-recipe-change"]) == 0  # asked for: the run goes on with the recipe's dataset, and says so
    assert ("note: --allow-recipe-change: the checkpoint trained on data.dataset 'image_folder' (data.root "
            f"{tmp_path / 'img'}); the run goes on with 'synthetic', its images and labels") in capsys.readouterr().out


def test_checkpoints_record_the_class_names_a_class_folder_added_later_cannot_shift(tmp_path, capsys):
    """A class folder added to an image folder after training (Jupyter's .ipynb_checkpoints, a new class
    sorting first) shifted every later label: --class NAME sampled another class and --resume
    retrained the class embeddings under new labels, both without a word."""
    from PIL import Image

    from zoo.sample import label_names

    def add_class(name: str) -> None:
        (tmp_path / "img" / name).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (12, 12), (60 * i, 200 * (name == "a"), 30)).save(tmp_path / "img" / name / f"{i}.png")

    add_class("a"), add_class("b")
    run = tmp_path / "run"
    base = ["--set", "data.dataset=image_folder", "--set", f"data.root={tmp_path / 'img'}", "--set",
            "train.sample_every=0", "--set", "train.batch_size=4", "--set", "train.steps=4"]
    assert main(["train", str(RECIPE), "--out", str(run), "--steps", "2", *base]) == 0
    assert ckpt.read_classes(run / "last") == ["a", "b"] == ckpt.read_classes(run / "step_0000002")
    add_class("A_new")  # sorts first: a becomes label 1, b label 2
    assert label_names(run / "last", ckpt.read_config(run / "last")) == ["a", "b"]  # --class b is still label 1
    assert label_names(RECIPE, recipe(*base[1::2])) == ["A_new", "a", "b"]  # a recipe: the folder as it is
    capsys.readouterr()
    assert main(["train", str(RECIPE), "--resume", str(run), *base]) == 2
    assert capsys.readouterr().err == (
        f"zoo: error: key data.root: the data's classes differ from those {run / 'last'} was trained with (2 then, "
        "3 now: 1 new (A_new); a was label 0, is now 1) (restore the data as it was (move added folders such as "
        ".ipynb_checkpoints out), or pass --allow-recipe-change to go on with the new labels)\n")
    assert main(["train", str(RECIPE), "--resume", str(run), "--allow-recipe-change", *base]) == 0
    assert "note: --allow-recipe-change: the data's classes differ" in capsys.readouterr().out
    assert ckpt.read_classes(run / "last") == ["A_new", "a", "b"]  # from now on, the new labelling
    # An unconditional model reads no labels: nothing recorded, and a folder added later changes nothing
    dimr = str(Path(__file__).parent / "recipes" / "tiny_dimr_pixels.yaml")
    uncond = [*base, "--set", "model.num_classes=1", "--set", "diffusion.null_label=0", "--set", "data.num_classes=null"]
    assert main(["train", dimr, "--out", str(tmp_path / "uncond"), "--steps", "2", *uncond]) == 0
    assert ckpt.read_classes(tmp_path / "uncond" / "last") == []
    add_class("B_new")
    assert main(["train", dimr, "--resume", str(tmp_path / "uncond"), *uncond]) == 0


def test_an_image_that_cannot_be_read_mid_run_keeps_the_steps_trained_before_it(tmp_path, monkeypatch, capsys):
    """The run stopped with the file named and no last/: every step since the last checkpoint was lost
    (with the default ckpt_every, the whole run)."""
    from PIL import Image

    def write_images(broken: bool) -> None:
        for c in ("a", "b"):
            (tmp_path / "img" / c).mkdir(parents=True, exist_ok=True)
            for i in range(4):
                path = tmp_path / "img" / c / f"{i}.png"
                if broken:
                    path.write_bytes(b"\x89PNG\r\n\x1a\n broken")  # damaged
                else:
                    Image.new("RGB", (12, 12), (60 * i, 200 * (c == "a"), 30)).save(path)

    write_images(broken=False)
    real = Trainer.train_step

    def break_the_images_in_step_3(self, x, y):
        loss = real(self, x, y)
        if self.step == 2:  # step 3 trained (the step counter moves on after this call)
            write_images(broken=True)
        return loss

    monkeypatch.setattr(Trainer, "train_step", break_the_images_in_step_3)
    run = tmp_path / "run"
    base = ["--set", "data.dataset=image_folder", "--set", f"data.root={tmp_path / 'img'}", "--set",
            "data.num_workers=0", "--set", "train.batch_size=4", "--set", "train.sample_every=0", "--set",
            "train.ckpt_every=0", "--set", "train.steps=5"]
    assert main(["train", str(RECIPE), "--out", str(run), *base]) == 2
    out, err = capsys.readouterr()
    assert f"stopping at step 3 (the data could not be read); saving {run / 'last'}" in out
    assert err.startswith("zoo: error: cannot read image ") and err.count("\n") == 1
    assert err.rstrip().endswith(f"(delete or replace the file; then go on with --resume {run})")
    assert torch.load(run / "last" / "trainer_state.pt", weights_only=True)["step"] == 3
    monkeypatch.setattr(Trainer, "train_step", real)
    write_images(broken=False)
    assert main(["train", str(RECIPE), "--resume", str(run), *base]) == 0
    assert torch.load(run / "last" / "trainer_state.pt", weights_only=True)["step"] == 5
    # the validation loss reads images too (here a fixed subset of the training images): the same save
    def break_the_images_in_step_2(self, x, y):
        loss = real(self, x, y)
        if self.step == 1:
            write_images(broken=True)
        return loss

    monkeypatch.setattr(Trainer, "train_step", break_the_images_in_step_2)
    write_images(broken=False)
    other = tmp_path / "val_run"
    assert main(["train", str(RECIPE), "--out", str(other), *base, "--set", "train.val_every=2",
                 "--set", "train.val_n=8"]) == 2
    assert "stopping at step 2 (the data could not be read)" in capsys.readouterr().out
    assert torch.load(other / "last" / "trainer_state.pt", weights_only=True)["step"] == 2


def test_a_second_ctrl_c_stops_at_once_without_saving(tmp_path, monkeypatch, capsys, terminal_sigint):
    """The first Ctrl-C asks for a stop after the step, the second one (same step) ends the run now:
    nothing half-updated is saved, and last/ keeps the previous checkpoint (step 2 here)."""
    monkeypatch.setattr(Trainer, "train_step", _signal_at([], {3: signal.SIGINT}, Trainer.train_step))
    monkeypatch.setattr(EMA, "update", _signal_at([], {3: signal.SIGINT}, EMA.update))  # the second, mid-step
    assert main(["train", str(RECIPE), "--out", str(tmp_path), "--set", "train.ckpt_every=2",
                 "--set", "train.sample_every=0"]) == 130
    assert torch.load(tmp_path / "last" / "trainer_state.pt", weights_only=True)["step"] == 2
    assert f"stopped at once; {tmp_path / 'last'} holds step 2" in capsys.readouterr().out


def test_ctrl_c_during_a_weight_update_saves_the_step_those_weights_belong_to(tmp_path, monkeypatch,
                                                                               terminal_sigint):
    """A real SIGINT in the middle of step 3's update (after the optimizer, before the EMA): the
    step finishes, last/ holds step 3 with step 3's weights, and a resume continues like a clean run."""
    base = ["train.ckpt_every=0", "train.sample_every=0", "train.log_every=1"]
    clean = tmp_path / "clean"
    train(recipe(*base), clean, steps=4, log=QUIET)
    real = EMA.update
    monkeypatch.setattr(EMA, "update", _signal_at([], {3: signal.SIGINT}, real))
    with pytest.raises(KeyboardInterrupt):
        train(recipe(*base), tmp_path / "cut", steps=4, log=QUIET)
    monkeypatch.setattr(EMA, "update", real)
    assert torch.load(tmp_path / "cut" / "last" / "trainer_state.pt", weights_only=True)["step"] == 3
    train(recipe(*base), tmp_path / "cut", steps=4, resume=tmp_path / "cut", log=QUIET)
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = load_weights(clean / "last" / name), load_weights(tmp_path / "cut" / "last" / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_a_sigint_the_process_ignores_stays_ignored_mid_update(tmp_path, monkeypatch):
    """Under SIG_IGN (nohup, a background job) a SIGINT during the update is dropped: the run finishes."""
    calls = []
    monkeypatch.setattr(EMA, "update", _signal_at(calls, {2: signal.SIGINT}, EMA.update))
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        train(recipe("train.ckpt_every=0", "train.sample_every=0"), tmp_path, steps=3, log=QUIET)
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN  # the process's own choice is back
    finally:
        signal.signal(signal.SIGINT, previous)
    assert len(calls) == 3
    assert torch.load(tmp_path / "last" / "trainer_state.pt", weights_only=True)["step"] == 3


def test_bf16_autocast_dimr_with_multiscale_loss(tmp_path):
    r = zoo.load_recipe(Path(__file__).parent / "recipes" / "tiny_dimr_pixels.yaml", [
        "data.dataset=synthetic", "data.size=8", "train.batch_size=4", "train.log_every=1", "train.ckpt_every=0",
        "train.sample_every=0", "train.precision=bf16", "train.warmup_steps=0", "train.lr=1e-3"])
    records = train(r, tmp_path, steps=3, log=QUIET)
    assert len(records) == 3 and all(0 < x["loss"] < 10 for x in records)
    ema = load_weights(tmp_path / "last" / "ema.safetensors")
    assert all(v.dtype == torch.float32 for v in ema.values())


def test_a_data_key_the_dataset_does_not_read_gets_a_note(tmp_path, capsys):
    """data.size beside image_folder (a recipe switched from synthetic by --set) was silently ignored."""
    from PIL import Image

    for c in ("a", "b", "c", "d"):
        (tmp_path / "img" / c).mkdir(parents=True)
        Image.new("RGB", (8, 8), (40, 80, 120)).save(tmp_path / "img" / c / "0.png")
    assert main(["train", str(RECIPE), "--out", str(tmp_path / "run"), "--steps", "1", "--set", "train.batch_size=4",
                 "--set", "data.dataset=image_folder", "--set", f"data.root={tmp_path / 'img'}",
                 "--set", "train.sample_every=0"]) == 0
    out = capsys.readouterr().out
    assert "note: data.size is set, but dataset 'image_folder' does not read it" in out
    assert "data.image_size is set" not in out  # image folders read it


def test_learning_rate_settings_that_do_nothing_get_a_note(tmp_path, capsys):
    assert main(["train", str(RECIPE), "--out", str(tmp_path / "run"), "--steps", "1", "--set", "train.warmup_steps=40",
                 "--set", "train.steps=30", "--set", "train.min_lr=1e-5", "--set", "train.sample_every=0"]) == 0
    out = capsys.readouterr().out
    assert ("note: train.warmup_steps 40 is not below the run's last step 30: the learning rate never reaches "
            "train.lr (its last update runs at 0.72 x lr)") in out
    assert "note: train.min_lr is set, but lr_schedule is constant" in out
    # --steps stops a part of the run: a warm-up past it but within train.steps is reached on resume
    assert main(["train", str(RECIPE), "--out", str(tmp_path / "run2"), "--steps", "1", "--set", "train.warmup_steps=5",
                 "--set", "train.steps=30", "--set", "train.sample_every=0"]) == 0
    assert "warmup_steps" not in capsys.readouterr().out
    # update k runs at lr·k/warmup: 5 steps of a 5-step warm-up never reach lr (said), and a constant schedule run
    # past train.steps with --steps does (it was told it never would)
    assert main(["train", str(RECIPE), "--out", str(tmp_path / "run3"), "--steps", "5", "--set", "train.warmup_steps=5",
                 "--set", "train.steps=5", "--set", "train.sample_every=0"]) == 0
    assert "train.warmup_steps 5 is not below the run's last step 5" in capsys.readouterr().out
    assert main(["train", str(RECIPE), "--out", str(tmp_path / "run4"), "--steps", "8", "--set", "train.warmup_steps=5",
                 "--set", "train.steps=3", "--set", "train.sample_every=0"]) == 0
    assert "warmup_steps" not in capsys.readouterr().out


def test_a_min_lr_above_the_default_lr_is_refused_as_above_a_written_one():
    """min_lr 1e-3 with lr left to its default (1e-4) made a cosine 'decay' climb from 1e-4 to 9.8e-4; written out,
    the same lr was refused."""
    with pytest.raises(zoo.errors.UserError, match=r"min_lr 0.001 is above lr 0.0001"):
        zoo.load_recipe({"model": {"type": "dit", "input_size": 8, "patch_size": 2, "hidden_size": 32, "depth": 1,
                                   "num_heads": 2},
                         "train": {"lr_schedule": "cosine", "min_lr": 1e-3, "steps": 10}})


def test_whole_number_betas_train(tmp_path):
    """YAML reads `betas: [0.9, 0]` as a float and an int, which torch's AdamW refused with a traceback."""
    records = train(recipe("train.betas=[0.9, 0]", "train.steps=2"), tmp_path, log=QUIET)
    assert len(records) >= 1 and all(r["loss"] > 0 for r in records)


def test_the_largest_seed_the_recipe_allows_trains(tmp_path):
    """train.seed takes any value up to 2**56 - 1 (the per-sample seeds keep 56 bits): every generator seeded from
    it works."""
    train(recipe(f"train.seed={2**56 - 1}", "train.ckpt_every=0", "train.sample_every=0"), tmp_path, steps=2, log=QUIET)
    assert torch.load(tmp_path / "last" / "trainer_state.pt", weights_only=True)["step"] == 2


def test_a_recipe_without_train_steps_is_refused_not_saved_untrained(tmp_path, capsys):
    pixels = Path(__file__).parent / "recipes" / "tiny_dit_pixels.yaml"  # no train.steps
    assert main(["train", str(pixels), "--out", str(tmp_path / "run"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train.steps is not set (or 0), so there is nothing to train" in err
    assert "--set train.steps=N" in err and not (tmp_path / "run").exists()
    with pytest.raises(zoo.errors.UserError, match="key train.sample_n"):
        recipe("train.sample_n=0")


def test_a_sample_solver_that_cannot_work_is_refused_before_the_first_step(tmp_path, capsys):
    """It stopped the run at its first evaluation without saving, or made every grid a warning."""
    for keys in (["train.sample_every=2"], ["train.sample_every=0", "train.eval_every=2", "train.eval_n=8"]):
        argv = ["train", str(RECIPE), "--out", str(tmp_path / "run"), "--set", "sample.solver={type: dpm_solver++, steps: 1}"]
        assert main(argv + [x for k in keys for x in ("--set", k)]) == 2
        err = capsys.readouterr().err
        assert err == ("zoo: error: key sample.solver: multistep DPM-Solver of order 2 needs steps >= 2, got 1 "
                       "(--set sample.solver.order=1 for 1 step)\n")
        assert not (tmp_path / "run").exists()
    # no grids and no evaluations: the sample section is not the run's business
    assert main(["train", str(RECIPE), "--out", str(tmp_path / "run"), "--steps", "1", "--set", "train.sample_every=0",
                 "--set", "sample.solver={type: dpm_solver++, steps: 1}"]) == 0


def _step_of(directory):
    return torch.load(directory / "trainer_state.pt", weights_only=True)["step"]


def test_readers_of_a_run_take_the_step_dir_saved_after_last_as_the_resume_does(tmp_path, capsys):
    """After a kill between a step's two saves, --resume RUN continued from step_4 while zoo sample, eval,
    compare and export RUN read the older last/ (step 2), without a word."""
    import shutil

    from zoo.checkpoint import checkpoint_of

    run = tmp_path / "run"
    assert main(["train", str(RECIPE), "--out", str(run), "--set", "train.ckpt_every=2", "--set",
                 "train.sample_every=0", "--steps", "4"]) == 0
    assert checkpoint_of(run) == run / "last"  # the step_0000004/ of the same step was sealed first
    shutil.rmtree(run / "last")
    shutil.copytree(run / "step_0000002", run / "last")  # a kill after step_0000004/ was sealed, before last/
    assert checkpoint_of(run) == run / "step_0000004" and checkpoint_of(run / "last") == run / "last"
    grids = {}
    for source in (run, run / "step_0000004", run / "last"):
        out = tmp_path / f"{source.name}.png"
        assert main(["sample", str(source), "--n", "2", "--steps", "2", "--out", str(out)]) == 0
        grids[source.name] = out.read_bytes()
    assert grids["run"] == grids["step_0000004"] != grids["last"]
    capsys.readouterr()
    assert main(["compare", str(run), "--no-time", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["run"]["step"] == 4


def test_a_resume_takes_a_step_dir_saved_after_last_or_complete_where_last_is_not(tmp_path, capsys):
    """last/ is saved after step_N/: a kill between them resumed from the older last/. A truncated
    last/ stopped every `--resume auto` restart, with no word of the complete step_*/ beside it."""
    import shutil

    run = tmp_path / "run"
    base = ["train", str(RECIPE), "--out", str(run), "--set", "train.ckpt_every=2", "--set", "train.sample_every=0",
            "--set", "train.steps=6"]
    assert main(base + ["--steps", "4"]) == 0
    # the state of a kill after step_0000004 was sealed and before last/ was: last/ still holds step 2
    shutil.rmtree(run / "last")
    shutil.copytree(run / "step_0000002", run / "last")
    capsys.readouterr()
    assert main(base + ["--resume", "auto", "--steps", "5"]) == 0
    out = capsys.readouterr().out
    assert f"note: step_0000004 was saved after last/ (the run was stopped between the two saves): resuming from " \
           f"{run / 'step_0000004'}" in out and "resumed from" in out and _step_of(run / "last") == 5
    # a truncated last/: the newest complete step_*/ is taken, and an explicit --resume RUN/last names it
    with open(run / "last" / "model.safetensors", "r+b") as f:
        f.truncate(100)
    assert main(base + ["--resume", str(run / "last")]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint {run / 'last'} is incomplete: model.safetensors has 100 bytes" in err
    assert f"({run / 'step_0000005'} is the run's newest complete checkpoint)" in err  # --steps 5 saved it too
    assert main(base + ["--resume", "auto"]) == 0
    assert f"{run / 'last'} is incomplete (model.safetensors has 100 bytes" in capsys.readouterr().out
    assert _step_of(run / "last") == 6
    # last/ without its config.json (deleted by hand): "not a zoo checkpoint", with no way on; now the
    # newest complete step_*/ is named, and last/ (which zoo cannot tell from a user's) is left to the user
    (run / "last" / "config.json").unlink()
    assert main(base + ["--resume", str(run), "--set", "train.steps=7"]) == 2
    assert f"{run / 'last'} has no config.json, so it is no complete checkpoint ({run / 'step_0000006'} is the " \
           f"run's newest complete checkpoint) (move {run / 'last'} away and resume with --resume " \
           f"{run / 'step_0000006'})" in capsys.readouterr().err
    shutil.move(run / "last", tmp_path / "old_last")
    assert main(base + ["--resume", str(run / "step_0000006"), "--set", "train.steps=7"]) == 0
    assert _step_of(run / "last") == 7


def test_a_last_that_is_not_a_checkpoint_is_no_run_and_is_not_replaced(tmp_path, capsys):
    """`last` holding the user's notes was 'a run (last/) ... continue it with --resume', which then failed."""
    (tmp_path / "last").mkdir()
    (tmp_path / "last" / "notes.txt").write_text("mine")
    assert main(["train", str(RECIPE), "--out", str(tmp_path), "--steps", "1", "--set", "train.sample_every=0"]) == 2
    err = capsys.readouterr().err
    assert "--resume" not in err and f"{tmp_path / 'last'}" in err and "not a zoo checkpoint" in err
    assert (tmp_path / "last" / "notes.txt").read_text() == "mine"


def test_weights_an_update_made_infinite_are_not_saved(tmp_path, capsys):
    """A learning rate near float32's range: the loss and gradient of step 1 were finite, the update was
    not, and last/ 'the last finite checkpoint' held 40k infinite weights."""
    argv = ["train", str(RECIPE), "--out", str(tmp_path), "--set", "train.lr=1e39", "--set", "train.warmup_steps=0",
            "--set", "train.ckpt_every=1", "--set", "train.sample_every=0", "--set", "train.steps=3"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "a weight is not finite at step 1; stopped without saving it (no checkpoint was written)" in err
    assert "Lower train.lr (clipping cannot help" in err and "set train.grad_clip" not in err  # it cannot bound a step
    assert not (tmp_path / "last").exists()


def test_a_directory_given_as_the_recipe_is_named_as_such(tmp_path, capsys):
    assert main(["train", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (f"zoo: error: recipe {tmp_path} is a directory, not a recipe file "
                                       "(give a recipe's .yaml file)\n")


def test_flipping_plain_latents_is_said_at_the_start(tmp_path, capsys):
    """data.random_flip on latent shards without mirrored encodings flipped the latents silently."""
    latent = Path(__file__).parent / "recipes" / "tiny_dit_latent.yaml"
    base = ["--steps", "1", "--set", "train.sample_every=0", "--set", "data.image_size=8"]  # synthetic latents
    for flip, said in (("true", True), ("false", False)):
        assert main(["train", str(latent), "--out", str(tmp_path / flip), *base, "--set",
                     f"data.random_flip={flip}"]) == 0
        assert ("note: data.random_flip mirrors the latents themselves" in capsys.readouterr().out) == said


def test_a_resume_that_spells_out_a_default_reports_no_change_and_a_real_change_from_the_default(tmp_path):
    """A checkpoint that never set lr_schedule or min_lr read as None: spelling out the defaults on a resume
    was noted as 'train.lr_schedule (None -> 'constant'), train.min_lr (None -> 0)'."""
    recipe = zoo.load_recipe(RECIPE, ["train.sample_every=0", "train.log_every=1"])
    train(recipe, tmp_path, steps=1, log=lambda *_: None)
    lines = []
    spelled = zoo.load_recipe(RECIPE, ["train.sample_every=0", "train.log_every=1", "train.lr_schedule=constant",
                                       "train.min_lr=0"])
    train(spelled, tmp_path, steps=2, resume=tmp_path, log=lines.append)
    assert not [line for line in lines if "differs from the checkpoint's" in line]
    lines.clear()
    decaying = zoo.load_recipe(RECIPE, ["train.sample_every=0", "train.log_every=1", "train.lr_schedule=linear",
                                        "train.min_lr=1e-5"])
    train(decaying, tmp_path, steps=3, resume=tmp_path, log=lines.append)
    (note,) = [line for line in lines if "differs from the checkpoint's" in line]
    assert "train.lr_schedule ('constant' -> 'linear'), train.min_lr (0 -> 1e-05)" in note


def test_a_folder_of_fewer_classes_than_the_model_records_the_trained_ones(tmp_path, capsys):
    """A 2-class folder under a 4-class recipe trained labels 0..1 only, silently; zoo eval then drew half its
    samples from labels no image carried and zoo sample --class 3 was accepted. The run says so and records
    data.num_classes 2, which sampling and evaluation draw from; the caller's recipe is left as given."""
    from PIL import Image

    from zoo.checkpoint import read_config

    for c in ("a", "b"):
        (tmp_path / "img" / c).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (12, 12), (60 * i, 200 * (c == "a"), 30)).save(tmp_path / "img" / c / f"{i}.png")
    r = recipe("data.dataset=image_folder", f"data.root={tmp_path / 'img'}", "train.sample_every=0",
               "train.batch_size=4")
    lines = []
    train(r, tmp_path / "run", steps=1, log=lines.append)
    assert "zoo train: note: the data has 2 classes and the model 4: labels 2..3 are never trained" in "\n".join(lines)
    assert read_config(tmp_path / "run" / "last")["data"]["num_classes"] == 2 and r["data"]["num_classes"] == 4
    assert main(["sample", str(tmp_path / "run"), "--class", "3", "--steps", "2", "--out", str(tmp_path / "s.png")]) == 2
    assert "class label 3 (--class) is not a class of this model (0..1)" in capsys.readouterr().err


def test_a_data_worker_the_system_kills_stops_the_run_in_one_line_with_last_saved(tmp_path, monkeypatch, capsys):
    """A DataLoader worker killed by the out-of-memory killer ended the run with PyTorch's SIGCHLD traceback
    ('DataLoader worker (pid N) is killed by signal: Killed'), raised wherever the main process was, exit 1,
    and the steps since the last save were lost."""
    import multiprocessing
    import os
    import signal

    from zoo.training.loop import Trainer

    real = Trainer.train_step

    def kill_a_worker_in_step_2(self, x, y):
        loss = real(self, x, y)
        if self.step == 1:
            for child in multiprocessing.active_children():
                os.kill(child.pid, signal.SIGKILL)
        return loss

    monkeypatch.setattr(Trainer, "train_step", kill_a_worker_in_step_2)
    run = tmp_path / "run"
    assert main(["train", str(RECIPE), "--out", str(run), "--set", "data.num_workers=1", "--set",
                 "train.sample_every=0", "--set", "train.ckpt_every=0", "--set", "train.steps=50"]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("zoo: error: a data-loading worker died (pid ") and "killed by SIGKILL" in err, err
    assert err.count("\n") == 1 and "lower data.num_workers" in err and f"then go on with --resume {run}" in err
    step = torch.load(run / "last" / "trainer_state.pt", weights_only=True)["step"]
    assert 2 <= step < 50 and f"stopping at step {step} (the data could not be read)" in out


def test_the_seed_a_run_used_is_in_its_config_even_when_the_recipe_left_it_out(tmp_path):
    """config.json keeps the recipe as given: a recipe without train.seed stored none, so reproducing a run
    from its directory relied on the default never changing."""
    recipe = zoo.load_recipe(Path(__file__).parent / "recipes" / "tiny_dit_pixels.yaml",
                             ["train.sample_every=0", "train.batch_size=4"])
    assert "seed" not in recipe["train"]
    train(recipe, tmp_path / "run", steps=1, log=lambda *_: None)
    assert ckpt.read_config(tmp_path / "run" / "last")["train"]["seed"] == 0
    assert "seed" not in recipe["train"]  # the caller's recipe is not changed


def test_a_sample_grid_is_the_one_zoo_sample_draws_from_that_checkpoint(tmp_path):
    """The grids drew with seed 0 whatever the recipe's sample.seed, which zoo sample reads: a run's grid
    could not be drawn again from its checkpoint."""
    import numpy as np
    from PIL import Image

    recipe = Path(__file__).parent / "recipes" / "tiny_train.yaml"
    out = tmp_path / "run"
    args = ["train", str(recipe), "--out", str(out), "--steps", "2", "--set", "train.sample_every=2",
            "--set", "train.sample_n=4", "--set", "train.ckpt_every=2", "--set", "sample.seed=7"]
    assert main(args) == 0
    assert main(["sample", str(out / "step_0000002"), "--n", "4", "--out", str(tmp_path / "again.png")]) == 0
    assert main(["sample", str(out / "step_0000002"), "--n", "4", "--seed", "0", "--out", str(tmp_path / "s0.png")]) == 0
    grid, again, seed0 = (np.asarray(Image.open(p)) for p in (out / "samples" / "step_0000002.png",
                                                               tmp_path / "again.png", tmp_path / "s0.png"))
    assert (grid == again).all() and not (grid == seed0).all()


def test_a_sampler_its_checkpoints_could_not_use_is_refused_before_the_first_step(tmp_path, capsys):
    """A learned variance on a model without one, or guidance without a null label, trained on with a warning
    at every grid (no grid drawn), and zoo sample then refused the run's checkpoints; zoo build refused them."""
    base = ["--set", "train.sample_every=2", "--set", "train.steps=2"]
    for extra, words in ((["--set", "sample.solver={type: ddpm, steps: 5, variance: learned}"],
                          "key sample.solver.variance: ddpm variance 'learned' reads the model's variance output"),
                         (["--set", "model.class_dropout_prob=0", "--set", "diffusion.label_drop=0",
                           "--set", "diffusion.null_label=null", "--set", "sample.cfg={scale: 1.5}"],
                          "key diffusion.null_label: classifier-free guidance (scale 1.5, dit convention) needs the "
                          "null label")):
        for command in (["train", str(RECIPE), "--out", str(tmp_path / "run"), *base], ["build", str(RECIPE)]):
            assert main(command + extra) == 2
            assert words in capsys.readouterr().err
        assert not (tmp_path / "run").exists()


def test_a_recipe_without_a_model_is_named_by_its_file_in_train_and_sample(tmp_path, capsys):
    """zoo train and zoo sample said '<recipe dict>: key model: ...' of a file without a model section."""
    base = tmp_path / "no_model.yaml"
    base.write_text("train: {steps: 1}\n")
    for argv in (["train", str(base), "--out", str(tmp_path / "run")], ["sample", str(base), "--n", "1"]):
        assert main(argv) == 2
        assert capsys.readouterr().err == (f"zoo: error: {base}: key model: the recipe has no model section "
                                           "(add model: {type: NAME, ...})\n")


def test_a_recipe_made_unconditional_says_which_label_settings_it_no_longer_uses(tmp_path, capsys):
    """--set model.num_classes=0 on a class-conditional U-ViT recipe trained and sampled without a word: the
    data's labels, the label dropout, the null label and the guidance scale were dropped silently."""
    from zoo.training.loop import unconditional_note

    uvit = Path(__file__).parents[1] / "recipes" / "emoji32" / "uvit.yaml"
    note = unconditional_note(zoo.load_recipe(uvit, ["model.num_classes=0"]))
    assert note == ("model.num_classes 0 makes the model unconditional: data.num_classes 9 (the data's labels), "
                    "diffusion.label_drop 0.1, diffusion.null_label 9, sample.cfg.scale 1 (guidance) are not used")
    assert unconditional_note(zoo.load_recipe(uvit)) is None  # conditional: nothing to say
    plain = ["model.num_classes=0", "data.num_classes=null", "diffusion.label_drop=0", "diffusion.null_label=null"]
    assert unconditional_note(zoo.load_recipe(uvit, plain + ["sample.cfg.scale=0"])) is None  # 0: U-ViT's "off"
    assert unconditional_note(zoo.load_recipe(uvit, plain)).endswith(": sample.cfg.scale 1 (guidance) is not used")
    synthetic = ["--set", "data.dataset=synthetic", "--set", "data.size=8", "--set", "model.depth=2",
                 "--set", "model.embed_dim=16", "--set", "train.batch_size=4", "--set", "train.sample_every=0",
                 "--set", "train.val_every=0", "--set", "model.num_classes=0"]
    assert main(["train", str(uvit), "--out", str(tmp_path / "run"), "--steps", "1", *synthetic]) == 0
    assert "zoo train: note: model.num_classes 0 makes the model unconditional: data.num_classes 9" in capsys.readouterr().out


def test_the_unconditional_note_names_a_null_label_0_and_reads_guidance_as_dits():
    """diffusion.null_label 0 is a value the unconditional model no longer uses (a truthiness test skipped it),
    and sample.cfg without a convention is DiT's (scale 1 is guidance off), not U-ViT's (scale 1 guides)."""
    from zoo.training.loop import unconditional_note

    uvit = Path(__file__).parents[1] / "recipes" / "emoji32" / "uvit.yaml"
    plain = ["model.num_classes=0", "data.num_classes=null", "diffusion.label_drop=0"]
    assert unconditional_note(zoo.load_recipe(uvit, plain + ["diffusion.null_label=0", "sample.cfg.scale=0"])) == (
        "model.num_classes 0 makes the model unconditional: diffusion.null_label 0 is not used")
    no_convention = zoo.load_recipe(uvit, plain + ["diffusion.null_label=null", "sample.cfg={scale: 1.0}"])
    assert "convention" not in no_convention["sample"]["cfg"]
    assert unconditional_note(no_convention) is None


def test_a_stop_that_cuts_the_resumes_catch_up_short_stops_at_that_step_again(tmp_path, monkeypatch, capsys,
                                                                              terminal_sigint):
    """The grid a resume draws for its step (lost to a kill), cut short by a Ctrl-C: the run trained a step
    further before stopping, and the grid was lost for good."""
    argv = ["train", str(RECIPE), "--out", str(tmp_path), "--set", "train.ckpt_every=2", "--set", "train.steps=6",
            "--set", "train.sample_every=2", "--set", "train.sample_n=4"]
    assert main(argv + ["--steps", "2"]) == 0
    (tmp_path / "samples" / "step_0000002.png").unlink()  # as a kill after step 2's save leaves it
    _sigint_when_the_ema_is_copied(monkeypatch)  # the Ctrl-C comes as the resume starts step 2's grid
    capsys.readouterr()
    assert main(argv + ["--resume", str(tmp_path)]) == 130
    assert "the sample grid of step 2 was cut short by SIGINT; the run stops now" in capsys.readouterr().out
    assert torch.load(tmp_path / "last" / "trainer_state.pt", weights_only=True)["step"] == 2
    monkeypatch.undo()
    assert main(argv + ["--resume", str(tmp_path), "--steps", "3"]) == 0
    assert (tmp_path / "samples" / "step_0000002.png").is_file()
