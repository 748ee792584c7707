"""``zoo compare RUN...``: trained runs beside recipes, with the step, loss, validation loss and FD they recorded."""

import json
import math
import os
from pathlib import Path

import pytest
from PIL import Image

import zoo
from zoo.cli import main
from zoo.compare import format_table, measure
from zoo.training import train

from pool_extractors import Pool4

RECIPE = Path(__file__).parent / "recipes" / "tiny_train.yaml"  # DiT on 8x8 synthetic pixels, 4 classes, ddim 5
SETTINGS = ["train.log_every=1", "train.sample_every=0", "train.ckpt_every=10", "train.val_every=5", "train.val_n=8",
            "train.eval_every=5", "train.eval_n=8", "train.eval_extractor=test_pool4"]


@pytest.fixture(autouse=True)
def _setup(isolated_eval, one_thread, register_extractor):
    register_extractor("test_pool4", Pool4)


@pytest.fixture
def run(tmp_path) -> Path:
    out = tmp_path / "run"
    train(zoo.load_recipe(RECIPE, SETTINGS), out, steps=20, log=lambda *_: None)
    return out


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def _compare_json(capsys, *args: str) -> tuple[list[dict], str]:
    """The --json rows of ``zoo compare ARGS --no-time`` and what it wrote to stderr."""
    assert main(["compare", *args, "--no-time", "--json"]) == 0
    captured = capsys.readouterr()
    return json.loads(captured.out), captured.err


def test_a_run_is_its_recipe_plus_the_figures_its_log_recorded(run, capsys):
    (recipe_row, run_row), _ = _compare_json(capsys, str(RECIPE), str(run))
    assert run_row["params"] == recipe_row["params"] == sum(p.numel() for p in zoo.build_model(RECIPE).parameters())
    assert "run" not in recipe_row  # a recipe's row keeps exactly the contract keys
    records = _records(run)
    losses = {r["step"]: r["loss"] for r in records if "loss" in r}
    vals = [r for r in records if "val_loss" in r]
    fds = [r for r in records if "fd" in r]
    assert [r["step"] for r in vals] == [r["step"] for r in fds] == [5, 10, 15, 20]
    summary = run_row["run"]
    assert summary["checkpoint"] == str(run / "last") and summary["step"] == 20
    assert summary["loss"] == pytest.approx((losses[19] + losses[20]) / 2, rel=1e-12)  # steps 18 < s <= 20
    assert summary["val_loss"] == vals[-1]["val_loss"]
    assert (summary["fd"], summary["fd_n"], summary["fd_extractor"]) == (fds[-1]["fd"], 8, "test_pool4")
    assert summary["fd_reference"] == "synthetic:train (64 images)" and "(step 20)" in summary["fd_source"]


def test_a_step_checkpoint_is_compared_at_its_own_step(run, capsys):
    (row,), _ = _compare_json(capsys, str(run / "step_0000010"))
    records = _records(run)
    summary = row["run"]
    assert summary["step"] == 10
    assert summary["loss"] == next(r["loss"] for r in records if r["step"] == 10 and "loss" in r)  # 9 < s <= 10
    assert summary["val_loss"] == next(r["val_loss"] for r in records if r["step"] == 10 and "val_loss" in r)
    assert summary["fd"] == next(r["fd"] for r in records if r["step"] == 10 and "fd" in r)


def test_a_zoo_eval_result_of_these_weights_is_preferred_and_one_of_older_weights_is_not(run, capsys):
    assert main(["eval", str(run), "--n", "12", "--ref", "synthetic", "--extractor", "test_pool4"]) == 0
    assert main(["eval", str(run), "--n", "8", "--ref", "synthetic", "--extractor", "test_pool4", "--seed", "3"]) == 0
    capsys.readouterr()
    results = sorted((run / "eval").glob("last-*.json"))
    by_n = {json.loads(p.read_text())["n"]: p for p in results}
    assert set(by_n) == {8, 12}
    smaller = json.loads(by_n[8].read_text())  # the newer one: only "the most samples" picks n=12
    by_n[8].write_text(json.dumps({**smaller, "time": "2999-01-01T00:00:00Z"}))
    (row,), _ = _compare_json(capsys, str(run))
    summary = row["run"]
    best = json.loads(by_n[12].read_text())
    assert (summary["fd"], summary["fd_n"], summary["fd_source"]) == (best["metrics"]["fd"], 12, str(by_n[12]))
    assert summary["fd_reference"] == "synthetic" and summary["fd_weights"] == "ema"
    assert summary["fd_sampler"] == "ddim clip_denoised=False eta=0 steps=5, no guidance"  # the recipe's sampler
    # step_0000020 holds the same weights as last/ (same bytes): the result of last/ is its result too
    (step,), _ = _compare_json(capsys, str(run / "step_0000020"))
    assert step["run"]["fd"] == best["metrics"]["fd"] and step["run"]["step"] == 20
    # raw weights scored with more samples: an EMA result still comes first
    assert main(["eval", str(run), "--n", "16", "--ref", "synthetic", "--extractor", "test_pool4", "--weights", "raw"]) == 0
    capsys.readouterr()
    (row,), _ = _compare_json(capsys, str(run))
    assert (row["run"]["fd"], row["run"]["fd_n"], row["run"]["fd_weights"]) == (best["metrics"]["fd"], 12, "ema")

    # Two more steps replace last/: the results were of its earlier weights, so the log's FD stands
    train(zoo.load_recipe(RECIPE, SETTINGS), run, steps=22, resume=run, log=lambda *_: None)
    (row,), _ = _compare_json(capsys, str(run))
    fds = [r for r in _records(run) if "fd" in r]
    assert row["run"]["step"] == 22 and row["run"]["fd"] == fds[-1]["fd"] and "(step 20)" in row["run"]["fd_source"]
    assert row["run"]["fd_sampler"] == summary["fd_sampler"]  # the eval_every FD sampled as zoo eval's default does


def test_fds_of_different_protocols_get_a_note(run, tmp_path, capsys):
    other = tmp_path / "other"
    train(zoo.load_recipe(RECIPE, SETTINGS), other, steps=5, log=lambda *_: None)
    # both: the log's FD at n=8 with test_pool4
    assert "the FDs were measured differently" not in _compare_json(capsys, str(run), str(other))[1]
    assert main(["eval", str(other), "--n", "12", "--ref", "synthetic", "--extractor", "test_pool4"]) == 0
    capsys.readouterr()
    err = _compare_json(capsys, str(run), str(other))[1]
    assert "the FDs were measured differently" in err and "n=12" in err and "n=8" in err
    # the same N by another sampler: still not comparable
    assert main(["eval", str(run), "--n", "12", "--ref", "synthetic", "--extractor", "test_pool4", "--steps", "3"]) == 0
    capsys.readouterr()
    err = _compare_json(capsys, str(run), str(other))[1]
    assert "the FDs were measured differently" in err and "steps=3, no guidance" in err and "steps=5" in err


def test_fds_sampled_at_another_precision_or_with_other_labels_get_a_note(run, tmp_path, capsys):
    """zoo eval keys samples of another precision or label draw apart, but zoo compare showed both FDs with one
    sampler text and no note: everything in the protocol that changes the images counts."""
    other = tmp_path / "other"
    train(zoo.load_recipe(RECIPE, SETTINGS), other, steps=5, log=lambda *_: None)
    ev = ["--n", "8", "--ref", "synthetic", "--extractor", "test_pool4", "--device", "cpu"]
    assert main(["eval", str(run), *ev]) == 0
    assert main(["eval", str(other), *ev]) == 0
    capsys.readouterr()
    rows, err = _compare_json(capsys, str(run), str(other))
    assert "measured differently" not in err  # one protocol, two runs
    assert rows[0]["run"]["fd_classes"] == rows[1]["run"]["fd_classes"] == 4

    def compared_after_eval_of_other(*extra: str) -> tuple[dict, str]:
        for result in (other / "eval").glob("last-*.json"):  # the result compared is the one left
            result.unlink()
        assert main(["eval", str(other), *ev, *extra]) == 0
        capsys.readouterr()
        (_, row), err = _compare_json(capsys, str(run), str(other))
        return row, err

    row, err = compared_after_eval_of_other("--precision", "bf16")
    assert "the FDs were measured differently" in err and row["run"]["fd_sampler"].endswith("no guidance, bf16")
    row, err = compared_after_eval_of_other("--set", "sample.labels=balanced")
    assert "the FDs were measured differently" in err and row["run"]["fd_sampler"].endswith("balanced labels")
    row, err = compared_after_eval_of_other("--set", "data.num_classes=2")  # labels of 2 of the 4 classes
    assert "the FDs were measured differently" in err and "2 classes" in err and row["run"]["fd_classes"] == 2


def test_the_table_adds_the_run_columns_only_when_a_row_is_a_run(run):
    rows = measure([str(RECIPE), str(run)], time_it=False)
    table = format_table(rows)
    head, _, recipe_line, run_line = table.splitlines()
    assert head.split()[-7:] == ["step", "loss", "val", "loss", "FD", "FD", "n"]
    assert run_line.split()[-5:] == ["20", f"{rows[1].run.loss:.4f}", f"{rows[1].run.val_loss:.4f}",
                                     f"{rows[1].run.fd:.2f}", "8"]
    assert recipe_line.split()[-5:] == ["-"] * 5
    assert "val loss" not in format_table(rows[:1])
    assert math.isfinite(rows[1].run.loss)


def test_a_directory_that_is_no_run_says_what_it_needs(tmp_path, run, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["compare", str(empty), "--no-time"]) == 2
    err = capsys.readouterr().err
    assert "neither a zoo train run (with last/) nor a checkpoint" in err and "Traceback" not in err
    # a folder of runs: they are named, to be passed one by one
    assert main(["compare", str(run.parent), "--no-time"]) == 2
    assert f"it holds the runs run: pass them, e.g. {run.parent / '*'}/" in capsys.readouterr().err


def test_a_runs_model_section_is_not_overridden(run, capsys):
    """--set model.depth=3 made the run's row describe another model than its weights, beside its own loss and FD."""
    assert main(["compare", str(run), "--set", "model.depth=3", "--no-time"]) == 2
    err = capsys.readouterr().err
    assert "is a run or checkpoint: its model section is fixed by its weights" in err and "Traceback" not in err
    assert main(["compare", str(RECIPE), str(run), "--set", "train.precision=bf16", "--no-time"]) == 0  # others apply


def test_a_run_killed_after_its_last_save_is_compared_at_that_save(run, capsys):
    """last/ is saved every ckpt_every steps and the log every log_every: a run killed at step 25 logged five
    steps its last/ (step 20) does not hold, and the row gave step 25 and their losses beside last/'s FD."""
    (expected,), _ = _compare_json(capsys, str(run))
    with open(run / "log.jsonl", "a") as log:
        for step in range(21, 26):
            log.write(json.dumps({"step": step, "loss": 100.0, "lr": 1e-3}) + "\n")
    (row,), _ = _compare_json(capsys, str(run))
    assert row["run"]["step"] == 20 and row["run"]["loss"] == expected["run"]["loss"]


def test_checkpoints_of_an_abandoned_branch_get_no_losses_of_the_new_one(run, capsys):
    """A resume from step_0000010 keeps the old branch's step_0000020 on disk and drops its records from the
    log: that checkpoint was given the new branch's loss (steps 11-12) as its own."""
    train(zoo.load_recipe(RECIPE, SETTINGS + ["train.lr=3e-3"]), run, steps=12, resume=run / "step_0000010",
          log=lambda *_: None, allow_recipe_change=True)
    (new, old), _ = _compare_json(capsys, str(run), str(run / "step_0000020"))
    records = _records(run)
    assert max(r["step"] for r in records) == 12
    assert new["run"]["step"] == 12 and new["run"]["loss"] == pytest.approx(
        sum(r["loss"] for r in records if r["step"] in (11, 12) and "loss" in r) / 2, rel=1e-12)  # 10.8 < s <= 12
    assert new["run"]["val_loss"] == next(r["val_loss"] for r in records if r["step"] == 10 and "val_loss" in r)
    assert old["run"]["step"] == 20 and (old["run"]["loss"], old["run"]["val_loss"], old["run"]["fd"]) == (None,) * 3


def test_the_eval_every_reference_is_named_and_two_of_them_get_the_note(run, tmp_path, capsys):
    """Both rows said 'train.eval_every' for FDs against different references (271 against 68), unnoted."""
    (row,), _ = _compare_json(capsys, str(run))
    fd_record = [r for r in _records(run) if "fd" in r][-1]
    assert row["run"]["fd_reference"] == fd_record["fd_ref"] == "synthetic:train (64 images)"
    other = tmp_path / "other"
    ref = run / "eval" / "fd_reference.npz"
    train(zoo.load_recipe(RECIPE, SETTINGS + [f"train.eval_ref={ref}"]), other, steps=5, log=lambda *_: None)
    (_, second), err = _compare_json(capsys, str(run), str(other))
    assert second["run"]["fd_reference"] == str(ref) and "the FDs were measured differently" in err
    # a log written before the records named their reference: the recipe says what it was
    lines = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    (run / "log.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if k not in ("fd_ref", "fd_ref_key")})
                                           + "\n" for r in lines))
    (row,), _ = _compare_json(capsys, str(run))
    assert row["run"]["fd_reference"] == "synthetic (the run's own data: its holdout split, else its training images)"
    assert row["run"]["fd_reference_key"].endswith(", images read as before 2026-12-07")  # such a log's zoo may have


def test_eval_every_references_of_one_description_but_other_images_get_the_note(run, tmp_path, capsys):
    """Two runs on two image folders both compared with "image_folder:train (16 images)": the words are
    equal, the statistics not, and their FDs were set side by side unnoted. Each record carries a hash of
    how its statistics were made (data, image size, subset seed, extractor; not the trainer's flips)."""
    same, seeded = tmp_path / "same", tmp_path / "seeded"
    train(zoo.load_recipe(RECIPE, SETTINGS + ["data.random_flip=false"]), same, steps=5,  # flips: the same images
          log=lambda *_: None)
    train(zoo.load_recipe(RECIPE, SETTINGS + ["train.seed=1"]), seeded, steps=5, log=lambda *_: None)  # other images
    rows, err = _compare_json(capsys, str(run), str(same))
    assert rows[0]["run"]["fd_reference_key"] == rows[1]["run"]["fd_reference_key"]
    assert rows[0]["run"]["fd_reference_key"].startswith("statistics ") and "measured differently" not in err
    rows, err = _compare_json(capsys, str(run), str(seeded))
    assert rows[0]["run"]["fd_reference"] == rows[1]["run"]["fd_reference"] == "synthetic:train (64 images)"
    assert rows[0]["run"]["fd_reference_key"] != rows[1]["run"]["fd_reference_key"]
    assert "the FDs were measured differently" in err and "(statistics " in err


def test_records_older_than_their_period_before_the_checkpoint_are_not_taken(run, capsys):
    """The step-20 checkpoint's val loss and FD are those of step 20 (val_every = eval_every = 5): when that
    evaluation failed (logged as null), step 15's is 5 steps older than the weights, not theirs."""
    lines = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    (run / "log.jsonl").write_text("".join(json.dumps({**r, **{k: None for k in ("fd", "val_loss") if k in r}}
                                                      if r["step"] == 20 else r) + "\n" for r in lines))
    (row,), _ = _compare_json(capsys, str(run))
    assert (row["run"]["step"], row["run"]["val_loss"], row["run"]["fd"]) == (20, None, None)
    (row,), _ = _compare_json(capsys, str(run / "step_0000010"))  # its own records, within the window
    assert row["run"]["val_loss"] is not None and row["run"]["fd"] is not None


@pytest.mark.parametrize("field, value", [("fd_n", "8"), ("fd_n", 0), ("fd_ref", 7), ("fd_extractor", ["x"]),
                                          ("fd_ref_key", 3)])
def test_an_fd_record_of_damaged_types_is_skipped(run, capsys, field, value):
    """A hand-edited "fd_n": "8" was a ValueError traceback (exit 1) in the table, "fd_ref": 7 a TypeError:
    such a record is skipped like an unreadable line, and the one before it in the window is taken."""
    lines = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    last = max(r["step"] for r in lines if "fd" in r)
    (run / "log.jsonl").write_text("".join(json.dumps({**r, field: value} if "fd" in r and r["step"] == last else r)
                                           + "\n" for r in lines))
    assert main(["compare", str(run), "--no-time"]) == 0  # the table, as the JSON
    capsys.readouterr()
    (row,), _ = _compare_json(capsys, str(run))
    assert row["run"]["fd"] is None  # the window of train.eval_every (5 steps) held that record only


def test_losses_of_other_diffusion_settings_get_a_note(run, tmp_path, capsys):
    """DiMR's multiscale loss (a sum over its branches, ~2) sat beside ε-MSEs (~1) unnoted: a run's losses
    are of its objective, prediction, Min-SNR weighting, time sampling and schedule, and runs that differ
    in one are said to be incomparable by loss."""
    weighted = tmp_path / "weighted"
    train(zoo.load_recipe(RECIPE, SETTINGS + ["diffusion.min_snr_gamma=5"]), weighted, steps=5, log=lambda *_: None)
    rows, err = _compare_json(capsys, str(run), str(weighted))
    assert rows[0]["run"]["loss_settings"] == {
        "objective": {"type": "eps_mse"}, "prediction": "eps", "min_snr_gamma": None, "time_sampling": {"type": "uniform"},
        "schedule": {"type": "linear", "num_steps": 1000, "beta_start": 0.0001, "beta_end": 0.02}}
    assert rows[1]["run"]["loss_settings"]["min_snr_gamma"] == 5
    assert "losses and val losses were computed under different diffusion settings" in err
    assert f"{run}: diffusion.min_snr_gamma=null\n  {weighted}: diffusion.min_snr_gamma=5" in err
    assert "diffusion.objective" not in err  # only what differs
    _, err = _compare_json(capsys, str(run), str(run / "step_0000010"))
    assert "diffusion settings" not in err


def test_loss_settings_written_otherwise_but_equal_get_no_note(capsys):
    """A schedule written {type: linear} beside the same schedule written out, min_snr_gamma 5 beside 5.0 and
    coeffs [0.25, 1] beside [0.25, 1.0] were 'not comparable' (their JSON text differed); a real difference
    still is."""
    from types import SimpleNamespace

    from zoo.commands.compare import note_loss_settings
    from zoo.run_summary import loss_settings

    def row(name, diffusion):
        return SimpleNamespace(recipe=name, run=SimpleNamespace(loss_settings=loss_settings({"diffusion": diffusion})))

    full = {"type": "linear", "num_steps": 1000, "beta_start": 1e-4, "beta_end": 0.02}
    note_loss_settings([row("a", {"schedule": {"type": "linear"}, "min_snr_gamma": 5,
                                  "objective": {"type": "multiscale", "coeffs": [0.25, 1]}}),
                        row("b", {"schedule": full, "min_snr_gamma": 5.0,
                                  "objective": {"type": "multiscale", "coeffs": [0.25, 1.0]}}),
                        row("c", {"min_snr_gamma": 5.0, "objective": {"type": "multiscale", "coeffs": [0.25, 1.0]}})])
    assert capsys.readouterr().err == ""
    note_loss_settings([row("a", {"schedule": {"type": "linear"}}), row("b", {"schedule": {**full, "beta_end": 0.03}})])
    err = capsys.readouterr().err
    assert "different diffusion settings" in err and "b: diffusion.schedule={type: linear, num_steps: 1000" in err


def test_an_objective_or_time_sampling_with_its_defaults_written_out_gets_no_note(capsys):
    """logit_normal beside {type: logit_normal, mean: 0.0, std: 1.0} (and hybrid_vlb beside its decoder_cdf tanh
    written out) train alike, yet the note called the runs' equal losses 'not comparable'; another mean still is."""
    from types import SimpleNamespace

    from zoo.commands.compare import note_loss_settings
    from zoo.run_summary import loss_settings

    def row(name, diffusion):
        return SimpleNamespace(recipe=name, run=SimpleNamespace(loss_settings=loss_settings({"diffusion": diffusion})))

    note_loss_settings([row("a", {"time_sampling": "logit_normal", "objective": "hybrid_vlb"}),
                        row("b", {"time_sampling": {"type": "logit_normal", "mean": 0.0, "std": 1.0},
                                  "objective": {"type": "hybrid_vlb", "decoder_cdf": "tanh", "vlb_weight": 1}})])
    assert capsys.readouterr().err == ""
    note_loss_settings([row("a", {"time_sampling": "logit_normal"}),
                        row("b", {"time_sampling": {"type": "logit_normal", "mean": 0.5}})])
    err = capsys.readouterr().err
    assert "different diffusion settings" in err and "b: diffusion.time_sampling={type: logit_normal, mean: 0.5" in err


def test_lines_of_a_log_that_are_not_records_are_skipped_by_compare_and_resume(run, capsys):
    """A line that was not UTF-8 was a UnicodeDecodeError traceback in compare and resume; a JSON line that
    was no object an AttributeError in resume."""
    from zoo.training.monitor import read_log

    (expected,), _ = _compare_json(capsys, str(run))
    with open(run / "log.jsonl", "ab") as log:
        log.write(b"\xff\xfe garbage\n[1, 2]\n{\"step\": true, \"loss\": 3}\n{\"loss\": 3}\n")
    assert len(read_log(run / "log.jsonl")) == len(_records_text_only(run))
    (row,), _ = _compare_json(capsys, str(run))
    assert row["run"] == expected["run"]
    assert main(["train", str(RECIPE), "--resume", str(run), "--out", str(run), "--steps", "21",
                 *[x for s in SETTINGS for x in ("--set", s)]]) == 0


def _records_text_only(run: Path) -> list[dict]:
    """The log's lines that are JSON objects with an integer step, read independently of read_log."""
    out = []
    for raw in (run / "log.jsonl").read_bytes().splitlines():
        try:
            rec = json.loads(raw.decode())
        except (UnicodeDecodeError, ValueError):
            continue
        if isinstance(rec, dict) and type(rec.get("step")) is int:
            out.append(rec)
    return out


def test_a_step_checkpoint_deleted_after_the_shell_listed_it_is_named_as_such(run, capsys):
    """A live run's train.keep_last deleted a step_* the glob had named: 'recipe file not found'."""
    assert main(["compare", str(run / "step_0000030"), "--no-time"]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint {run / 'step_0000030'} does not exist (a running zoo train deletes its older step_* " \
           f"checkpoints (train.keep_last); its newest checkpoint is" in err


def test_a_run_of_a_plugin_that_is_gone_names_the_plugin(tmp_path, capsys):
    """compare said 'unknown block' with no hint, where sample and eval name the plugin and its version."""
    import sys

    from fake_plugins import on_sys_path

    with on_sys_path(Path(__file__).parent / "fake_plugins" / "dit_block"):
        try:
            train(zoo.load_recipe(RECIPE, ["model.block=plug_block", "train.sample_every=0"]), tmp_path / "run",
                  steps=1, log=lambda *_: None)
        finally:
            sys.modules.pop("zoo_dit_block_plugin", None)
    assert main(["compare", str(tmp_path / "run"), "--no-time"]) == 2
    assert capsys.readouterr().err.rstrip().endswith("(it was written with the plugin zoo-dit-block-plugin==0.3 "
                                                     "installed: pip install zoo-dit-block-plugin==0.3)")


def test_a_run_stopped_and_resumed_shows_the_loss_of_the_uninterrupted_run(tmp_path, capsys):
    """A resumed run logs one shorter record where it stopped (steps 16-18, then 19-20, where the uninterrupted
    run logs 16-20 once): the plain mean of the records differed although the weights were bit-identical."""
    settings = SETTINGS + ["train.log_every=5", "train.eval_every=0", "train.val_every=0"]
    train(zoo.load_recipe(RECIPE, settings), tmp_path / "straight", steps=20, log=lambda *_: None)
    train(zoo.load_recipe(RECIPE, settings), tmp_path / "resumed", steps=18, log=lambda *_: None)
    train(zoo.load_recipe(RECIPE, settings), tmp_path / "resumed", steps=20, resume=tmp_path / "resumed",
          log=lambda *_: None)
    assert [r["step"] for r in _records(tmp_path / "resumed") if "loss" in r] == [5, 10, 15, 18, 20]
    (straight, resumed), _ = _compare_json(capsys, str(tmp_path / "straight"), str(tmp_path / "resumed"))
    step20 = next(r["loss"] for r in _records(tmp_path / "straight") if r["step"] == 20 and "loss" in r)
    # the window is at least the last log_every steps, (15, 20]: the one record of steps 16-20 here
    assert straight["run"]["loss"] == step20
    # the same per-step losses, summed in another order: float32 running sums, rounding only
    assert resumed["run"]["loss"] == pytest.approx(step20, rel=1e-6)


def test_a_checkpoint_of_a_branch_the_log_no_longer_reaches_has_no_figures(run, capsys):
    """Resumed from step_0000010 to 19, the log's step 19 fell inside step_0000020's window: the abandoned
    checkpoint took the new branch's loss."""
    train(zoo.load_recipe(RECIPE, SETTINGS + ["train.lr=3e-3"]), run, steps=19, resume=run / "step_0000010",
          log=lambda *_: None, allow_recipe_change=True)
    (old,), _ = _compare_json(capsys, str(run / "step_0000020"))
    assert old["run"]["step"] == 20 and (old["run"]["loss"], old["run"]["val_loss"], old["run"]["fd"]) == (None,) * 3


def test_a_link_to_a_checkpoint_is_read_with_its_run(run, tmp_path, capsys):
    """A link best -> RUN/step_0000020 took the link's folder for the run: no log, no losses."""
    (tmp_path / "best").symlink_to(run / "step_0000020")
    (linked, direct), _ = _compare_json(capsys, str(tmp_path / "best"), str(run / "step_0000020"))
    assert linked["run"]["checkpoint"] == str(tmp_path / "best")
    assert {k: v for k, v in linked["run"].items() if k != "checkpoint"} == \
        {k: v for k, v in direct["run"].items() if k != "checkpoint"} and linked["run"]["loss"] is not None


def test_one_ref_spec_resolved_in_two_folders_is_two_references(run, tmp_path, capsys, monkeypatch):
    """'zoo eval A --ref ref' run in x/ and 'zoo eval B --ref ref' in y/ scored against two folders, and both
    rows said reference 'ref' with no note: the comparison now uses the resolved reference."""
    other = tmp_path / "other"
    train(zoo.load_recipe(RECIPE, SETTINGS), other, steps=20, log=lambda *_: None)
    for folder, colour, target in (("x", (200, 0, 0), run), ("y", (0, 0, 200), other)):
        for c in ("a", "b"):
            (tmp_path / folder / "ref" / c).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (8, 8), tuple(v + 10 * i for v in colour)).save(tmp_path / folder / "ref" / c / f"{i}.png")
        monkeypatch.chdir(tmp_path / folder)
        assert main(["eval", str(target), "--n", "8", "--ref", "ref", "--extractor", "test_pool4"]) == 0
    capsys.readouterr()
    (a, b), err = _compare_json(capsys, str(run), str(other))
    assert a["run"]["fd_reference"] == b["run"]["fd_reference"] == "ref"
    assert a["run"]["fd_reference_key"] != b["run"]["fd_reference_key"]
    assert "the FDs were measured differently" in err and f"reference ref ({a['run']['fd_reference_key']})" in err


@pytest.mark.parametrize("damage", [{"weights": ["ema"]}, {"cfg": {"w": "x"}}, {"num_classes": [4]}, {"vae": "x"}])
def test_an_eval_result_with_damaged_fields_is_skipped(run, capsys, damage):
    """A result with weights ["ema"] or a guidance weight "x" was a TypeError or ValueError traceback."""
    assert main(["eval", str(run), "--n", "8", "--ref", "synthetic", "--extractor", "test_pool4"]) == 0
    capsys.readouterr()
    (path,) = (run / "eval").glob("last-*.json")
    result = json.loads(path.read_text())
    result["protocol"].update(damage)
    path.write_text(json.dumps(result))
    (row,), _ = _compare_json(capsys, str(run))
    assert row["run"]["fd_source"].startswith(str(run / "log.jsonl"))  # the log's FD, the result skipped


def test_a_run_that_trained_is_compared_though_its_sample_section_would_not_sample(tmp_path, capsys):
    """A run without grids may keep a sample section zoo sample needs options for (guidance without a null
    label): zoo compare refused the run, naming neither it nor its config.json."""
    no_null = ["model.class_dropout_prob=0", "diffusion.label_drop=0", "diffusion.null_label=null",
               "sample.cfg={scale: 4}", "train.sample_every=0"]
    train(zoo.load_recipe(RECIPE, no_null), tmp_path / "run", steps=2, log=lambda *_: None)
    (row,), _ = _compare_json(capsys, str(tmp_path / "run"))
    assert row["run"]["step"] == 2 and row["params"] > 0


def test_an_eval_result_of_a_zoo_that_read_images_otherwise_is_another_protocol(run, tmp_path, capsys):
    """Results of a zoo that read a folder's transparency otherwise sat beside today's with no note (FD 149
    against 225 for the same samples)."""
    other = tmp_path / "other"
    train(zoo.load_recipe(RECIPE, SETTINGS), other, steps=20, log=lambda *_: None)
    for target in (run, other):
        assert main(["eval", str(target), "--n", "8", "--ref", "synthetic", "--extractor", "test_pool4"]) == 0
    capsys.readouterr()
    assert "measured differently" not in _compare_json(capsys, str(run), str(other))[1]
    (path,) = (run / "eval").glob("last-*.json")
    result = json.loads(path.read_text())
    del result["reference"]["image_decoding"]  # as results written before the record
    path.write_text(json.dumps(result))
    (row, _), err = _compare_json(capsys, str(run), str(other))
    assert row["run"]["fd_reference_key"].endswith(", images read as before 2026-12-07")
    assert "the FDs were measured differently" in err


def _folder(path: Path, colour: tuple[int, int, int]) -> Path:
    """Two class folders of three 8x8 images of ``colour`` (shades of it)."""
    for c in ("a", "b"):
        (path / c).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), tuple(v + 10 * i for v in colour)).save(path / c / f"{i}.png")
    return path


def test_the_statistics_key_of_a_dataset_a_recipe_trains_on_is_of_the_recipes_data(tmp_path):
    """A dataset the recipe trains on is keyed by the recipe's own data: image_folder over two roots (alike
    images) are two references, and synthetic images drawn from 8 or 16 of them are two more."""
    from zoo.eval.reference import statistics_key

    extractor = {"name": "e", "weights_sha256": "f00"}
    keys = [statistics_key("image_folder", 8, extractor, zoo.load_recipe(
        RECIPE, ["data.dataset=image_folder", f"data.root={_folder(tmp_path / name, (200, 0, 0))}",
                 "data.num_classes=2"])) for name in ("A", "B")]
    assert keys[0] != keys[1]
    synthetic = [statistics_key("synthetic", 8, extractor, zoo.load_recipe(RECIPE, [f"data.size={size}"]))
                 for size in (8, 16)]
    assert synthetic[0] != synthetic[1]


def test_an_eval_every_fd_and_a_zoo_eval_fd_of_one_reference_are_measured_alike(tmp_path, capsys, monkeypatch):
    """zoo compare said a run's train.eval_every FD and zoo eval's of a step were 'measured differently' though
    both were n=8 test_pool4 FDs of the EMA weights against one folder by one sampler: the two writers keyed
    the reference two ways (a hash of the training hook's settings, a hash of --ref's name). Both now record
    one key of the statistics; a folder spelled otherwise is the same, another folder of like images is not."""
    ref = _folder(tmp_path / "ref", (200, 0, 0))
    run = tmp_path / "run"
    train(zoo.load_recipe(RECIPE, SETTINGS + [f"train.eval_ref={ref}"]), run, steps=20, log=lambda *_: None)
    monkeypatch.chdir(tmp_path)
    assert main(["eval", str(run), "--n", "8", "--ref", "./ref/", "--extractor", "test_pool4"]) == 0
    capsys.readouterr()
    (step, last), err = _compare_json(capsys, str(run / "step_0000010"), str(run))
    assert "(step 10)" in step["run"]["fd_source"] and last["run"]["fd_source"].endswith(".json")  # one of each
    assert step["run"]["fd_reference_key"] == last["run"]["fd_reference_key"]
    assert "measured differently" not in err
    for result in (run / "eval").glob("last-*.json"):
        result.unlink()
    _folder(tmp_path / "copy", (200, 0, 0))
    assert main(["eval", str(run), "--n", "8", "--ref", "copy", "--extractor", "test_pool4"]) == 0
    capsys.readouterr()
    _, err = _compare_json(capsys, str(run / "step_0000010"), str(run))
    assert "the FDs were measured differently" in err


def test_an_image_folder_dataset_reference_is_keyed_by_the_runs_own_folder_in_the_log_and_in_zoo_eval(tmp_path, capsys):
    """train.eval_ref image_folder and zoo eval --ref image_folder are the run's own data.root: the log's
    fd_statistics and the result's reference.statistics are one key, that folder's, not another one's."""
    from zoo.eval.extractors import build_extractor
    from zoo.eval.reference import statistics_key

    data = ["data.dataset=image_folder", f"data.root={_folder(tmp_path / 'a', (200, 0, 0))}", "data.num_classes=2"]
    recipe = zoo.load_recipe(RECIPE, SETTINGS + data + ["train.val_every=0", "train.batch_size=4",
                                                    "train.eval_ref=image_folder"])
    run = tmp_path / "run"
    train(recipe, run, steps=5, log=lambda *_: None)
    logged = {r["fd_statistics"] for r in _records(run) if "fd" in r}
    assert main(["eval", str(run), "--n", "8", "--ref", "image_folder", "--extractor", "test_pool4"]) == 0
    capsys.readouterr()
    (result,) = [json.loads(p.read_text()) for p in (run / "eval").glob("last-*.json")]
    assert logged == {result["reference"]["statistics"]}
    other = zoo.load_recipe(RECIPE, data[:1] + [f"data.root={_folder(tmp_path / 'b', (200, 0, 0))}"] + data[2:])
    assert result["reference"]["statistics"] != statistics_key("image_folder", 8, build_extractor("test_pool4").describe(),
                                                               other)


def test_older_records_and_results_without_the_statistics_key_keep_their_keys(tmp_path, capsys):
    """A log or result written before the statistics key: today's keys, the two FDs not comparable."""
    ref = _folder(tmp_path / "ref", (200, 0, 0))
    run = tmp_path / "run"
    train(zoo.load_recipe(RECIPE, SETTINGS + [f"train.eval_ref={ref}"]), run, steps=20, log=lambda *_: None)
    assert main(["eval", str(run), "--n", "8", "--ref", str(ref), "--extractor", "test_pool4"]) == 0
    capsys.readouterr()
    lines = _records(run)
    (run / "log.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if k != "fd_statistics"}) + "\n"
                                           for r in lines))
    (step, last), err = _compare_json(capsys, str(run / "step_0000010"), str(run))
    fd_record = next(r for r in lines if r.get("step") == 10 and "fd" in r)
    assert fd_record["fd_statistics"] and step["run"]["fd_reference_key"] == f"statistics {fd_record['fd_ref_key']}"
    assert "the FDs were measured differently" in err
    (path,) = (run / "eval").glob("last-*.json")
    result = json.loads(path.read_text())
    del result["reference"]["statistics"]
    path.write_text(json.dumps(result))
    (row,), _ = _compare_json(capsys, str(run))
    assert row["run"]["fd_reference_key"] == path.name.rsplit("-ref", 1)[1].removesuffix(".json")


def test_a_run_logged_before_the_statistics_key_compares_with_one_after_it(tmp_path, capsys):
    """Two runs' train.eval_every FDs of one reference, one logged before FD records carried the shared
    statistics key: alike under the key both carry (the newer one's older key), no 'measured differently'."""
    import shutil

    ref = _folder(tmp_path / "ref", (200, 0, 0))
    run, old = tmp_path / "run", tmp_path / "old"
    train(zoo.load_recipe(RECIPE, SETTINGS + [f"train.eval_ref={ref}"]), run, steps=20, log=lambda *_: None)
    shutil.copytree(run, old)
    (old / "log.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if k != "fd_statistics"}) + "\n"
                                           for r in _records(run)))
    (new_row, old_row), err = _compare_json(capsys, str(run), str(old))
    assert new_row["run"]["fd_reference_key"] != old_row["run"]["fd_reference_key"]
    assert old_row["run"]["fd_reference_key"] in new_row["run"]["fd_reference_aliases"]
    assert "the FDs were measured differently" not in err
    # another reference's statistics under the old key: still not alike
    records = [{**r, "fd_ref_key": "0" * 12} if "fd" in r else r for r in _records(old)]
    (old / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    _, err = _compare_json(capsys, str(run), str(old))
    assert "the FDs were measured differently" in err


def test_the_statistics_key_is_of_the_reference_resolved():
    """emoji32 and emoji32:holdout are one reference, with a recipe training on it or not (its flips change no
    image), and the extractor's weights are known by their sha256; 32 and 64 px or another split are others."""
    from zoo.eval.reference import statistics_key

    extractor = {"name": "e", "weights": "/a/w.pth", "weights_sha256": "f00"}
    key = statistics_key("emoji32", 32, extractor)
    own = {"data": {"dataset": "emoji32", "image_size": 32, "random_flip": True}}
    assert key == statistics_key("emoji32:holdout", 32, {**extractor, "weights": "/b/w.pth"}, own)
    assert key != statistics_key("emoji32", 64, extractor) and key != statistics_key("emoji32:train", 32, extractor)


def test_the_statistics_key_of_a_runs_own_data_is_what_made_its_images():
    """Synthetic images drawn alike under other workers, flips, a default written out got other keys (two equal
    FDs 'measured differently'); an image folder whose files were replaced kept its key (FDs against other
    images compared)."""
    from zoo.eval.reference import statistics_key

    extractor = {"name": "e", "weights_sha256": "f00"}
    recipe = zoo.load_recipe(RECIPE)
    key = statistics_key("synthetic", 8, extractor, recipe)
    for same in (["data.num_workers=1"], ["data.random_flip=true"], ["data.dataset=synthetic"], ["data.split=train"]):
        assert statistics_key("synthetic", 8, extractor, zoo.load_recipe(RECIPE, same)) == key, same
    for other in (["data.size=32"], ["train.seed=1"]):
        assert statistics_key("synthetic", 8, extractor, zoo.load_recipe(RECIPE, other)) != key, other


def test_the_statistics_key_of_an_image_folder_dataset_follows_its_files(tmp_path):
    from zoo.eval.reference import statistics_key

    root = _folder(tmp_path / "imgs", (200, 0, 0))
    extractor = {"name": "e", "weights_sha256": "f00"}
    sets = ["data.dataset=image_folder", f"data.root={root}", "data.num_classes=2"]
    key = statistics_key("image_folder", 8, extractor, zoo.load_recipe(RECIPE, sets))
    assert statistics_key("image_folder", 8, extractor, zoo.load_recipe(RECIPE, sets + ["data.num_workers=1"])) == key
    Image.new("RGB", (8, 8), (0, 0, 200)).save(root / "a" / "0.png")  # other pixels under the same name
    os.utime(root / "a" / "0.png", ns=(1, 1))
    assert statistics_key("image_folder", 8, extractor, zoo.load_recipe(RECIPE, sets)) != key

