"""zoo parts from plain Python: a bare model-section dict, and Hydra-style ``_target_`` dotted paths."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import zoo
from zoo.cli import main
from zoo.errors import UserError

DIMR = {"type": "dimr", "in_channels": 4, "input_size": 8, "num_classes": 11, "branches": [
    {"dim": 16, "depth": 1, "patch_size": 2, "block": {"type": "transformer", "num_heads": 2, "mlp": "geglu_mlp"}},
    {"dim": 8, "depth": 1, "patch_size": 1, "block": {"type": "convnext", "kernel_size": 3}}]}

NAMED = """\
model:
  type: dit
  input_size: 8
  patch_size: 2
  in_channels: 4
  hidden_size: 32
  depth: 2
  num_heads: 2
  num_classes: 10
  block: transformer
  mlp: {type: mlp, act: gelu_tanh}
diffusion:
  schedule: {type: linear, num_steps: 1000}
"""
TARGETS = """\
model:
  _target_: zoo.backbones.dit.DiT
  input_size: 8
  patch_size: 2
  in_channels: 4
  hidden_size: 32
  depth: 2
  num_heads: 2
  num_classes: 10
  block: {_target_: "zoo.blocks.transformer:TransformerBlock"}
  mlp: {_target_: zoo.blocks.mlp.Mlp, act: gelu_tanh}
diffusion:
  schedule: {_target_: zoo.solvers.schedules.LinearSchedule, num_steps: 1000}
"""


def _built(recipe) -> torch.nn.Module:
    torch.manual_seed(0)
    return zoo.build_model(recipe).double().eval()


def _inputs():
    return torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.tensor([0.5, -2.0], dtype=torch.float64), torch.tensor([1, 10])


def test_build_model_takes_a_bare_model_section():
    bare, wrapped = _built(DIMR), _built({"model": DIMR})
    assert type(bare).__name__ == "DiMR"
    assert sum(p.numel() for p in bare.parameters()) == sum(p.numel() for p in wrapped.parameters())
    x, t, y = _inputs()
    assert torch.equal(bare(x, t, y)[-1], wrapped(x, t, y)[-1])  # same seed, same init, same model
    typo = r"key model.branches.0.depht: unknown parameter 'depht' of BranchConfig.*did you mean depth"
    with pytest.raises(UserError, match=typo):
        zoo.build_model({**DIMR, "branches": [{**DIMR["branches"][0], "depht": 1}, DIMR["branches"][1]]})
    # a bare section without its type read as a recipe of unknown sections, with no hint
    untyped = {k: v for k, v in DIMR.items() if k != "type"}
    with pytest.raises(UserError, match=r"unknown section .*\(a model section alone names its backbone: add type: "):
        zoo.build_model(untyped)
    # overrides None are none; a number is named (both were TypeErrors from inside the recipe code)
    assert sum(p.numel() for p in zoo.build_model(DIMR, None).parameters()) == sum(p.numel() for p in bare.parameters())
    with pytest.raises(UserError, match=r"^overrides are a list of 'key=VALUE' texts or a mapping, got int"):
        zoo.build_model(DIMR, 5)


def test_target_paths_build_the_same_model_as_registered_names(tmp_path):
    (tmp_path / "named.yaml").write_text(NAMED)
    (tmp_path / "targets.yaml").write_text(TARGETS)
    named, targets = _built(tmp_path / "named.yaml"), _built(tmp_path / "targets.yaml")
    assert [type(m) for m in targets.modules()] == [type(m) for m in named.modules()]
    x, t, y = _inputs()
    t = torch.tensor([3, 900])
    assert torch.equal(targets(x, t, y), named(x, t, y))
    recipe = zoo.load_recipe(tmp_path / "targets.yaml")  # the schedule (not an nn.Module, but registered) validates too
    assert recipe["diffusion"]["schedule"]["_target_"] == "zoo.solvers.schedules.LinearSchedule"
    assert main(["build", str(tmp_path / "targets.yaml")]) == 0


def _error(tmp_path, text: str) -> UserError:
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(UserError) as info:
        zoo.load_recipe(tmp_path / "bad.yaml")
    return info.value


def test_target_kwargs_are_checked_like_a_registered_name(tmp_path):
    by_target = _error(tmp_path, TARGETS.replace("  depth: 2", "  depht: 2"))
    by_name = _error(tmp_path, NAMED.replace("  depth: 2", "  depht: 2"))
    assert (by_target.line, by_target.key_path, by_target.suggestion) == (by_name.line, by_name.key_path, by_name.suggestion)
    assert (by_target.line, by_target.suggestion) == (7, "did you mean depth?")
    assert "unknown parameter 'depht' of backbone 'zoo.backbones.dit.DiT'" in str(by_target)
    nested = _error(tmp_path, TARGETS.replace("act: gelu_tanh", "actt: gelu_tanh"))
    assert (nested.line, nested.key_path, nested.suggestion) == (11, "model.mlp.actt", "did you mean act?")
    assert main(["build", str(tmp_path / "bad.yaml")]) == 2


@pytest.mark.parametrize("target, message", [
    ("zoo.backbones.nope.DiT", "cannot import _target_ 'zoo.backbones.nope.DiT': ModuleNotFoundError"),
    ("zoo.backbones.dit.DiTT", "cannot import _target_ 'zoo.backbones.dit.DiTT': AttributeError"),
    ("collections.OrderedDict", "is not an nn.Module subclass nor a registered component"),
    ("DiT", "must be a dotted path pkg.module.Class"),
])
def test_target_that_is_not_an_importable_module_class_is_one_clear_error(tmp_path, target, message):
    err = _error(tmp_path, TARGETS.replace("zoo.backbones.dit.DiT", target))
    assert message in str(err) and (err.line, err.key_path) == (2, "model._target_")


def test_target_and_type_together_is_an_error(tmp_path):
    err = _error(tmp_path, TARGETS.replace("model:\n", "model:\n  type: dit\n"))
    assert "give type or _target_, not both" in str(err)


def test_building_under_the_meta_device_does_not_import_dynamo():
    """README: build under torch.device("meta") to count a large model's parameters. nn.init on meta
    imports torch._dynamo (3.5 of the 3.6 s zoo.build_model("dit_s_2") took here, against 0.1 s). The
    memory estimate `zoo sample` makes before loading weights runs the model on meta, whose Python
    arange kernel imported it too (zoo sample of a tiny checkpoint: 7-9 s, 4.5-5 s without)."""
    import subprocess
    import sys

    code = ("import sys, torch, zoo\n"
            "from zoo.memory import activation_bytes\n"
            "with torch.device('meta'):\n"
            "    model = zoo.build_model('dit_s_2')\n"
            "assert next(model.parameters()).is_meta\n"
            "print(sum(p.numel() for p in model.parameters()), 'torch._dynamo' in sys.modules)\n"
            "print(activation_bytes(model, training=False) > 0, 'torch._dynamo' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["32963360", "False", "True", "False"]


def test_the_meta_import_shortcuts_stand_aside_in_a_threaded_process():
    """Building on meta kept torch._dynamo (and triton) out of sys.modules, which every thread shares: another
    thread's torch.compile failed with "No module named 'torch._dynamo.backends'" while a model was built."""
    import subprocess
    import sys

    code = ("import sys, threading, torch\n"
            "from zoo.meta import no_dynamo_import, no_triton_import\n"
            "with no_dynamo_import(), no_triton_import():\n"
            "    print(type(sys.modules['torch._dynamo']).__name__, 'triton' in sys.modules)\n"
            "done = threading.Event(); other = threading.Thread(target=done.wait); other.start()\n"
            "with no_dynamo_import(), no_triton_import():\n"
            "    import torch._dynamo.backends\n"  # what torch.compile imports: the real package
            "    print(type(sys.modules['torch._dynamo']).__name__, sys.modules.get('triton', 0) is None)\n"
            "done.set(); other.join()\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["_StandIn", "True", "module", "False"]


@pytest.mark.parametrize("recipe", ["emoji32/dit", "emoji32/uvit", "emoji32/dimr_2r"])
def test_example_inputs_and_flop_counts_leave_the_global_random_state_alone(recipe):
    """A user who seeds, builds an eps_fn (guided_eps_fn reads the model's example inputs) and draws x_T got
    other noise than the seed gives: the example inputs were drawn from the global generator."""
    from zoo.flops import count_flops
    from zoo.meta import example_inputs

    model = zoo.build_model(recipe)
    torch.manual_seed(0)
    expected = torch.randn(4)
    torch.manual_seed(0)
    example_inputs(model, 2)
    count_flops(model)
    assert torch.equal(torch.randn(4), expected)


def test_public_functions_of_the_library_modules_have_type_hints():
    """The modules other codebases import (README "Use from your code", "Solvers") annotate every
    public function: zoo.solvers.build_solver/build_schedule, the DPM-Solver updates, zoo.sample's
    loaders and zoo.diffusion's schedule arguments had none."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    files = [p for folder in ("blocks", "conditioning", "backbones", "solvers", "zoo/diffusion", "zoo/integrations")
             for p in sorted((root / folder).rglob("*.py"))]
    files += [root / "zoo" / name for name in ("api.py", "registry.py", "sample.py")]
    missing = []

    def visit(node: ast.AST, path: str, owner: str = "") -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef) and not child.name.startswith("_"):
                visit(child, path, f"{child.name}.")
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) and (
                    not child.name.startswith("_") or child.name == "__init__"):
                args = [a for a in child.args.posonlyargs + child.args.args + child.args.kwonlyargs
                        if a.arg not in ("self", "cls") and a.annotation is None]
                no_return = child.returns is None and child.name != "__init__"
                if args or no_return:
                    missing.append(f"{path}:{child.lineno} {owner}{child.name}"
                                   f"{' ' + str([a.arg for a in args]) if args else ''}{' -> ?' if no_return else ''}")

    for path in files:
        visit(ast.parse(path.read_text(encoding="utf-8")), str(path.relative_to(root)))
    assert missing == [], "\n".join(missing)


def test_overrides_may_be_a_dict_of_key_paths():
    """``zoo.build_model("dit_s_2", {"model.depth": 2})`` said "override 'model.depth' must look like
    key.path=VALUE" (the dict was read key by key); a dict now means what the same --set texts mean."""
    as_texts = zoo.load_recipe("dit_s_2", ["model.depth=2", "model.mlp_ratio=2.5", "model.norm=td_layernorm"])
    as_dict = zoo.load_recipe("dit_s_2", {"model.depth": 2, "model.mlp_ratio": 2.5, "model.norm": "td_layernorm"})
    assert as_dict == as_texts
    with torch.device("meta"):
        assert len(zoo.build_model("dit_s_2", {"model.depth": 2}).blocks) == 2
    with pytest.raises(UserError, match="key model.depht: unknown parameter 'depht'"):
        zoo.load_recipe("dit_s_2", {"model.depht": 2})
    with pytest.raises(UserError, match="NaN and infinities are refused"):
        zoo.load_recipe("dit_s_2", {"model.mlp_ratio": float("nan")})


def test_from_checkpoint_gives_the_ema_model_of_a_run_in_eval_mode(tmp_path):
    from zoo.checkpoint import save_checkpoint

    recipe = zoo.load_recipe({"model": DIMR})
    torch.manual_seed(0)
    model, ema = zoo.build_model(recipe), zoo.build_model(recipe)
    with torch.no_grad():
        for p in ema.parameters():
            p.add_(0.25)  # the EMA weights differ from the model's everywhere
    save_checkpoint(tmp_path / "run" / "last", model, recipe, ema=ema.state_dict())
    loaded, loaded_recipe = zoo.from_checkpoint(tmp_path / "run")  # a run directory: its last/
    assert not loaded.training and loaded_recipe["model"] == recipe["model"]
    for name, p in loaded.state_dict().items():
        assert torch.equal(p, ema.state_dict()[name]), name
    raw, _ = zoo.from_checkpoint(tmp_path / "run" / "last", use_ema=False)
    with pytest.raises(UserError, match=r"^device= 'gpu' is not a device"):  # torch's RuntimeError after reading
        zoo.from_checkpoint(tmp_path / "run", device="gpu")
    assert all(torch.equal(p, model.state_dict()[n]) for n, p in raw.state_dict().items())
    # a torch.device is checked as its text is: meta returned a model of no weights, and cuda without a GPU
    # (or cuda:7 on a machine with fewer) was torch's "Found no NVIDIA driver" RuntimeError
    with pytest.raises(UserError, match="zoo runs on cpu, cuda or mps, not meta"):
        zoo.from_checkpoint(tmp_path / "run", device=torch.device("meta"))
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA GPU is available") as info:
            zoo.from_checkpoint(tmp_path / "run", device=torch.device("cuda"))
        assert info.value.suggestion == "use device='cpu'"  # Python's spelling, not the CLI's --device cpu
    assert next(zoo.from_checkpoint(tmp_path / "run", device=torch.device("cpu"))[0].parameters()).device.type == "cpu"
    for wrong in (tmp_path / "run", tmp_path / "run" / "last" / "config.json"):  # a checkpoint is not a recipe
        with pytest.raises(UserError, match=r"is a zoo checkpoint, not a recipe file \(zoo.from_checkpoint\("):
            zoo.build_model(wrong)


def test_train_takes_a_recipe_file(tmp_path):
    """zoo.training.train took a resolved recipe only: a path raised AttributeError: 'str' has no 'get'."""
    from zoo.training import train

    recipe = Path(__file__).parent / "recipes" / "tiny_train.yaml"
    records = train(str(recipe), tmp_path / "run", steps=2, log=lambda *_: None)
    assert (tmp_path / "run" / "last" / "model.safetensors").is_file() and records[-1]["step"] == 2
