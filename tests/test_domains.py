"""Declared value domains: each kind of bad value is one error naming file:line, key path and the allowed
range (exit 2); NaN/inf are refused; machine-eating sizes are refused at once; rules between arguments;
listings show the domains; a run that cannot fit says how much memory it needs."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from fake_plugins import on_sys_path
from torch import nn

import zoo
from zoo.cli import main
from zoo.domains import Decay, Doc, OneOf, Positive, Range, describe, fits
from zoo.errors import UserError
from zoo.memory import activation_bytes, estimate, require_memory
from zoo.recipe import resolve
from zoo.validate import SECTION_VALIDATORS, validate_recipe

ROOT = Path(__file__).resolve().parents[1]
TINY = (ROOT / "tests" / "recipes" / "tiny_train.yaml").read_text()


def error_of(tmp_path: Path, old: str, new: str) -> tuple[str, Path]:
    """Write TINY with ``old`` replaced by ``new``; the UserError message of loading it."""
    assert TINY.count(old) == 1, old
    path = tmp_path / "r.yaml"
    path.write_text(TINY.replace(old, new))
    with pytest.raises(UserError) as info:
        zoo.load_recipe(path)
    return str(info.value), path


def line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


@pytest.mark.parametrize("old, new, expected", [
    # positive integers with an upper bound (widths, depths, heads, patch sizes, classes)
    ("depth: 2", "depth: 0", "key model.depth: depth must be a positive integer <= 1024, got 0"),
    ("hidden_size: 32", "hidden_size: -32", "key model.hidden_size: hidden_size must be a positive integer <= 65536"),
    ("num_heads: 2", "num_heads: 0", "key model.num_heads: num_heads must be a positive integer <= 1024, got 0"),
    ("patch_size: 2", "patch_size: 0", "key model.patch_size: patch_size must be a positive integer <= 256, got 0"),
    ("num_classes: 4\n  learn", "num_classes: 0\n  learn", "key model.num_classes: num_classes must be a positive integer"),
    # half-open ranges of floats
    ("mlp_ratio: 2.0", "mlp_ratio: 0.0", "key model.mlp_ratio: mlp_ratio must be a positive number <= 64, got 0.0"),
    ("class_dropout_prob: 0.1", "class_dropout_prob: 1.0",
     "key model.class_dropout_prob: class_dropout_prob must be a number in [0, 1), got 1.0"),
    ("ema_decay: 0.99", "ema_decay: 1.0", "key train.ema_decay: ema_decay must be a number in [0, 1), got 1.0"),
    ("betas: [0.9, 0.999]", "betas: [0.9, 1.5]", "key train.betas: betas must be a list of 2 numbers in [0, 1)"),
    ("lr: 1.0e-3", "lr: -1.0e-3", "key train.lr: lr must be a positive number, got -0.001"),
    ("label_drop: 0.1", "label_drop: 2", "key diffusion.label_drop: label_drop must be a number in [0, 1]"),
    # schedule and solver parameters (nested components of sections)
    ("beta_end: 0.02", "beta_end: 1.5", "key diffusion.schedule.beta_end: beta_end must be a positive number < 1"),
    # names from a list, with a suggestion
    ("dataset: synthetic", "dataset: synthtic", "key data.dataset: dataset must be one of"),
    ("objective: eps_mse", "objective: eps_mes", "objective must be one of eps_mse, hybrid_vlb, multiscale, got "
     "'eps_mes' (did you mean eps_mse?)"),
    # values that left the model blind to the time (an all-zero sinusoid, a norm constant in time)
    ("num_heads: 2", "frequency_dim: 1\n  num_heads: 2", "key model.frequency_dim: frequency_dim must be an integer in [2, "),
    ("num_heads: 2", "norm: {type: td_layernorm, time_scale: 0}\n  num_heads: 2",
     "key model.norm.time_scale: time_scale must be a positive number, got 0"),
    # integers >= 0 with a meaning for 0
    ("ckpt_every: 10", "ckpt_every: -1", "key train.ckpt_every: ckpt_every must be an integer in [0, 1e9] (0 = never)"),
])  # fmt: skip
def test_a_bad_value_names_file_line_key_and_range(tmp_path, old, new, expected):
    message, path = error_of(tmp_path, old, new)
    line = line_of(path.read_text(), new.split("\n")[0])
    assert message.startswith(f"{path}:{line}: "), message
    assert expected in message


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "1e999"])
@pytest.mark.parametrize("old, key", [
    ("lr: 1.0e-3", "train.lr"), ("mlp_ratio: 2.0", "model.mlp_ratio"),
    ("beta_start: 0.0001", "diffusion.schedule.beta_start"), ("label_drop: 0.1", "diffusion.label_drop"),
])  # fmt: skip
def test_nan_and_infinities_are_refused_wherever_a_number_is_taken(tmp_path, old, key, value):
    message, path = error_of(tmp_path, old, old.split(":")[0] + ": " + value)
    assert f"key {key}: " in message and "NaN and infinities are refused" in message
    assert message.startswith(f"{path}:{line_of(path.read_text(), value)}: ")


def test_nan_is_refused_even_where_no_annotation_takes_the_value(tmp_path, monkeypatch):
    path = tmp_path / "r.yaml"
    path.write_text(TINY)
    assert "key sample.cfg.scale: scale must be a number in [0, 1000] or null, got nan" in \
        str(pytest.raises(UserError, zoo.load_recipe, path, ["sample.cfg={scale: .nan}"]).value)
    monkeypatch.setitem(SECTION_VALIDATORS, "notes", lambda section, recipe: None)  # a section that checks nothing
    with pytest.raises(UserError, match=r"key notes\.a\.1: a must be a finite number, got -inf"):
        validate_recipe(resolve(path, ["notes={a: [1, -.inf]}"]))


@pytest.mark.parametrize("override, key", [
    ("model.depth=1000000000000", "model.depth"),              # 1e12 blocks would never finish building
    ("data.size=40000000000", "data.size"),                    # 4e10 synthetic images held in memory
    ("train.batch_size=1000000000", "train.batch_size"),
    ("model.input_size=1000000", "model.input_size"),
    ("sample.num_samples=100000000000", "sample.num_samples"),
    ("diffusion.schedule.num_steps=1000000000", "diffusion.schedule.num_steps"),
])  # fmt: skip
def test_sizes_that_would_eat_the_machine_are_refused_at_once(tmp_path, override, key):
    path = tmp_path / "r.yaml"
    path.write_text(TINY)
    start = time.perf_counter()
    code = main(["build", str(path), "--set", override])
    assert code == 2 and time.perf_counter() - start < 2.0


def test_cli_exit_status_and_one_line(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(TINY)
    assert main(["build", str(path), "--set", "model.depth=1000000000000"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("zoo: error: --set model.depth=1000000000000: key model.depth: depth must be a positive integer "
                   "<= 1024, got 1000000000000")


@pytest.mark.parametrize("old, new, key, expected", [
    ("num_heads: 2", "num_heads: 3", "model.hidden_size", "hidden_size=32 must be divisible by num_heads=3"),
    ("input_size: 8", "input_size: 9", "model.input_size", "input_size=9 must be divisible by patch_size=2"),
    ("hidden_size: 32", "hidden_size: 34", "model.hidden_size", "needs hidden_size divisible by 4"),
    ("beta_start: 0.0001", "beta_start: 0.5", "diffusion.schedule.beta_start", "needs beta_start <= beta_end"),
])  # fmt: skip
def test_rules_between_arguments(tmp_path, old, new, key, expected):
    message, path = error_of(tmp_path, old, new)  # the rule's first key the recipe sets
    assert message.startswith(f"{path}:{line_of(path.read_text(), key.split('.')[-1] + ':')}: key {key}: ")
    assert expected in message


@pytest.mark.parametrize("override, key, expected", [
    # a rule across a branch's keys names the key the --set changed (it named the branches list or the block)
    ("model.branches.0.patch_size=3", "model.branches.0.patch_size", "input_size 16 is not divisible by downsample x patch_size"),
    ("model.branches.1.patch_size=2", "model.branches.1.patch_size", "the last branch works on a 8x8 grid but must work at the input "
     "resolution 16"),
    ("model.branches.0.block.num_heads=3", "model.branches.0.block.num_heads", "dim=32 must be divisible by the block's num_heads=3"),
    ("model.branches.1.head_kernel_size=4", "model.branches.1.head_kernel_size", "needs head_kernel_size odd"),
    ("model.branches.1.block.kernel_size=4", "model.branches.1.block.kernel_size", "needs kernel_size odd"),
    ("model.num_classes=0", "model.num_classes", "(1 = unconditional: the null label only), got 0"),  # U-ViT's is <= 0
])  # fmt: skip
def test_dimr_branch_grids_and_blocks(override, key, expected):
    with pytest.raises(UserError) as info:
        zoo.load_recipe(ROOT / "tests" / "recipes" / "tiny_dimr_pixels.yaml", [override])
    assert f"key {key}: " in str(info.value) and expected in str(info.value)


@pytest.mark.parametrize("value, got", [("convnext", "str 'convnext'"), ("null", "null"), ("5", "int 5"),
                                        ("[1]", "list [1]")])
def test_a_dimr_branch_that_is_not_a_mapping_is_named_not_a_traceback(value, got):
    """`--set model.branches.1=convnext` reached the branch-grid rule, which read `.downsample` of a str."""
    with pytest.raises(UserError) as info:
        zoo.load_recipe(ROOT / "tests" / "recipes" / "tiny_dimr_pixels.yaml", [f"model.branches.1={value}"])
    assert str(info.value) == (f"--set model.branches.1={value}: key model.branches.1: expected a mapping of dim, "
                               f"depth, block, patch_size, downsample, head_kernel_size, got {got} (give one as "
                               "{dim: ..., depth: ..., block: ...})")
    with pytest.raises(UserError, match=r"key model.branches: expected list of mappings, got dict \{'dim': 8\}"):
        zoo.load_recipe(ROOT / "tests" / "recipes" / "tiny_dimr_pixels.yaml", ["model.branches={dim: 8}"])


def test_domain_primitives():
    from typing import Annotated
    decay = Annotated[float, Decay]
    assert [fits(v, t) for v, t in [(0.5, decay), (1.0, decay), (float("nan"), float), (True, int)]] == \
        [True, False, False, False]
    assert fits(float("nan"), float, domains=False)  # type checks alone look only at the type
    assert (Range(0, 10, lo_open=True) & Range(hi=4)) == Range(0, 4, lo_open=True)
    assert describe(Annotated[int, Positive, Range(hi=8)]) == "a positive integer <= 8"
    assert describe(Annotated[str, OneOf({"a": 1, "b": 2})] | None) == "one of a, b or null"
    assert describe(Annotated[int, Range(0, 5), Doc("0 = off")]) == "an integer in [0, 5] (0 = off)"
    live = ["x"]
    choice = OneOf(live)
    live.append("y")  # a registry that grows after the table was written
    assert choice.contains("y") and choice.describe() == "one of x, y"


def test_listings_show_types_defaults_domains_and_rules(capsys):
    assert main(["list", "backbone", "dit"]) == 0
    out = capsys.readouterr().out
    depth = next(line for line in out.splitlines() if line.split()[:1] == ["depth"])
    assert depth.split() == ["depth", "int", "28", "in", "[1,", "1024]"]
    assert "rules: input_size divisible by patch_size; hidden_size divisible by num_heads" in out
    assert main(["list", "backbone", "dimr"]) == 0  # the keys of a branch, which the listing left out
    lines = capsys.readouterr().out.splitlines()
    start = lines.index("  branches: each item a mapping of")
    assert [line.split()[:3] for line in lines[start + 2:start + 4]] == [["dim", "int", "required"],
                                                                         ["depth", "int", "required"]]
    assert any(line.split()[:1] == ["head_kernel_size"] for line in lines[start:])
    assert main(["build", "--help-component", "dpm_solver++"]) == 0
    out = capsys.readouterr().out
    assert "one of multistep, singlestep, singlestep_fixed, adaptive" in out and "rules: t_end < t_start" in out
    assert main(["list", "--verbose"]) == 0
    out = capsys.readouterr().out
    assert "(from parent)" in out and "in (0, 64]" in out and "recipe sections (besides model):" in out
    assert any(line.split()[:1] == ["ema_decay"] and line.endswith("a number in [0, 1)") for line in out.splitlines())


def test_every_shipped_recipe_validates():
    recipes = [p for p in sorted((ROOT / "recipes").rglob("*.yaml")) if not p.name.startswith("_base")]
    recipes += sorted((ROOT / "tests" / "recipes").glob("*.yaml"))
    assert len(recipes) > 30
    with on_sys_path():  # tests/recipes/tiny*.yaml use the fake plugin's backbone
        for path in recipes:
            validate_recipe(resolve(path))


# --- memory ---------------------------------------------------------------------------------------


class TwoLayer(nn.Module):
    """fc2(gelu(fc1(x))) on (B, 8) vectors: autograd saves x, fc1(x) and gelu(fc1(x))."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)

    def example_inputs(self, batch: int) -> tuple[torch.Tensor]:
        return (torch.zeros(batch, 8),)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(nn.functional.gelu(self.fc1(x)))


def test_half_precision_estimate_halves_the_activations():
    from zoo.memory import estimate

    with torch.device("meta"):
        model = TwoLayer()
    full = estimate(model).per_sample
    half = estimate(model, half_precision=True).per_sample
    assert full == 4 * (8 + 16 + 16)  # 160 bytes in float32
    assert half == 2 * (8 + 16 + 16)  # 80 bytes in 2-byte floats
    assert estimate(model, half_precision=True).fixed == estimate(model).fixed  # the weights' state is not halved


def test_the_estimate_counts_saved_activations_and_training_state():
    with torch.device("meta"):
        model = TwoLayer()
    assert activation_bytes(model) == 4 * (8 + 16 + 16)  # float32 x, fc1(x), gelu(...); weights excluded
    assert activation_bytes(model, training=False) == 4 * 4 * 16  # 4 copies of the largest activation
    est = estimate(model)
    assert est.params == 8 * 16 + 16 + 16 * 8 + 8 and est.fixed == 20 * est.params
    assert est.total(10) == est.fixed + 10 * 160


def test_a_batch_that_cannot_fit_says_how_much_it_needs():
    with torch.device("meta"):
        model = TwoLayer()
    need = 20 * 280 + 160 * 1000
    assert require_memory(model, "cpu", 1000, available=need).per_sample == 160
    with pytest.raises(UserError) as info:
        require_memory(model, "cpu", 1000, available=need - 1)
    message = str(info.value)  # 5,600 B of state + 160,000 B of activations; 999 samples fit
    # need and free in as many decimals as tell them apart (up to 3): "needs about 0 MiB ... has 0 MiB free" before
    assert message.startswith("key train.batch_size: this run needs about 0.158 MiB (0 MiB for 280 parameters'")
    assert "at batch 1000) but the cpu device has 0.158 MiB free (use train.batch_size <= 999" in message
    # 1000 per micro-batch of a step of 16 (2 processes x grad_accum 8): the hint is for train.batch_size itself,
    # not the micro-batch (following 'train.batch_size <= 999' with grad_accum 8 was the next error)
    with pytest.raises(UserError) as info:
        require_memory(model, "cpu", 1000, available=need - 1, per_step=16)
    assert ("at micro-batch 1000, train.batch_size 16000 in 16 parts (processes x train.grad_accum)) but the cpu "
            "device has 0.158 MiB free (use train.batch_size <= 15984") in str(info.value)
    from zoo.memory import gib_apart

    assert gib_apart(0.32 * 2**30, 0.34 * 2**30) == ("0.32 GiB", "0.34 GiB")  # was "0.3 GiB ... 0.3 GiB free"
    assert gib_apart(5 * 2**30, 3 * 2**30) == ("5.0 GiB", "3.0 GiB")
    # 2 DDP processes on one CPU share its memory: each checked the whole of it, and together needed twice that
    assert require_memory(model, "cpu", 500, available=need).per_sample == 160
    with pytest.raises(UserError, match=r"(1/2 for each of the 2 processes on it)"):
        require_memory(model, "cpu", 500, available=need, sharing=2)


def test_a_sampling_batch_of_one_that_cannot_fit_is_not_told_to_use_batch_one(monkeypatch):
    """It said "use --batch-size 1 or less" where a batch of 1 did not fit either."""
    from zoo.memory import require_sampling_memory

    with torch.device("meta"):
        model = zoo.build_model(zoo.load_recipe("emoji32/dit"))
    per_sample = estimate(model, training=False).per_sample
    monkeypatch.setattr("zoo.memory.available_bytes", lambda device: per_sample)  # one row, not a guided pair
    with pytest.raises(UserError) as info:
        require_sampling_memory(zoo.load_recipe("emoji32/dit"), "cpu", 1, guided=True)
    assert info.value.suggestion == "use a smaller model or a device with more memory"
    with pytest.raises(UserError) as info:
        require_sampling_memory(zoo.load_recipe("emoji32/dit"), "cpu", 4, guided=False)
    assert info.value.suggestion == "use --batch-size 1 or less"


def test_zoo_train_refuses_a_run_that_cannot_fit_before_allocating(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("zoo.memory.available_bytes", lambda device: 2**20)
    path = tmp_path / "r.yaml"
    path.write_text(TINY)
    assert main(["train", str(path), "--out", str(tmp_path / "run"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "this run needs about" in err and "but the cpu device has 1 MiB free" in err
    assert not (tmp_path / "run" / "last").exists()
