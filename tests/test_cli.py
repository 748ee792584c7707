"""The ``zoo`` command line: exit statuses, one-line errors, ``list`` and ``build``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from fake_plugins import PLUGIN_DIR, on_sys_path

from zoo import cli
from zoo.commands import list as list_command
from zoo.recipe import resolve_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = Path(__file__).parent / "recipes"
DIT_S_2 = ROOT / "recipes" / "dit_s_2.yaml"
needs_dit = pytest.mark.skipif(not DIT_S_2.is_file(), reason="recipes/dit_s_2.yaml not written yet")

# tests/recipes/tiny.yaml: 4 tokens of 8 features, width 16, 3 Transformer blocks (2 heads, MLP 32, no qkv bias)
TINY_PARAMS = (8 * 16 + 16) + 3 * (16 * 48 + (16 * 16 + 16) + (16 * 32 + 32) + (32 * 16 + 16) + 4 * 16) + (16 * 8 + 8)
TINY_MACS = 4 * 8 * 16 + 3 * (4 * 16 * 48 + 2 * 4 * 4 * 16 + 4 * 16 * 16 + 2 * 4 * 16 * 32) + 4 * 16 * 8


@pytest.fixture
def plugins():
    with on_sys_path():
        yield


def run_zoo(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """``python -m zoo ARGS`` in a fresh process, with the fake plugins installed."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PLUGIN_DIR), os.environ.get("PYTHONPATH", "")])}
    env.pop("ZOO_TRACEBACK", None)
    return subprocess.run([sys.executable, "-m", "zoo", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def zoo(capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, out: str, err: str, *parts: str) -> None:
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("zoo: error: ") and "Traceback" not in err
    for part in parts:
        assert part in err


@needs_dit
def test_typo_in_a_dit_override_exits_2_with_one_line_and_a_suggestion():
    result = run_zoo("build", "recipes/dit_s_2.yaml", "--set", "model.depht=3")
    assert_one_line_error(result.returncode, result.stdout, result.stderr, "--set model.depht=3: key model.depht: "
                          "unknown parameter 'depht' of backbone 'dit'", "(did you mean depth?)")


def test_python_m_zoo_builds_a_plugin_recipe_as_json():
    built = run_zoo("build", "tests/recipes/tiny.yaml", "--json")
    assert built.returncode == 0, built.stderr
    report = json.loads(built.stdout)
    assert report["params"] == report["trainable_params"] == TINY_PARAMS == 6808
    assert report["gflops"] == pytest.approx(TINY_MACS / 1e9, rel=1e-9)
    assert report["by_module"]["blocks"] == pytest.approx(3 * 8704 / 1e9, rel=1e-9)


@pytest.mark.parametrize("text, parts", [
    ("model:\n  type: fake_net\n  in_features: 8\n  dim: 16\n  depth: 2\n  block: transfomer\n",
     [":6: key model.block: unknown block 'transfomer'", "(did you mean transformer?)"]),
    ("model:\n  type: fake_net\n  in_features: 8\n  dim: 16\n  depth: [1\n", [":6: invalid YAML"]),
    ("_base_: ../tiny_missing.yaml\n", [":1: key _base_: base recipe not found: '../tiny_missing.yaml'"]),
])
def test_recipe_mistakes_exit_2_with_one_line(capsys, plugins, tmp_path, text, parts):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    assert_one_line_error(*zoo(capsys, "build", path), str(path) + parts[0], *parts[1:])


def test_wrong_type_and_missing_file_exit_2(capsys, plugins):
    assert_one_line_error(*zoo(capsys, "build", RECIPES / "tiny.yaml", "--set", "model.depth=abc"),
                          "zoo: error: --set model.depth=abc: key model.depth: expected int, got str 'abc'")
    assert_one_line_error(*zoo(capsys, "build", "no/such/recipe.yaml"), "recipe file not found: no/such/recipe.yaml")
    assert_one_line_error(*zoo(capsys, "list", "blok"), "unknown kind 'blok'", "(did you mean block?)")
    # the name in another case: difflib alone scores DiT against dit 0.33, too far to suggest
    assert_one_line_error(*zoo(capsys, "build", "--help-component", "DiT"), "no registered component is called 'DiT'",
                          "(did you mean dit?)")


def test_a_dataset_shows_the_data_keys_it_reads(capsys, plugins):
    """--help-component emoji32 printed one line of description: a dataset takes no constructor arguments,
    its settings are the recipe's data keys, and which of them it reads differs by dataset."""
    code, out, _ = zoo(capsys, "build", "--help-component", "emoji32")
    keys = [line.split()[0] for line in out.splitlines()[2:]]
    assert code == 0 and keys == ["data.split", "data.num_classes", "data.random_flip", "data.num_workers",
                                  "data.image_size", "data.cache"]  # no root: emoji32 is built in
    assert "data.split        one of train, holdout" in out
    _, out, _ = zoo(capsys, "list", "dataset", "imagenet")
    keys = [line.split()[0] for line in out.splitlines()[2:]]
    assert keys[0] == "data.root" and keys[-4:] == ["data.latent", "data.vae_scale", "data.vae", "data.vae_file"]
    assert "data.size" not in keys and "data.cache" not in keys


def test_help_component_shows_every_kind_that_has_the_name(capsys, plugins):
    """A plugin's conditioner named like a block: --help-component showed the block alone."""
    from torch import nn

    from zoo import registry

    @registry.register("conditioner", "mlp")
    class SharedName(nn.Module):  # noqa: F841
        def __init__(self, dim: int, cond_dim: int | None = None):
            super().__init__()

    try:
        code, out, _ = zoo(capsys, "build", "--help-component", "mlp")
        heads = [line.split(" (")[0] for line in out.splitlines() if line and not line.startswith(" ")]
        assert code == 0 and heads == ["block mlp", "conditioner mlp"]
    finally:
        registry._in_process["conditioner"].pop("mlp")


def test_build_prints_counts_and_a_flops_table(capsys, plugins):
    code, out, err = zoo(capsys, "build", RECIPES / "tiny.yaml", "--flops", "--depth", "1")
    assert code == 0 and err == ""
    assert f"parameters: {TINY_PARAMS:,} (trainable {TINY_PARAMS:,})" in out
    assert "built on meta" in out and f"GFLOPs (multiply-adds, batch 1): {TINY_MACS / 1e9:.2f}" in out
    table = out.split("\n\n", 1)[1]
    assert "blocks" in table and "blocks.0" not in table  # --depth 1


def test_build_on_cpu_counts_the_same(capsys, plugins):
    code, out, _ = zoo(capsys, "build", RECIPES / "tiny.yaml", "--device", "cpu", "--set", "model.depth=1")
    params = TINY_PARAMS - 2 * 2176
    assert code == 0 and "built on cpu" in out and f"parameters: {params:,} (trainable {params:,})" in out


@pytest.mark.parametrize("override, expected", [
    ("diffusion.null_label=7", "key diffusion.null_label: diffusion.null_label is 7, but the model embeds labels 0..4"),
    ("model.num_classes=2", "key data.num_classes: data.num_classes is 4, but the model has 2 classes (labels 0..1; "
     "its label row 2 is the null label)"),
    ("diffusion.objective=hybrid_vlb", "key diffusion.objective: the hybrid objective needs a learned-sigma output"),
    ("model.input_size=16", "tiny_train.yaml:25: key data.image_size: data.image_size is 8, but the synthetic images "
     "take the model's input size 16"),
    ("sample.cfg.channels=7", "key sample.cfg.channels: sample.cfg.channels is 7, but the model has 3 channels"),
    # solvers that cannot walk the schedule: zoo sample refused them, zoo build passed and every grid was a warning
    ("sample.solver={type: ddpm, steps: 2000}", "key sample.solver.steps: 2000 steps are more than the schedule's "
     "1000 training steps"),
    ("sample.solver={type: ddim, respacing: 'ddim999'}", "key sample.solver: respacing 'ddim999': no integer stride "
     "keeps exactly 999 of 1000 steps"),
    ("sample.solver={type: ddpm, steps: 10, t_start: 0.5}", "key sample.solver: DDPMSolver on a discrete schedule "
     "walks the respaced training chain; drop t_start/t_end"),
    # a time grid that starts below the schedule's first noise level (t = 1/1000): refused once the weights had loaded
    ("sample.solver={type: dpm_solver++, steps: 10, t_start: 0.0001}", "key sample.solver.t_start: need 0 < t_end < "
     "t_start, got t_start=0.0001, t_end=0.001"),
])
def test_build_refuses_what_train_would_refuse_against_the_model(capsys, override, expected):
    """zoo build said OK (exit 0) to recipes that zoo train then refused before its first step."""
    assert_one_line_error(*zoo(capsys, "build", RECIPES / "tiny_train.yaml", "--set", override), expected)


def test_build_of_a_recipe_to_train_without_a_time_input_names_it(capsys, tmp_path):
    """With no diffusion.time_input zoo build skipped every recipe-to-model check and said OK (a wrong
    sample.cfg.channels or data.image_size among them); zoo train and zoo sample then refused the recipe."""
    text = (RECIPES / "tiny_train.yaml").read_text()
    assert "time_input:" in text
    (tmp_path / "r.yaml").write_text("".join(line + "\n" for line in text.splitlines() if "time_input" not in line))
    assert_one_line_error(*zoo(capsys, "build", tmp_path / "r.yaml"), "key diffusion.time_input: the recipe does "
                          "not say how the backbone receives time")
    import yaml

    from zoo.api import load_recipe

    model_only = tmp_path / "model.yaml"  # a model recipe alone is only built: it needs no time input
    model_only.write_text(yaml.safe_dump({"model": load_recipe(RECIPES / "tiny_train.yaml")["model"]}))
    assert zoo(capsys, "build", model_only)[0] == 0


def test_build_on_cpu_of_a_model_beyond_memory_is_one_line_before_allocating(capsys, monkeypatch):
    """It was the allocator's RuntimeError traceback (exit 1) after trying to allocate ~100 GB."""
    from zoo import memory

    monkeypatch.setattr(memory, "available_bytes", lambda device: 100 << 20)  # 100 MiB free, whatever the machine
    code, out, err = zoo(capsys, "build", "dit_s_2", "--device", "cpu")
    assert_one_line_error(code, out, err, "the model's 32,963,360 parameters need 126 MiB of weights but the cpu "
                          "device has 100 MiB free")


@pytest.mark.parametrize("flags, expected", [
    (["--depth", "3"], "--depth 3: it sets the depth of the --flops table"),  # was silently ignored
    (["--flops", "--depth", "-1"], "--depth -1: a depth is 0 or more"),
    (["--json", "--print-recipe"], "--print-recipe prints the recipe and stops; it does not combine with --json"),
])
def test_build_flags_that_would_be_ignored_are_refused(capsys, flags, expected):
    assert_one_line_error(*zoo(capsys, "build", "dit_s_2", *flags), expected)


def test_print_recipe_prints_the_resolved_recipe(capsys, plugins):
    code, out, _ = zoo(capsys, "build", RECIPES / "sub" / "scale.yaml", "--print-recipe", "--set", "train.steps=3")
    assert code == 0
    printed = yaml.safe_load(out)
    assert printed == resolve_recipe(RECIPES / "sub" / "scale.yaml", ["train.steps=3"])
    assert printed["model"]["block"] == {"type": "fake_block", "init": 0.25} and printed["train"]["steps"] == 3



def test_print_recipe_refuses_what_build_refuses(capsys):
    """--print-recipe printed (exit 0) recipes that zoo build and zoo train refuse by the checks run on the
    built model (a data root for a dataset that reads none); a printed recipe is now one build accepts."""
    args = ("build", "emoji32/dit", "--set", "data.root=/data/images")
    for extra in ((), ("--print-recipe",)):
        code, out, err = zoo(capsys, *args, *extra)
        assert code == 2 and out == "" and "dataset 'emoji32' reads no root" in err

@needs_dit
def test_dit_s_2_json_and_shipped_recipe_lookup(capsys, monkeypatch, tmp_path):
    code, out, _ = zoo(capsys, "build", DIT_S_2, "--json")
    report = json.loads(out)
    assert code == 0 and report["params"] == 32_963_360 and report["trainable_params"] < report["params"]
    assert report["gflops"] == pytest.approx(6.06, rel=2e-3)
    monkeypatch.chdir(tmp_path)  # not the repository: the shipped recipe is found by name
    code, out, _ = zoo(capsys, "build", "dit_s_2", "--print-recipe")
    assert code == 0 and yaml.safe_load(out)["model"]["hidden_size"] == 384
    # what the keys it leaves out mean, as comments (the output stays the same recipe); ema_decay 0.9999 and
    # friends change a run as much as a written key, and were nowhere to be seen
    left_out = out[out.index("# left out, and read as:\n"):].splitlines()[1:]
    assert all(line.startswith("# ") for line in left_out)
    said = yaml.safe_load("\n".join(line[2:] for line in left_out))
    printed = yaml.safe_load(out)
    assert said["train"]["precision"] == "fp32" and said["train"]["grad_accum"] == 1
    assert not set(said["train"]) & set(printed["train"]) and not set(said["model"]) & set(printed["model"])
    from zoo.training.sections import TRAIN  # every train key is printed or said (eval_extractor was neither)

    assert set(said["train"]) | set(printed["train"]) == set(TRAIN)
    # the sample and data keys too (a DiT evaluates with random classes, where the DiMRs say balanced)
    assert said["sample"]["labels"] == "random" and said["data"]["split"] == "train"


def test_print_recipe_says_the_defaults_of_a_section_set_to_null(capsys, tmp_path):
    """docs/models.md: a child's `train: null` means that section's defaults, which --print-recipe shows;
    it showed none (the section was skipped as no mapping)."""
    (tmp_path / "child.yaml").write_text(f"_base_: {RECIPES / 'tiny_train.yaml'}\ntrain: null\n")
    code, out, _ = zoo(capsys, "build", tmp_path / "child.yaml", "--print-recipe")
    said = yaml.safe_load("\n".join(line[2:] for line in out[out.index("# left out, and read as:\n"):].splitlines()[1:]))
    from zoo.training.sections import TRAIN_DEFAULTS

    assert code == 0 and yaml.safe_load(out)["train"] is None
    assert said["train"]["ema_decay"] == TRAIN_DEFAULTS["ema_decay"] and set(TRAIN_DEFAULTS) <= set(said["train"])


def test_interrupts_missing_files_and_usage_errors(capsys, monkeypatch):
    def interrupted(args):
        raise KeyboardInterrupt

    def missing(args):
        open("/no/such/file.bin")

    monkeypatch.setattr(list_command, "run", interrupted)
    assert zoo(capsys, "list")[::2] == (130, "zoo: interrupted\n")
    monkeypatch.setattr(list_command, "run", missing)
    assert_one_line_error(*zoo(capsys, "list"), "file not found: /no/such/file.bin")
    assert_one_line_error(*zoo(capsys, "frobnicate"), "argument COMMAND: invalid choice: 'frobnicate'")
    # argparse printed its usage (3-6 lines) above its error; now one line, as every zoo error
    assert_one_line_error(*zoo(capsys, "train"), "train: the following arguments are required: RECIPE "
                          "(`zoo train --help` shows the usage)")
    assert_one_line_error(*zoo(capsys, "sample", "x", "--n", "abc"), "sample: argument --n: invalid int value: 'abc'")
    assert zoo(capsys, "--help")[0] == 0


def test_help_imports_no_numpy_and_no_recipe_machinery_and_the_api_still_loads():
    """zoo --help imported numpy (zoo.eval's FD functions) and the recipe parser and validator (zoo's API, zoo build):
    320 -> 160 ms. The API is there on first use: as attributes of zoo, by from-import, and its modules too."""
    code = (
        "import sys\n"
        "from zoo.cli import main\n"
        "try:\n"
        "    main(['--help'])\n"
        "except SystemExit as stop:\n"
        "    assert stop.code == 0\n"
        "loaded = [m for m in ('numpy', 'torch', 'zoo.eval.stats', 'zoo.api', 'zoo.recipe', 'zoo.validate')"
        " if m in sys.modules]\n"
        "assert not loaded, loaded\n"
        "import zoo\n"
        "assert {'build_model', 'register', 'registry', 'load_recipe'} <= set(dir(zoo))\n"  # tab completion
        "from zoo import build_model, load_recipe\n"
        "from zoo.eval import frechet_distance\n"
        "assert zoo.build_model is build_model and zoo.register is zoo.registry.register and zoo.recipe.resolve\n"
        "assert callable(zoo.flops.count_flops)\n"  # docs/models.md: zoo.flops.count_flops(model) after import zoo
        "assert load_recipe('dit_s_2')['model']['depth'] == 12 and callable(frechet_distance)\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.splitlines()[-1] == "ok", result.stderr


def test_overrides_after_one_set_are_named_with_the_fix(capsys):
    code, out, err = zoo(capsys, "build", str(RECIPES / "tiny.yaml"), "--set", "model.depth=2", "train.steps=3")
    assert code == 2 and not out
    assert err == ("zoo: error: unrecognized arguments: train.steps=3 "
                   "(each override takes its own --set: --set train.steps=3)\n")
    code, _, err = zoo(capsys, "build", str(RECIPES / "tiny.yaml"), "--frob")
    assert code == 2 and err == "zoo: error: unrecognized arguments: --frob\n"


def test_a_directory_or_a_file_in_the_wrong_place_is_one_line_naming_the_path(capsys, monkeypatch, tmp_path):
    (tmp_path / "afile").write_text("x")
    cases = {lambda args: open(tmp_path): f"{tmp_path}: a directory where a file is needed",
             lambda args: open(tmp_path / "afile" / "x", "w"): f"{tmp_path / 'afile' / 'x'}: a file where a directory",
             lambda args: (_ for _ in ()).throw(PermissionError(13, "denied", "/root/x.png")): "/root/x.png: no permission"}
    for run, words in cases.items():
        monkeypatch.setattr(list_command, "run", run)
        assert_one_line_error(*zoo(capsys, "list"), words)
    monkeypatch.setattr(list_command, "run", lambda args: (_ for _ in ()).throw(PermissionError("no path")))
    with pytest.raises(PermissionError):  # no path named: zoo's own bug, traceback kept
        zoo(capsys, "list")


def test_a_command_that_fails_to_import_does_not_break_the_others(capsys, monkeypatch):
    monkeypatch.setattr(cli, "COMMANDS", cli.COMMANDS + ("no_such_command",))
    assert zoo(capsys, "list", "backbone")[0] == 0
    with pytest.raises(ModuleNotFoundError):
        cli.main(["no_such_command"])


def test_a_read_only_or_full_disk_is_one_line_naming_what_was_written(capsys, monkeypatch, tmp_path):
    """EROFS and ENOSPC were a traceback and exit 1. The writer's own error names a temporary file
    (or none): the line names the file zoo was writing, and nothing half-written is left."""
    import errno

    from zoo import atomic

    real_replace = os.replace

    def read_only(src, dst):
        if ".tmp-" in str(src):
            raise OSError(errno.EROFS, "Read-only file system", str(src))
        return real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", read_only)
    out = tmp_path / "grid.png"
    code, _, err = zoo(capsys, "sample", RECIPES / "tiny_dit_pixels.yaml", "--n", "1", "--steps", "2", "--out", out)
    assert code == 2 and "Traceback" not in err  # (a warning line first: a recipe samples random weights)
    assert err.splitlines()[-1] == f"zoo: error: {out}: the file system is read-only (write somewhere else)"
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(atomic.os, "replace", real_replace)

    def half_then_full(tmp):
        tmp.write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")  # as file.write raises it: no file named

    def rust_full(tmp):
        (tmp / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")  # safetensors

    cases = {lambda args: atomic.write_file(tmp_path / "a.txt", half_then_full): tmp_path / "a.txt",
             lambda args: atomic.write_dir(tmp_path / "ckpt", rust_full, "config.json", {}): tmp_path / "ckpt"}
    for run, path in cases.items():
        monkeypatch.setattr(list_command, "run", run)
        assert_one_line_error(*zoo(capsys, "list"), f"{path}: the disk is full, so it was not written "
                              "(nothing half-written is left; free some space, or write somewhere else)")
        assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(list_command, "run", lambda args: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space")))
    assert_one_line_error(*zoo(capsys, "list"), "the disk is full (No space; free some space")
    monkeypatch.setattr(list_command, "run", lambda args: (_ for _ in ()).throw(OSError(errno.EIO, "I/O", "/x")))
    with pytest.raises(OSError):  # another OS error: its traceback is kept
        zoo(capsys, "list")


def test_a_file_size_limit_is_one_line_naming_the_checkpoint(tmp_path):
    """Under `ulimit -f` (EFBIG) a checkpoint save was a traceback and exit 1 (torch's and safetensors' writers),
    where a full disk was one line, exit 2. A real limit on a real run, in a child process."""
    import resource
    import subprocess
    import sys

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (20 * 1024, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    done = subprocess.run([sys.executable, "-m", "zoo", "train", str(RECIPES / "tiny_train.yaml"), "--out", "run",
                           "--steps", "2", "--set", "train.sample_every=0"], cwd=tmp_path, preexec_fn=limit,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.splitlines()[-1] == (
        "zoo: error: run/step_0000002: the file would be larger than this process may write (a file size limit: "
        "`ulimit -f`, or the file system's largest file), so it was not written (nothing half-written is left)")
    assert not [p for p in (tmp_path / "run").iterdir() if ".tmp-" in p.name or p.name.startswith("step_")]


@pytest.mark.parametrize("argv, named", [
    (["prepare-latents", "imgs", "--vae", "v", "--out", ""], "--out"),
    (["train", "x.yaml", "--out="], "--out"),
    (["build", ""], "RECIPE"),
    # a switch takes no value: the empty string is the positional after it, named by its metavar
    (["parity", "--fp64", ""], "GOLDEN"),
    (["compare", "tiny.yaml", "--no-time", ""], "RECIPE"),
    (["prepare-latents", "", "--vae", "v", "--out", "lat"], "IMAGE_DIR"),
    (["compare", "a.yaml", "--set", "a=1", "--dev", ""], "--dev"),  # an option's prefix, as argparse takes it
])
def test_an_empty_argument_is_refused_not_read_as_the_working_directory(capsys, argv, named):
    """`--out ""` wrote prepare-latents' shards into the working directory; `zoo train --out ""` its default run."""
    assert cli.main(argv) == 2
    assert capsys.readouterr().err == f"zoo: error: {named} is empty (give a value)\n"


@pytest.mark.parametrize("value, shown", [("1", True), ("yes", True), ("0", False), ("false", False), ("", False)])
def test_zoo_traceback_0_keeps_the_one_line(capsys, monkeypatch, value, shown):
    """ZOO_TRACEBACK=0 counted as set: a user error came as a traceback, exit 1."""
    from zoo.errors import UserError
    from zoo.cli import main as cli_main

    monkeypatch.setenv("ZOO_TRACEBACK", value)
    if shown:
        with pytest.raises(UserError):
            cli_main(["build", "no_such_recipe_anywhere"])
    else:
        assert cli_main(["build", "no_such_recipe_anywhere"]) == 2
        assert capsys.readouterr().err.startswith("zoo: error: ")


@pytest.mark.parametrize("command, raw_word", [("eval", "raw"), ("export", "model"), ("convert", "model")])
def test_weights_takes_raw_and_model_alike_in_every_command(command, raw_word):
    """eval took ema|raw, export and convert ema|model: a flag copied from one command failed in the next."""
    from zoo.cli import build_parser

    parser = build_parser()
    positional = {"eval": ["RUN", "--n", "4"], "export": ["diffusers", "CKPT", "--out", "o"],
                  "convert": ["dit", "x.pt", "--recipe", "dit_s_2", "--out", "o"]}[command]
    for word in ("raw", "model"):
        assert parser.parse_args([command, *positional, "--weights", word]).weights == raw_word
    assert parser.parse_args([command, *positional, "--weights", "ema"]).weights == "ema"


def test_print_recipe_quotes_every_string_zoo_would_read_back_as_another_value(capsys):
    """--set 'data.root="1e5"' printed `root: 1e5`, which zoo's YAML 1.2 loader reads back as 100000.0 (PyYAML's
    1.1 rules, which the printer followed, read it as a string): the printed recipe was refused."""
    from zoo.recipe_yaml import parse_yaml

    for text in ("1e5", "0o17", "+.5", "1.e3", "3e-4", "0x1F", "1_000", ".5", "-.inf", ".NaN", "TRUE", "Null", "~",
                 "yes", "010", "10:00", "<<"):
        overrides = ["data.dataset=image_folder", f"data.root={json.dumps(text)}", f"train.init_from={json.dumps(text)}"]
        code, out, _ = zoo(capsys, "build", "emoji32/dit", "--print-recipe", *(a for s in overrides for a in ("--set", s)))
        assert code == 0
        printed, _ = parse_yaml(out, "printed")
        assert printed == resolve_recipe("emoji32/dit", overrides), text
        assert printed["data"]["root"] == printed["train"]["init_from"] == text


def test_list_says_what_a_dimr_branch_depth_of_0_builds(capsys):
    """`zoo list backbone dimr` showed depth `in [0, 1024]` without saying that 0 builds one block (as the
    official num_blocks 0 does), not an empty branch."""
    code, out, _ = zoo(capsys, "list", "backbone", "dimr")
    depth = next(line for line in out.splitlines() if line.split()[:1] == ["depth"])
    assert code == 0 and depth.rstrip().endswith("in [0, 1024]; the official num_blocks: 2*(depth//2)+1 blocks, so 0 builds one")


def test_compare_refuses_a_batch_that_cannot_fit_before_building_any_model(capsys, monkeypatch):
    """`zoo compare --batch 99999999` was an allocator traceback: the memory check zoo train and zoo sample make."""
    from zoo import compare, memory

    monkeypatch.setattr(memory, "available_bytes", lambda device: 2**30)
    monkeypatch.setattr(compare, "Bench", lambda *a, **k: pytest.fail("a model was built"))
    recipe = str(RECIPES / "tiny_train.yaml")
    code, out, err = zoo(capsys, "compare", recipe, "--batch", "99999999", "--device", "cpu")
    assert_one_line_error(code, out, err, f"timing {recipe} at --batch 99999999 needs about ",
                          "but the cpu device has 1.0 GiB free (use --batch ", " or less, or --no-time)")
    from zoo.commands.compare import check_memory

    check_memory([recipe], [], 4, "cpu")  # what fits passes


def test_version_flag_and_attribute_name_the_installed_versions(capsys):
    """There was no zoo --version (exit 2: 'COMMAND is required') and no zoo.__version__."""
    from importlib import metadata

    import zoo

    assert zoo.__version__ == metadata.version("zoo-diffusion") and "__version__" in dir(zoo)
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out == (f"zoo {zoo.__version__} (torch {metadata.version('torch')}, "
                                       f"Python {sys.version.split()[0]})\n")


TINY_TRAIN = str(RECIPES / "tiny_train.yaml")
ONE_PROCESS_COMMANDS = {  # every command but train, eval and prepare-latents, as a user ran it under torchrun
    "list": ["list"],
    "build": ["build", TINY_TRAIN],
    "convert": ["convert", "dit", "official.pt", "--recipe", TINY_TRAIN, "--out", "conv2"],
    "parity": ["parity", "golden.pt"],
    "sample": ["sample", TINY_TRAIN, "--out", "grid.png"],
    "compare": ["compare", TINY_TRAIN, "--json", "--device", "cpu", "--plot", "cmp.png"],
    "export": ["export", "diffusers", "RUN", "--out", "exd2"],
    "train-classifier": ["train-classifier", TINY_TRAIN, "--out", "cls", "--steps", "20", "--batch-size", "8"],
}


def test_every_command_either_shares_its_work_under_torchrun_or_is_refused_there():
    from zoo.commands import DISTRIBUTED_COMMANDS

    names = set(cli.build_parser()._subparsers._group_actions[0].choices)
    assert names == set(ONE_PROCESS_COMMANDS) | set(DISTRIBUTED_COMMANDS)


@pytest.mark.parametrize("name, argv", [*ONE_PROCESS_COMMANDS.items(),
                                        ("export npz", ["export", "npz", "EVALDIR", "--out", "s.npz"])])
def test_a_one_process_command_under_torchrun_is_refused_before_any_work(name, argv, tmp_path, capsys, monkeypatch):
    """Each process did the same work and wrote the same output: two exports, the second failing on the first's
    files (a successful export reported as failed), a checkpoint replaced without --force, two JSON lists."""
    monkeypatch.setattr(cli, "QUIET_RANK_WAIT_S", 0.0)  # the wait for rank 0's line under torchrun
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank, lines in (("1", 0), ("0", 1)):
        monkeypatch.setenv("RANK", rank)
        assert cli.main(argv) == 2
        out, err = capsys.readouterr()
        assert not out and len(err.splitlines()) == lines, err
    assert err.startswith(f"zoo: error: zoo {argv[0]} runs in one process: under torchrun every process would")
    assert err.rstrip().endswith(f"(run it without torchrun: zoo {' '.join(argv)})") or argv[0] == "sample"
    assert not list(tmp_path.iterdir())  # nothing read (the paths do not exist) or written


@pytest.mark.parametrize("command", ["train", "eval", "prepare-latents"])
def test_the_commands_that_share_their_work_run_under_torchrun(command, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "QUIET_RANK_WAIT_S", 0.0)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    argv = {"prepare-latents": [command, str(tmp_path / "none"), "--vae", "VAE", "--out", str(tmp_path / "lat")]}
    assert cli.main(argv.get(command, [command, str(tmp_path / "none")])) == 2  # its own check of the path
    assert "runs in one process" not in capsys.readouterr().err
