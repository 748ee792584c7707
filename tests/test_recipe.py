"""Recipes: line numbers, ``_base_`` inheritance, ``--set`` overrides, validation before building."""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Callable, Literal

import pytest
import torch
from fake_plugins import on_sys_path

import zoo
from zoo.domains import NonEmpty
from zoo import registry
from zoo.errors import UserError
from zoo.recipe import parse_yaml, resolve, resolve_recipe
from zoo.validate import SECTION_VALIDATORS, Factory, model_factory

RECIPES = Path(__file__).parent / "recipes"


@dataclass
class Stage:
    """One stage of the typed test backbone (a dataclass parameter)."""

    dim: int
    depth: int = 1
    block: Callable | None = None


class TypedNet:
    """A test 'backbone' with one parameter of each kind the validator checks."""

    def __init__(self, count: int, rate: float = 1.0, flag: bool = False, name: str = "a",
                 sizes: list[int] | None = None, extra: dict | None = None, mode: Literal["a", "b"] = "a",
                 stages: list[Stage] | None = None, parts: list | None = None, maybe: int | None = None,
                 head_norm: Callable | None = None, block: Callable | None = None,
                 picks: Annotated[list[int] | None, NonEmpty] = None):
        self.__dict__.update(locals())


class NeedsWidth(torch.nn.Module):
    """A block with a required argument no parent supplies."""

    def __init__(self, dim: int, width: int):
        super().__init__()
        self.dim, self.width = dim, width


@pytest.fixture(autouse=True)
def components():
    zoo.register("backbone", "typed_net")(TypedNet)
    zoo.register("block", "needs_width")(NeedsWidth)
    with on_sys_path():
        yield
    registry.unregister("backbone", "typed_net")
    registry.unregister("block", "needs_width")


def write(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


# --- loading --------------------------------------------------------------------------------------


def test_every_key_and_list_item_keeps_its_line():
    data, origins = parse_yaml("model:\n  type: x\n  block:\n    dim: 3\nlist:\n  - a\n  - {b: 1}\n", "f.yaml")
    assert data == {"model": {"type": "x", "block": {"dim": 3}}, "list": ["a", {"b": 1}]}
    assert origins[("model",)] == ("f.yaml", 1)
    assert origins[("model", "block", "dim")] == ("f.yaml", 4)
    assert origins[("list", 1)] == ("f.yaml", 7) and origins[("list", 1, "b")] == ("f.yaml", 7)


def test_yaml_is_safe_and_reads_exponents_as_floats():
    assert parse_yaml("a: 1e-4\nb: 2.5e3\nc: 1_000\nd: '1e-4'", "f")[0] == {"a": 1e-4, "b": 2500.0, "c": 1000, "d": "1e-4"}
    with pytest.raises(UserError, match="could not determine a constructor"):
        parse_yaml("a: !!python/object/apply:os.system ['true']", "f.yaml")


def test_numbers_and_booleans_are_read_as_yaml_1_2_reads_them(tmp_path):
    """PyYAML's YAML 1.1 read 010 as 8, 10:00 as 600, 1:30.5 as 90.5 and yes/on as true, silently."""
    text = "a: 010\nb: 0o10\nc: 0x10\nd: -7\ne: 10:00\nf: 1:30.5\ng: yes\nh: off\ni: True\nj: -.5\nk: 2024-01-01\n"
    assert parse_yaml(text, "f")[0] == {"a": 10, "b": 8, "c": 16, "d": -7, "e": "10:00", "f": "1:30.5", "g": "yes",
                                        "h": "off", "i": True, "j": -0.5, "k": "2024-01-01"}
    assert parse_yaml("a: !!int 010\nb: !!float 1\n", "f")[0] == {"a": 10, "b": 1.0}
    for tagged in ("!!int 10:00", "!!float 1:30", "!!bool yes"):  # were a ValueError / KeyError traceback
        with pytest.raises(UserError, match=r"^f:1: invalid YAML: '.*' is not "):
            parse_yaml(f"a: {tagged}\n", "f")
    path = write(tmp_path, "model: {type: typed_net, count: 010, flag: true}\n")
    assert resolve_recipe(path, ["model.maybe=010"])["model"] == {"type": "typed_net", "count": 10, "flag": True,
                                                                  "maybe": 10}
    with pytest.raises(UserError, match=r"^--set model.count=10:00: key model.count: expected int, got str '10:00'"):
        zoo.load_recipe(path, ["model.count=10:00"])
    with pytest.raises(UserError, match=r"^--set model.flag=yes: key model.flag: expected bool, got str 'yes'"):
        zoo.load_recipe(path, ["model.flag=yes"])
    with pytest.raises(UserError, match=r"r\.yaml:1: key model.rate: expected float, got str '1:30.5'"):
        zoo.load_recipe(write(tmp_path, "model: {type: typed_net, count: 1, rate: 1:30.5}\n"))


def test_broken_yaml_and_duplicate_keys_are_reported_with_their_line():
    with pytest.raises(UserError) as info:
        parse_yaml("model:\n  type: dit\n  depth: [1, 2\ntrain: {}\n", "bad.yaml")
    assert str(info.value).startswith("bad.yaml:4: invalid YAML")
    with pytest.raises(UserError) as info:
        parse_yaml("model:\n  depth: 1\n  width: 2\n  depth: 3\n", "dup.yaml")
    assert str(info.value) == "dup.yaml:4: key model.depth: duplicate key 'depth' (first at line 2)"
    assert parse_yaml("a: &x {k: 1}\nb:\n  <<: *x\n  k: 2\n", "f")[0]["b"] == {"k": 2}  # a merge key is no duplicate
    # nor is one merged from a mapping written in place, which was refused as a duplicate
    assert parse_yaml("b:\n  <<: {k: 1, j: 3}\n  k: 2\n", "f")[0]["b"] == {"k": 2, "j": 3}
    with pytest.raises(UserError, match="^f:4: key b.k: duplicate key 'k' \\(first at line 3\\)"):
        parse_yaml("b:\n  <<: {k: 1}\n  k: 2\n  k: 3\n", "f")
    # two merge keys in one mapping: safe_load kept the second silently (depth 4 of 3 and 4)
    with pytest.raises(UserError, match=r"^f:3: invalid YAML: duplicate merge key << \(first at line 2\)"):
        parse_yaml("b:\n  <<: {depth: 3}\n  <<: {depth: 4}\n", "f")
    assert parse_yaml("b:\n  <<: [{k: 1}, {j: 2}]\n", "f")[0]["b"] == {"k": 1, "j": 2}  # one key, a list: fine


# --- inheritance ----------------------------------------------------------------------------------


def test_base_chain_merges_mappings_and_replaces_a_component_of_another_type():
    recipe = resolve(RECIPES / "sub" / "scale.yaml")
    model = recipe.data["model"]
    assert model["in_features"] == 8 and model["depth"] == 3  # from tiny_base.yaml, then tiny.yaml
    assert model["block"] == {"type": "fake_block", "init": 0.25}  # transformer options do not leak
    assert recipe.data["train"] == {"steps": 10, "lr": 1e-4} and "_base_" not in recipe.data
    assert recipe.origin(("model", "depth")) == (str(RECIPES / "tiny.yaml"), 3)
    assert recipe.origin(("model", "in_features")) == (str(RECIPES / "tiny_base.yaml"), 4)
    assert recipe.origin(("model", "block", "init")) == (str(RECIPES / "sub" / "scale.yaml"), 4)
    tiny = resolve_recipe(RECIPES / "tiny.yaml")["model"]["block"]
    assert tiny == {"type": "transformer", "mlp_ratio": 2.0, "norm": "layernorm",
                    "mlp": {"type": "mlp", "act": "gelu"}, "qkv_bias": False}


def test_a_list_of_bases_merges_in_order(tmp_path):
    write(tmp_path, "model: {type: fake_net, dim: 4, depth: 1}\ntrain: {steps: 1}\n", "a.yaml")
    write(tmp_path, "model: {dim: 8}\ntrain: {lr: 0.1}\n", "b.yaml")
    child = write(tmp_path, "_base_: [a.yaml, b.yaml]\nmodel: {depth: 2}\n")
    assert resolve_recipe(child) == {"model": {"type": "fake_net", "dim": 8, "depth": 2},
                                     "train": {"steps": 1, "lr": 0.1}}


def test_missing_base_and_cycles_are_errors_at_the_base_key(tmp_path):
    child = write(tmp_path, "# a comment\n_base_: nothere.yaml\nmodel: {}\n")
    with pytest.raises(UserError) as info:
        resolve(child)
    assert str(info.value).startswith(f"{child}:2: key _base_: base recipe not found: 'nothere.yaml'")
    write(tmp_path, "_base_: b.yaml\n", "a.yaml")
    write(tmp_path, "_base_: [a.yaml]\n", "b.yaml")
    with pytest.raises(UserError, match=r"b.yaml:1: key _base_.0: _base_ 'a.yaml' inherits from itself"):
        resolve(tmp_path / "a.yaml")


def test_a_base_is_read_beside_its_recipe_or_among_the_shipped_ones_never_from_the_current_directory(
        tmp_path, monkeypatch):
    """`_base_: mybase.yaml` not beside the recipe was read from the current directory: the same recipe built
    from one directory and was "not found" from another."""
    write(tmp_path, "_base_: mybase.yaml\nmodel: {depth: 2}\n", "rec/r.yaml")
    write(tmp_path, "_base_: dit_s_2\nmodel: {hidden_size: 96, num_heads: 2}\n", "work/mybase.yaml")
    write(tmp_path, "model: {type: typed_net, count: 7}\n", "work/dit_s_2.yaml")  # no shadow of the shipped one
    monkeypatch.chdir(tmp_path / "work")
    with pytest.raises(UserError, match=r"r.yaml:1: key _base_: base recipe not found: 'mybase.yaml' \(looked at "):
        resolve(Path("../rec/r.yaml"))
    for base in ("dit_s_2.yaml", "_base_dit", "emoji32/_base_emoji32", "recipes/dit_s_2.yaml"):
        write(tmp_path, f"_base_: {base}\nmodel: {{depth: 3}}\n", "rec/named.yaml")
        model = resolve(tmp_path / "rec" / "named.yaml").data["model"]
        assert model["depth"] == 3 and model.get("type") in ("dit", None) and "count" not in model, base
    write(tmp_path, "model: {type: typed_net, count: 5}\n", "rec/dit_s_2.yaml")  # beside the recipe: that one
    write(tmp_path, "_base_: dit_s_2.yaml\n", "rec/named.yaml")
    assert resolve(tmp_path / "rec" / "named.yaml").data["model"] == {"type": "typed_net", "count": 5}


# --- overrides ------------------------------------------------------------------------------------


def test_overrides_parse_yaml_values_and_record_their_origin():
    recipe = resolve(RECIPES / "tiny.yaml", ["model.depth=5", "model.block.norm.eps=1e-6", "train.betas=[0.9, 0.99]",
                                             "sample.solver={type: ddim, steps: 20}", "model.block.mlp.act=gelu_tanh",
                                             "model.bias=null", "data.split=holdout"])
    data = recipe.data
    assert data["model"]["depth"] == 5 and data["model"]["bias"] is None
    assert data["model"]["block"]["norm"] == {"type": "layernorm", "eps": 1e-6}  # a bare name became {type: NAME}
    assert data["train"]["betas"] == [0.9, 0.99] and data["data"] == {"split": "holdout"}
    assert data["sample"]["solver"] == {"type": "ddim", "steps": 20}
    assert recipe.origin(("model", "depth")) == ("--set model.depth=5", None)
    assert recipe.origin(("sample", "solver", "steps")) == ("--set sample.solver={type: ddim, steps: 20}", None)
    model = zoo.build_model(recipe)
    assert len(model.blocks) == 5 and model.blocks[0].norm1.eps == 1e-6
    assert model.blocks[0].mlp.act.approximate == "tanh"


def test_a_set_that_creates_a_mapping_is_blamed_for_it(tmp_path):
    """A typo above the leaf key was blamed on the recipe file (``trian``) or a base's line (``train.foo``)."""
    path = write(tmp_path, "model: {type: typed_net, count: 1}\ntrain:\n  steps: 1\n")
    for override, message in [
        ("trian.lr=1e-3", "--set trian.lr=1e-3: key trian: unknown section 'trian'"),
        ("train.foo.bar=1", "--set train.foo.bar=1: key train.foo: unknown key 'foo' in train"),
        ("model.stuff.x=1", "--set model.stuff.x=1: key model.stuff: unknown parameter 'stuff'"),
    ]:
        with pytest.raises(UserError) as info:
            zoo.load_recipe(path, [override])
        assert str(info.value).startswith(message)
    with pytest.raises(UserError) as info:  # head_norm is not written: its default (None here) is used
        zoo.load_recipe(path, ["model.head_norm.eps=1e-6"])
    assert str(info.value) == ("--set model.head_norm.eps=1e-6: cannot set model.head_norm.eps: model.head_norm is not "
                               "written in the recipe (its default is used), so it has no keys to set (give it whole: "
                               '--set "model.head_norm={type: NAME, eps: 1e-6}")')
    assert zoo.load_recipe(path, ["model.head_norm.type=layernorm", "model.head_norm.eps=1e-6"])
    with pytest.raises(UserError) as info:  # the default's registered name goes into the example
        zoo.load_recipe("emoji32/uvit", ["model.head_norm.eps=1e-6"])
    assert str(info.value).endswith('(give it whole: --set "model.head_norm={type: layernorm, eps: 1e-6}")')


def test_a_set_that_changes_a_components_type_drops_the_recipes_keys_as_a_merge_does():
    """--set model.branches.0.block.type=convnext kept the transformer's num_heads ('unknown parameter
    num_heads of block convnext'). The recipe's keys for the old component go; the same type keeps them,
    and keys another --set gave stay, in either order."""
    same = resolve(RECIPES / "tiny.yaml", ["model.block.mlp.type=mlp"]).data
    assert same["model"]["block"]["mlp"] == {"type": "mlp", "act": "gelu"}
    changed = resolve(RECIPES / "tiny.yaml", ["model.block.mlp.type=geglu_mlp"])
    assert changed.data["model"]["block"]["mlp"] == {"type": "geglu_mlp"}  # the recipe's act: gelu went with mlp
    assert changed.origin(("model", "block", "mlp", "type")) == ("--set model.block.mlp.type=geglu_mlp", None)
    assert ("model", "block", "mlp", "act") not in changed.origins
    for sets in (["model.block.mlp.act=gelu_tanh", "model.block.mlp.type=geglu_mlp"],
                 ["model.block.mlp.type=geglu_mlp", "model.block.mlp.act=gelu_tanh"]):
        assert resolve(RECIPES / "tiny.yaml", sets).data["model"]["block"]["mlp"] == {"type": "geglu_mlp",
                                                                                      "act": "gelu_tanh"}
    assert resolve(RECIPES / "tiny.yaml", ["sample.solver={type: ddim, steps: 20}", "sample.solver.type=ddpm"]
                   ).data["sample"]["solver"] == {"type": "ddpm", "steps": 20}
    from zoo.recipe import find_recipe

    dimr = resolve(find_recipe("dimr_m_3r"), ["model.branches.0.block.type=convnext"]).data
    assert dimr["model"]["branches"][0]["block"] == {"type": "convnext"}


def test_a_bare_name_set_keeps_what_other_sets_put_inside_the_component_in_either_order():
    """--set model.branches.1.block.kernel_size=3 --set model.branches.1.block=convnext silently dropped kernel_size
    (the other order kept it). The recipe's keys still go, whatever the type, and so does a whole component an
    earlier --set gave."""
    key, inside = "model.branches.1.block", "model.branches.1.block.kernel_size=3"
    for sets in ([inside, f"{key}=convnext"], [f"{key}=convnext", inside]):
        recipe = resolve("emoji32/dimr_2r", sets)
        assert recipe.data["model"]["branches"][1]["block"] == {"type": "convnext", "kernel_size": 3}, sets
        assert recipe.origin(("model", "branches", 1, "block", "kernel_size")) == (f"--set {inside}", None)
    assert resolve("emoji32/dimr_2r", [f"{key}=convnext"]).data["model"]["branches"][1]["block"] == "convnext"
    whole = [f"{key}={{type: transformer, num_heads: 2}}", f"{key}=convnext"]
    assert resolve("emoji32/dimr_2r", whole).data["model"]["branches"][1]["block"] == "convnext"
    norm = resolve("emoji32/dimr_2r", ["model.branches.0.block.norm.eps=1e-3", "model.branches.0.block=transformer"])
    assert norm.data["model"]["branches"][0]["block"] == {"type": "transformer", "norm": {"type": "td_rmsnorm",
                                                                                           "eps": 1e-3}}


def test_a_set_between_type_and_target_replaces_the_component_as_a_type_change_does():
    """--set model.block.mlp._target_=... beside the recipe's `type: mlp` (and back) kept both keys: 'give type or
    _target_, not both', blamed on the recipe's line, though a _base_ merge of the same change worked."""
    to_target = resolve(RECIPES / "tiny.yaml", ["model.block.mlp._target_=zoo.blocks.mlp.GeGluMlp"])
    assert to_target.data["model"]["block"]["mlp"] == {"_target_": "zoo.blocks.mlp.GeGluMlp"}
    back = resolve(RECIPES / "tiny.yaml", ["model.block.mlp._target_=zoo.blocks.mlp.GeGluMlp",
                                           "model.block.mlp.type=mlp"])
    assert back.data["model"]["block"]["mlp"] == {"type": "mlp"}
    same = resolve(RECIPES / "tiny.yaml", ["model.block.mlp.act=gelu_tanh", "model.block.mlp._target_=x.Y"])
    assert same.data["model"]["block"]["mlp"] == {"_target_": "x.Y", "act": "gelu_tanh"}  # a --set's key stays


def test_list_items_can_be_overridden_by_index(tmp_path):
    path = write(tmp_path, "model: {type: typed_net, count: 1, sizes: [1, 2, 3]}\n")
    assert resolve_recipe(path, ["model.sizes.1=7"])["model"]["sizes"] == [1, 7, 3]
    with pytest.raises(UserError, match=r"no item 3; model.sizes is a list of 3 \(indices 0..2\)"):
        resolve(path, ["model.sizes.3=7"])


@pytest.mark.parametrize("override, message", [
    ("model.depth", "must look like key.path=VALUE"),
    ("=3", "must look like key.path=VALUE"),
    ("model..depth=3", "must look like key.path=VALUE"),
    ("_base_=other.yaml", "_base_ cannot be overridden"),
    ("model.depth.x=1", "model.depth is 3, not a mapping"),
    ("model.depth=[1", "--set model.depth=[1:1: invalid YAML"),
])
def test_bad_overrides(override, message):
    with pytest.raises(UserError) as info:
        resolve(RECIPES / "tiny.yaml", [override])
    assert message in str(info.value)


# --- validation -----------------------------------------------------------------------------------

TINY = """\
model:
  type: fake_net
  in_features: 8
  dim: 16
  depth: 2
  block:
    type: transformer
    mlp_ratio: 2.0
    norm: layernorm
"""


@pytest.mark.parametrize("edit, expected", [
    # (text replaced in TINY, the exact error after "FILE:")
    (("depth: 2", "depht: 2"), "5: key model.depht: unknown parameter 'depht' of backbone 'fake_net' "
     "(zoo_fake_plugin:TinyNet); its parameters are in_features, dim, depth, block, num_heads, tokens, bias "
     "(did you mean depth?)"),
    (("mlp_ratio", "mlp_ration"), "8: key model.block.mlp_ration: unknown parameter 'mlp_ration' of block "
     "'transformer' (zoo.blocks.transformer:TransformerBlock); its parameters are dim, num_heads, mlp_ratio, "
     "qkv_bias, proj_bias, norm, mlp, cond_dim (did you mean mlp_ratio?)"),
    (("depth: 2", "depth: abc"), "5: key model.depth: expected int, got str 'abc'"),
    (("depth: 2", "depth: true"), "5: key model.depth: expected int, got bool True"),
    (("depth: 2", "depth: 2\n  bias: 1"), "6: key model.bias: expected bool or null, got int 1"),
    (("depth: 2", "depth: 2.0"), "5: key model.depth: expected int, got float 2.0"),
    (("  dim: 16\n", ""), "1: key model: backbone 'fake_net' (zoo_fake_plugin:TinyNet) needs dim (add dim: VALUE)"),
    (("type: transformer", "type: transfomer"), "7: key model.block.type: unknown block 'transfomer'"),
    (("norm: layernorm", "norm: layernrom"), "9: key model.block.norm: unknown conditioner 'layernrom'"),
    (("type: fake_net", "type: fake_nte"), "2: key model.type: unknown backbone 'fake_nte'"),
    (("type: transformer", "width: 3"), "6: key model.block: a block needs a name (add type: NAME)"),
    (("model:", "modle:"), "1: key modle: unknown section 'modle'; sections are model, diffusion, data, train, "
     "sample (did you mean model?)"),
])
def test_validation_errors_name_file_line_key_and_fix(tmp_path, edit, expected):
    path = write(tmp_path, TINY.replace(*edit, 1))
    with pytest.raises(UserError) as info:
        zoo.load_recipe(path)
    assert str(info.value).startswith(f"{path}:{expected}")


def test_suggestions_for_unknown_components_list_the_known_ones(tmp_path):
    path = write(tmp_path, TINY.replace("type: transformer", "type: transfomer"))
    message = str(pytest.raises(UserError, zoo.build_model, path).value)
    assert "known blocks: " in message and "fake_block" in message and "'zoo.blocks'" in message
    assert message.endswith("(did you mean transformer?)")
    needs = write(tmp_path, "model: {type: fake_net, in_features: 8, dim: 16, depth: 2, block: needs_width}\n", "n.yaml")
    message = str(pytest.raises(UserError, zoo.build_model, needs).value)
    assert message == (f"{needs}:1: key model.block: block 'needs_width' (test_recipe:NeedsWidth) needs width "
                       "(add width: VALUE)")  # but not dim: the parent passes it


def test_types_that_pass(tmp_path):
    path = write(tmp_path, """
        model:
          type: typed_net
          count: 3
          rate: 2          # an int is a fine float
          flag: false
          sizes: [1, 2]
          extra: {any: thing}
          mode: b
          maybe: null
          parts: [{x: 1}, {y: 2}]     # plain data: no type
          head_norm: rmsnorm
        """)
    net = zoo.build_model(path)
    assert (net.count, net.rate, net.mode, net.maybe, net.parts) == (3, 2, "b", None, [{"x": 1}, {"y": 2}])
    assert isinstance(net.head_norm, Factory) and net.head_norm.func.__name__ == "RMSNorm"
    for bad, message in [("mode=c", "expected one of 'a', 'b', got str 'c'"),
                         ("model.sizes=[1, x]", "expected list[int] or null, got list [1, 'x']"),
                         ("model.extra=[1]", "expected dict or null, got list [1]")]:
        bad = bad if bad.startswith("model.") else "model." + bad
        assert message in str(pytest.raises(UserError, zoo.build_model, path, [bad]).value)


def test_dataclass_parameters_and_lists_of_components(tmp_path):
    path = write(tmp_path, """
        model:
          type: typed_net
          count: 1
          stages:
            - {dim: 8, block: {type: fake_block, init: 0.5}}
            - {dim: 4, depth: 2}
          parts: [{type: mlp, act: silu}, layernorm]
        """)
    net = zoo.build_model(path)
    assert net.stages[1] == Stage(dim=4, depth=2, block=None)
    assert net.stages[0].block.func.__name__ == "ScaleBlock" and net.stages[0].block.keywords == {"init": 0.5}
    assert net.stages[0].block(8).scale.tolist() == [0.5] * 8
    assert net.parts[0].keywords == {"act": "silu"} and net.parts[1] == "layernorm"  # only items with type: resolve
    bad = write(tmp_path, "model: {type: typed_net, count: 1, stages: [{dim: 8, dpeth: 2}]}\n", "bad.yaml")
    message = str(pytest.raises(UserError, zoo.build_model, bad).value)
    assert message.startswith(f"{bad}:1: key model.stages.0.dpeth: unknown parameter 'dpeth' of Stage")
    assert message.endswith("(did you mean depth?)")
    missing = write(tmp_path, "model: {type: typed_net, count: 1, stages: [{depth: 2}]}\n", "missing.yaml")
    assert "key model.stages.0: Stage needs dim" in str(pytest.raises(UserError, zoo.build_model, missing).value)


# --- building -------------------------------------------------------------------------------------


def test_nested_components_become_factories_and_the_model_is_built():
    factory = model_factory(resolve(RECIPES / "tiny.yaml"))
    block = factory.keywords["block"]
    assert isinstance(block, Factory) and block.keywords["mlp_ratio"] == 2.0
    assert block.keywords["norm"].func.__name__ == "LayerNorm" and block.keywords["mlp"].keywords == {"act": "gelu"}
    assert block.key_path == "model.block" and block.origin == (str(RECIPES / "tiny.yaml"), 4)
    model = zoo.build_model(RECIPES / "tiny.yaml", ["model.in_features=4"])
    assert len(model.blocks) == 3 and model.blocks[0].attn.qkv.bias is None
    assert model.blocks[0].mlp.fc1.out_features == 32
    # in 4*16+16, blocks 3*(qkv 16*48, proj 16*16+16, fc1 16*32+32, fc2 32*16+16, 2 LN 64), out 16*4+4
    assert sum(p.numel() for p in model.parameters()) == 80 + 3 * (768 + 272 + 544 + 528 + 64) + 68


def test_a_recipe_may_not_set_what_the_parent_passes(tmp_path):
    """The error named the component's line, also where a --set had added the key (emoji32/dimr_2r.yaml:21 for
    --set model.branches.0.block.cond_dim=8): it names where the key was given."""
    path = write(tmp_path, TINY.replace("mlp_ratio: 2.0", "num_heads: 4"))
    with pytest.raises(UserError) as info:
        zoo.build_model(path)
    assert str(info.value) == (f"{path}:8: key model.block: num_heads is set by the component that builds this one; "
                               "the recipe may not set it (remove num_heads here)")
    for override in ("model.branches.0.block.cond_dim=8", "model.branches.1.block.dim=8"):
        with pytest.raises(UserError) as info:
            zoo.build_model("emoji32/dimr_2r", [override])
        assert str(info.value).startswith(f"--set {override}: key {override.rsplit('.', 1)[0]}: ")


def test_constructor_errors_keep_their_traceback_with_a_note_naming_the_key(tmp_path, monkeypatch):
    from zoo.blocks.mlp import Mlp

    def broken(self, *args, **kwargs):
        raise RuntimeError("a bug in a constructor")

    monkeypatch.setattr(Mlp, "__init__", broken)  # not a user's mistake: its traceback is kept, with notes
    path = write(tmp_path, TINY)
    with pytest.raises(RuntimeError, match="a bug in a constructor") as info:
        zoo.build_model(path)
    assert info.value.__notes__ == [f"while building model.block from {path}:6", f"while building model from {path}:1"]


def test_a_blocks_rule_on_widths_its_backbone_gives_is_one_line_naming_the_block(tmp_path):
    """A plugin backbone's width of 15 for blocks of 2 heads broke the Transformer block's declared rule (dim
    divisible by num_heads), which the recipe's check skips while the parent supplies both: it was the
    attention's ValueError traceback, exit 1."""
    path = write(tmp_path, TINY.replace("dim: 16", "dim: 15"))
    with pytest.raises(UserError, match=rf"^{re.escape(str(path))}:6: key model.block: dim=15 must be divisible by "
                                        r"num_heads=2 \(dim, num_heads set by the component that builds this one\)"):
        zoo.build_model(path)


def test_a_constructors_refusal_names_the_file_and_line_of_the_key_it_is_about(tmp_path):
    """A UserError raised inside a backbone's or block's constructor came out with no file, line or key."""
    text = "model:\n  type: dit\n  input_size: 8\n  patch_size: 2\n  hidden_size: 32\n  depth: 1\n" \
           "  num_heads: 2\n  num_classes: 4\n  mlp_ratio: 0.001\n"
    path = write(tmp_path, text)
    with pytest.raises(UserError, match=rf"^{re.escape(str(path))}:1: key model: mlp_ratio 0.001 gives a block"):
        zoo.build_model(path)
    text = ("model:\n  type: dimr\n  input_size: 8\n  num_classes: 5\n  branches:\n"
            "    - {dim: 16, depth: 1, patch_size: 1, block: {type: convnext, norm: td_rmsnorm}}\n")
    path = write(tmp_path, text)  # the error names model.num_classes: its own line, not the model's
    with pytest.raises(UserError, match=rf"^{re.escape(str(path))}:4: key model.num_classes: model.num_classes is 5"):
        zoo.build_model(path)


@pytest.mark.parametrize("block, expected", [
    ("{type: transformer, cond_dim: 16}", "key model.block.cond_dim: cond_dim is set by the DiT (its width) for every "
     "block; the recipe may not set it (remove cond_dim from the block)"),  # it said: set it on the DiT (no such key)
    ("{type: transformer, num_heads: 4}", "key model.block.num_heads: set num_heads on the DiT, not on its block"),
])
def test_a_block_setting_what_the_backbone_passes_says_where_it_belongs(block, expected):
    with pytest.raises(UserError, match=re.escape(expected)):
        zoo.build_model("dit_s_2", [f"model.block={block}"])


def test_build_component_checks_like_a_recipe():
    block = zoo.build_component("block", {"type": "transformer", "num_heads": 2, "norm": "rmsnorm"}, dim=8)
    assert type(block.norm1).__name__ == "RMSNorm" and block.attn.num_heads == 2
    with pytest.raises(UserError, match="key mlp_ration: unknown parameter 'mlp_ration'"):
        zoo.build_component("block", {"type": "transformer", "mlp_ration": 2}, dim=8, num_heads=2)
    with pytest.raises(UserError, match="needs num_heads"):
        zoo.build_component("block", "transformer", dim=8)


@pytest.mark.parametrize("override", ["model.norm=null", "model.block=null", "model.mlp=null"])
def test_null_for_a_component_is_refused_at_its_key(override):
    """--set model.norm=null was "'NoneType' object is not callable" while building, exit 1."""
    key = override.split("=")[0]
    with pytest.raises(UserError, match=rf"key {key}: {key.split('.')[-1]} takes a (conditioner|block); null leaves none"):
        zoo.load_recipe("dit_s_2", [override])


def test_a_recipe_dict_with_numpy_scalars_reads_as_yaml_would_give_it():
    """A sweep built with numpy (depth=np.int64(2)) was refused: "expected int, got int64"."""
    import numpy as np

    spec = dict(type="dit", input_size=np.int64(8), patch_size=2, in_channels=4, hidden_size=np.int32(32),
                depth=np.int64(2), num_heads=2, mlp_ratio=np.float64(2.0), learn_sigma=np.bool_(False), num_classes=5)
    model = zoo.build_model(spec)
    assert len(model.blocks) == 2 and model.out_channels == 4
    recipe = zoo.load_recipe({"model": spec, "train": {"betas": (np.float32(0.5), 0.99)}})
    assert type(recipe["model"]["depth"]) is int and recipe["train"]["betas"] == [0.5, 0.99]
    # the same values as overrides: "an override must be plain data" before
    overrides = {"model.depth": np.int64(3), "model.mlp_ratio": np.float32(1.5), "model.learn_sigma": np.bool_(True),
                 "train.betas": (np.float64(0.5), np.float32(0.25))}
    recipe = zoo.load_recipe({"model": spec}, overrides)
    assert recipe["model"]["depth"] == 3 and type(recipe["model"]["depth"]) is int and recipe["model"]["mlp_ratio"] == 1.5
    assert recipe["model"]["learn_sigma"] is True and recipe["train"]["betas"] == [0.5, 0.25]
    assert len(zoo.build_model(spec, [("model.depth", np.int64(1))]).blocks) == 1


def test_an_override_given_from_python_is_named_as_given_not_as_a_set():
    """zoo.build_model("emoji32/dit", {"model.depth": 0}) said "--set model.depth=0: ...", though no --set was used."""
    import numpy as np

    for overrides, message in [
            ({"model.depth": np.int64(0)}, "override {'model.depth': 0}: key model.depth: depth must be a positive "),
            ([("model.depth.x", 1)], "override {'model.depth.x': 1}: cannot set model.depth.x: model.depth is 4,"),
            ({"model.norm.cond_dim": 8}, "override {'model.norm.cond_dim': 8}: key model.norm: cond_dim is set by"),
            ({"train.min_lr": 1.0}, "override {'train.min_lr': 1.0}: key train.min_lr: min_lr 1 is above lr"),
            (["model.depth=0"], "--set model.depth=0: key model.depth: ")]:  # a --set text stays one
        with pytest.raises(UserError) as err:
            zoo.load_recipe("emoji32/dit", overrides)  # every section checked,
            zoo.build_model("emoji32/dit", overrides)  # then the model built (a clash shows only there)
        assert str(err.value).startswith(message), overrides
    recipe = resolve("emoji32/dit", {"model.depth": 2})  # within, a --set all the same: type changes keep it
    assert recipe.origins[("model", "depth")] == ("--set model.depth=2", None)


def test_build_model_of_something_that_is_not_a_recipe_says_what_it_takes():
    with pytest.raises(UserError, match="a recipe is a path, a recipe name or a dict, got NoneType"):
        zoo.build_model(None)


def test_build_component_checks_what_the_parent_passes_too():
    """dim=16.0 was a TypeError deep in torch, dim=-3 a negative-dimension RuntimeError, and
    num_heads 5 for dim 384 a ValueError: the parent's plain values are checked as a recipe's."""
    for kind, spec, parent, message in [
            ("conditioner", "layernorm", dict(dim=16.0), "key dim: expected int, got float 16.0"),
            ("conditioner", "layernorm", dict(dim=-3), "dim must be a positive integer"),
            ("block", {"type": "transformer", "num_heads": 5}, dict(dim=384), "dim=384 must be divisible by num_heads=5"),
            ("block", {"type": "transformer", "num_heads": 2}, dict(dim=8, num_heads=2), "num_heads is given both")]:
        with pytest.raises(UserError, match=message):
            zoo.build_component(kind, spec, **parent)
    from zoo.conditioning.layernorm import RMSNorm  # a factory is passed through, not checked as data
    block = zoo.build_component("block", "transformer", dim=8, num_heads=2, norm=RMSNorm)
    assert type(block.norm1) is RMSNorm


@pytest.mark.parametrize("model, override, message", [
    # DiMR builds its blocks as block(dim, cond_dim=...): a Transformer block needs its own num_heads
    # (it was a TypeError traceback, because num_heads counted as passed by every parent)
    ("dimr_m_3r", "model.branches.2.block=transformer",
     "key model.branches.2.block: block 'transformer' .* needs num_heads"),
    # DiT and U-ViT pass num_heads (U-ViT also qkv_bias) to every block: a ConvNeXt block takes neither
    ("dit_s_2", "model.block=convnext", r"does not fit here: it is built as block\(dim, num_heads=\.\.\., "
     r"mlp_ratio=\.\.\., norm=\.\.\., mlp=\.\.\., cond_dim=\.\.\.\), and it does not take num_heads"),
    ("uvit_m_4", "model.block=convnext", "does not take num_heads, qkv_bias"),
])
def test_a_block_that_cannot_serve_its_backbone_is_refused_at_check_time(model, override, message):
    with pytest.raises(UserError, match=message):
        zoo.load_recipe(model, [override])


def test_a_block_taking_what_its_backbone_passes_builds_and_a_conditioner_must_take_cond_dim():
    """A plugin block with required norm/mlp (DiT passes both) was refused as "needs norm, mlp";
    a conditioner without cond_dim failed while building with an unexpected-keyword TypeError."""
    import torch

    @zoo.register("block")
    class StrictBlock(torch.nn.Module):
        def __init__(self, dim, num_heads, norm, mlp, mlp_ratio=4.0, cond_dim=None):
            super().__init__()
            self.norm, self.linear = norm(dim, cond_dim=cond_dim), torch.nn.Linear(dim, dim)

        def forward(self, x, cond):
            h, _ = self.norm(x, cond)
            return x + self.linear(h)

    @zoo.register("conditioner")
    class NoCondNorm(torch.nn.Module):
        def __init__(self, dim):
            super().__init__()

    dit = dict(type="dit", input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=2)
    try:
        model = zoo.build_model({**dit, "block": "strict_block"})
        assert type(model.blocks[0]).__name__ == "StrictBlock"
        with pytest.raises(UserError, match="key model.norm: conditioner 'no_cond_norm' .* does not fit here: it is "
                                            r"built as norm\(dim, cond_dim=\.\.\.\), and it does not take cond_dim"):
            zoo.build_model({**dit, "norm": "no_cond_norm"})
    finally:
        registry.unregister("block", "strict_block")
        registry.unregister("conditioner", "no_cond_norm")


# --- sections -------------------------------------------------------------------------------------


def test_a_parameter_named_like_a_norm_takes_what_its_annotation_says():
    """A plugin block's `qk_norm: bool = False` was taken for a conditioner by its name: --set
    model.block.qk_norm=true was "expected a conditioner name". The annotation wins; the name only where it is silent."""
    from zoo.blocks.transformer import TransformerBlock

    @zoo.register("block", "qk_block")
    class QKBlock(TransformerBlock):
        def __init__(self, dim, num_heads, mlp_ratio=4.0, norm=None, mlp=None, cond_dim=None,
                     qk_norm: bool = False, out_norm: Literal["none", "rms"] | None = None, pre_norm=None):
            super().__init__(dim, num_heads, mlp_ratio, cond_dim=cond_dim,
                             **{k: v for k, v in (("norm", norm), ("mlp", mlp)) if v is not None})
            self.qk_norm, self.out_norm, self.pre_norm = qk_norm, out_norm, pre_norm

    dit = dict(type="dit", input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=1, num_heads=2)
    try:
        block = zoo.build_model({**dit, "block": {"type": "qk_block", "qk_norm": True, "out_norm": "rms"}}).blocks[0]
        assert block.qk_norm is True and block.out_norm == "rms"
        with pytest.raises(UserError, match=r"key model.block.qk_norm: expected bool, got str 'layernorm'"):
            zoo.build_model({**dit, "block": {"type": "qk_block", "qk_norm": "layernorm"}})
        block = zoo.build_model({**dit, "block": {"type": "qk_block", "pre_norm": "layernorm"}}).blocks[0]
        assert isinstance(block.pre_norm, Factory)  # unannotated: its name says it is a conditioner
        with pytest.raises(UserError, match=r"key model.block.pre_norm: expected a conditioner name"):
            zoo.build_model({**dit, "block": {"type": "qk_block", "pre_norm": True}})
        from zoo.commands.list import parameter_rows  # zoo list block qk_block: the same reading

        kinds = {name: kind for name, kind, _, _ in parameter_rows(QKBlock)}
        assert kinds["qk_norm"] == "bool" and kinds["pre_norm"] == "conditioner component"
    finally:
        registry.unregister("block", "qk_block")


def test_section_validators_are_a_hook_for_other_modules(tmp_path, monkeypatch):
    def check_train(section, recipe):
        if section.get("steps", 0) < 0:
            raise recipe.error(("train", "steps"), "steps must be >= 0")

    monkeypatch.setitem(SECTION_VALIDATORS, "train", check_train)
    monkeypatch.setitem(SECTION_VALIDATORS, "eval", lambda section, recipe: None)
    path = write(tmp_path, TINY + "train:\n  steps: -1\neval: {every: 5}\n")
    message = str(pytest.raises(UserError, zoo.load_recipe, path).value)
    assert message == f"{path}:11: key train.steps: steps must be >= 0"
    assert zoo.load_recipe(path, ["train.steps=3"])["eval"] == {"every": 5}  # a hooked section is legal
    assert len(zoo.build_model(path).blocks) == 2  # build_model checks and builds the model section only
    monkeypatch.delitem(SECTION_VALIDATORS, "eval")
    assert "unknown section 'eval'" in str(pytest.raises(UserError, zoo.load_recipe, path, ["train.steps=3"]).value)


def test_sections_must_be_mappings_and_the_model_must_exist(tmp_path):
    path = write(tmp_path, TINY + "train: 3\n")
    assert str(pytest.raises(UserError, zoo.load_recipe, path).value) == \
        f"{path}:10: key train: section 'train' must be a mapping, got int"
    empty = write(tmp_path, "train: {steps: 1}\n", "empty.yaml")
    assert "the recipe has no model section" in str(pytest.raises(UserError, zoo.build_model, empty).value)


def test_yaml_aliases_are_copies_so_an_override_changes_one_place(tmp_path):
    path = tmp_path / "alias.yaml"
    path.write_text(textwrap.dedent("""\
        _base_: dit_s_2
        model:
          mlp: &m {type: mlp, act: gelu_tanh}
        sample:
          extra: *m
        """))
    data = resolve(path, ["model.mlp.act=gelu"]).data
    assert data["model"]["mlp"]["act"] == "gelu" and data["sample"]["extra"]["act"] == "gelu_tanh"


def test_base_names_a_shipped_recipe_and_a_child_may_refine_or_replace_a_component(tmp_path):
    (tmp_path / "mine.yaml").write_text("_base_: dit_s_2\nmodel: {depth: 4, block: {qkv_bias: false}}\n")
    model = resolve(tmp_path / "mine.yaml").data["model"]
    assert model["depth"] == 4 and model["hidden_size"] == 384  # the shipped dit_s_2 underneath
    assert model["block"] == {"type": "transformer", "qkv_bias": False}  # the base's bare name, refined
    (tmp_path / "target.yaml").write_text("_base_: dit_s_2\nmodel: {_target_: zoo.backbones.uvit.UViT, img_size: 32}\n")
    assert resolve(tmp_path / "target.yaml").data["model"] == {"_target_": "zoo.backbones.uvit.UViT", "img_size": 32}
    (tmp_path / "typo.yaml").write_text("_base_: dit_s_22\n")
    with pytest.raises(UserError, match="base recipe not found: 'dit_s_22'.*among the shipped recipes") as info:
        resolve(tmp_path / "typo.yaml")
    assert "did you mean dit_s_2.yaml" in info.value.suggestion  # a typo'd name is matched as a missing recipe is
    (tmp_path / "sub.yaml").write_text("_base_: emoji32/dimr2r\n")  # subfolder and all
    with pytest.raises(UserError, match="did you mean emoji32/dimr_2r.yaml"):
        resolve(tmp_path / "sub.yaml")


def test_overrides_given_as_one_string_and_non_ascii_digits_in_keys():
    assert zoo.load_recipe("dit_s_2", "model.depth=6")["model"]["depth"] == 6
    # (key, value) pairs, as dict(overrides).items() gives them: an AttributeError ('partition') before
    assert zoo.load_recipe("dit_s_2", [("model.depth", 6), ("model.num_heads", 3)])["model"]["num_heads"] == 3
    with pytest.raises(UserError, match=r"^an override is 'key=VALUE' text, got 6 "):
        zoo.load_recipe("dit_s_2", [6])
    with pytest.raises(UserError, match="²"):
        zoo.load_recipe("dit_s_2", ["model.²=1"])


def test_a_multiscale_loss_must_fit_the_model_before_training():
    """One coefficient per DiMR branch, and no multi-scale loss on a one-output backbone: refused at load,
    not as a ValueError at the first training step."""
    with pytest.raises(UserError) as info:
        zoo.load_recipe("emoji32/dimr_2r", ["diffusion.objective.coeffs=[1.0]"])
    assert str(info.value).endswith("key diffusion.objective.coeffs: 1 coefficient for 2 branches "
                                    "(give 2 coefficients, one per branch, lowest resolution first)")
    with pytest.raises(UserError, match="needs a multi-branch model \\(DiMR\\), not dit"):
        zoo.load_recipe("dit_s_2", ["diffusion.objective={type: multiscale, coeffs: [1.0]}"])
    assert zoo.load_recipe("dimr_xl_3r")["diffusion"]["objective"]["coeffs"] == [0.0625, 0.25, 1.0]
    with pytest.raises(UserError, match="every coefficient is 0: the loss would be 0"):  # it trained nothing, exit 0
        zoo.load_recipe("emoji32/dimr_2r", ["diffusion.objective.coeffs=[0, 0]"])
    # the model is checked first: its own mistake is named, not the coefficients that follow from it
    with pytest.raises(UserError, match="key model.branches: DiMR needs at least one branch in model.branches$"):
        zoo.load_recipe("emoji32/dimr_2r", ["model.branches=[]"])
    # none written: it was blamed on model.input_size, the one key of the layout rule the recipe wrote
    with pytest.raises(UserError, match=r"key model: backbone 'dimr' \(zoo.backbones.dimr:DiMR\) needs branches"):
        zoo.load_recipe({"model": {"type": "dimr", "input_size": 32, "in_channels": 3, "num_classes": 10}})


@pytest.mark.parametrize("key, keys", [("objective", "type, vlb_weight, decoder_cdf, coeffs"),
                                       ("time_sampling", "type, mean, std")])
def test_a_typo_in_an_objective_or_time_sampling_without_a_type_is_named(tmp_path, key, keys):
    """{tpye: eps_mse} said "type must be one of eps_mse, hybrid_vlb, multiscale, got None": a type the
    user never wrote, and not the key they did."""
    model = "{type: dit, input_size: 8, patch_size: 2, in_channels: 3, hidden_size: 32, depth: 2, num_heads: 2}"
    (tmp_path / "r.yaml").write_text(f"model: {model}\ndiffusion:\n  {key}: {{tpye: x}}\n")
    with pytest.raises(UserError) as info:
        zoo.load_recipe(tmp_path / "r.yaml")
    assert info.value.key_path == f"diffusion.{key}.tpye" and info.value.suggestion == "did you mean type?"
    assert info.value.message.endswith(f"its keys are {keys}")
    (tmp_path / "r.yaml").write_text(f"model: {model}\ndiffusion:\n  {key}: {{{keys.split(', ')[1]}: 1.0}}\n")
    with pytest.raises(UserError, match=r"type must be one of .* got None"):  # a real key, no type: not "must be null"
        zoo.load_recipe(tmp_path / "r.yaml")


def test_a_non_empty_parameter_whose_default_is_none_stays_optional(tmp_path):
    """DiMR's branches=() (NonEmpty) must be given; an optional NonEmpty list whose default is None was made
    required too ("needs picks"), though picks: null, its own default, built."""
    assert "picks" not in zoo.load_recipe(write(tmp_path, "model: {type: typed_net, count: 1}\n"))["model"]
    with pytest.raises(UserError, match="picks"):
        zoo.load_recipe(write(tmp_path, "model: {type: typed_net, count: 1, picks: []}\n"))


def test_a_set_on_a_list_item_is_blamed_for_the_list():
    """--set train.betas.1=1.5 was reported at the shipped file's betas line."""
    with pytest.raises(UserError) as info:
        zoo.load_recipe("emoji32/dimr_2r", ["train.betas.1=1.5"])
    assert (info.value.file, info.value.key_path) == ("--set train.betas.1=1.5", "train.betas")
    assert zoo.load_recipe("emoji32/dimr_2r", ["train.betas.1=0.99"])["train"]["betas"][1] == 0.99
    # a typo'd key before the index is still named as one (a refusal of the index had hidden it)
    with pytest.raises(UserError, match=r"unknown key 'beta' in train.*did you mean betas"):
        zoo.load_recipe("emoji32/dimr_2r", ["train.beta.1=0.95"])


def test_set_under_a_plain_value_says_it_is_a_value_and_blames_the_set():
    with pytest.raises(UserError, match=r"^--set model.mlp.act.foo=1: cannot set model.mlp.act.foo: model.mlp.act is "
                                        r"'gelu_tanh', a value rather than a component"):
        zoo.load_recipe("dit_s_2", ["model.mlp.act.foo=1"])
    assert zoo.load_recipe("dit_s_2", ["model.block.qkv_bias=false"])["model"]["block"] == {
        "type": "transformer", "qkv_bias": False}  # a bare component name still takes keys


def test_a_mistyped_recipe_name_is_matched_in_the_subfolders_too():
    with pytest.raises(UserError, match=r"did you mean emoji32/dimr_2r\.yaml\?"):  # right name, folder left out
        zoo.load_recipe("dimr_2r")
    with pytest.raises(UserError, match=r"did you mean emoji32/dimr_2r\.yaml, "):
        zoo.load_recipe("emoji32/dimr2r")
    with pytest.raises(UserError, match=r"did you mean dimr_xl_2r\.yaml, ") as err:
        zoo.load_recipe("dimr_xl_2")
    assert "_base_" not in str(err.value)  # shared bases are not recipes to train


def test_a_missing_absolute_recipe_path_names_the_closest_shipped_recipes(tmp_path):
    """/nonexistent/dit_s_3.yaml said only "recipe file not found", though docs/errors.md promises the closest."""
    with pytest.raises(UserError) as err:
        zoo.load_recipe(tmp_path / "runs" / "dit_s_3.yaml")
    assert str(err.value) == (f"recipe file not found: {tmp_path / 'runs' / 'dit_s_3.yaml'} "
                              "(did you mean dit_s_8.yaml, dit_s_4.yaml or dit_s_2.yaml?)")


def test_a_learning_rate_decay_cannot_end_above_its_start():
    lr = "train.lr=1e-3"  # set here, so that tuning a recipe's rate cannot move this test's edge cases
    with pytest.raises(UserError, match=r"--set train.min_lr=0.1: key train.min_lr: min_lr 0.1 is above lr 0.001"):
        zoo.load_recipe("emoji32/dimr_2r", [lr, "train.min_lr=0.1"])
    assert zoo.load_recipe("emoji32/dimr_2r", [lr, "train.min_lr=0.1", "train.lr_schedule=constant"])  # no decay: unused
    assert zoo.load_recipe("emoji32/dimr_2r", [lr, "train.min_lr=1e-3"])["train"]["min_lr"] == 1e-3  # equal: a flat end


def test_every_section_key_says_what_it_must_be_as_a_noun():
    """A str key's Doc is what "KEY must be ..." says: init_from read "must be a new run starts from this
    checkpoint's (EMA) weights: fine-tuning or null", eval_ref "must be eval_every reference: .npz, ..."."""
    from zoo.validate import SECTION_TABLES, _load_section_validators, table_rows

    _load_section_validators()
    for section, table in SECTION_TABLES.items():
        for key, text in table_rows(table):
            assert text == "Any" or text.startswith(("a ", "an ", "one of ", "true or false")), (section, key, text)
    for key, text in [("init_from", "a checkpoint whose (EMA) weights a new run starts from (fine-tuning)"),
                      ("eval_ref", "a reference for the eval_every FDs (an .npz, an image folder or dataset[:split])")]:
        with pytest.raises(UserError) as err:
            zoo.load_recipe("emoji32/dit", [f"train.{key}=3"])
        assert str(err.value) == f"--set train.{key}=3: key train.{key}: {key} must be {text} or null, got 3"


def test_a_home_relative_recipe_and_base_are_expanded_and_a_special_file_is_no_recipe(tmp_path, monkeypatch):
    """zoo.build_model("~/r.yaml") and `_base_: ~/r.yaml` said "recipe file not found" (only a shell expands ~)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    write(tmp_path, TINY, "base.yaml")
    write(tmp_path, "_base_: ~/base.yaml\nmodel: {depth: 3}\n", "child.yaml")
    assert zoo.load_recipe("~/base.yaml")["model"]["depth"] == 2
    assert zoo.load_recipe("~/child.yaml")["model"]["depth"] == 3
    with pytest.raises(UserError, match=r"^recipe /dev/null is not a regular file"):  # it said "not found"
        zoo.load_recipe("/dev/null")


def test_a_binary_file_given_as_a_recipe_is_named_for_what_it_is(tmp_path):
    """`zoo build grid.png` said 'refused: a recipe of 428,623 bytes (at most 262,144)', as if the recipe were
    merely too long; a text file with one stray byte keeps the reader's message, which names its position."""
    import io

    from PIL import Image

    png = io.BytesIO()
    Image.new("RGB", (600, 600)).save(png, format="PNG")
    (tmp_path / "grid.png").write_bytes(png.getvalue() + bytes(300_000))  # past the size limit too
    torch.save({"w": torch.zeros(2)}, tmp_path / "weights.pt")
    (tmp_path / "noise.yaml").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "latin1.yaml").write_bytes(b"model:\n  type: dit  # caf\xe9\n")
    for name, said in (("grid.png", "a PNG image"), ("weights.pt", "a zip archive (a torch checkpoint?)"),
                       ("noise.yaml", "binary data")):
        with pytest.raises(UserError) as err:
            zoo.load_recipe(tmp_path / name)
        assert err.value.message == f"not a YAML recipe: it is {said}" and err.value.file == str(tmp_path / name)
    with pytest.raises(UserError, match=r"cannot read recipe: 'utf-8' codec can't decode byte 0xe9 in position 25"):
        zoo.load_recipe(tmp_path / "latin1.yaml")
    (tmp_path / "utf16.yaml").write_text("model:\n  type: dit\n", encoding="utf-16")  # Windows editors: NULs, text
    with pytest.raises(UserError, match=r"the recipe is UTF-16 or UTF-32 text; zoo reads UTF-8 \(save it as UTF-8"):
        zoo.load_recipe(tmp_path / "utf16.yaml")


def test_a_broken_rule_is_blamed_on_the_file_that_set_its_key_not_the_base(tmp_path, capsys):
    """num_heads: 5 in a child of dit_s_2 was blamed on the shipped file's hidden_size line, naming a file the
    user did not write; a --set that changed a block's type was blamed on the file's block: line."""
    from zoo.cli import main

    (tmp_path / "child.yaml").write_text("_base_: dit_s_2\nmodel:\n  num_heads: 5\n")
    assert main(["build", str(tmp_path / "child.yaml")]) == 2
    assert capsys.readouterr().err.startswith(f"zoo: error: {tmp_path / 'child.yaml'}:3: key model.num_heads: "
                                              "hidden_size=384 must be divisible by num_heads=5")
    tiny = Path(__file__).parent / "recipes" / "tiny_dimr_pixels.yaml"
    assert main(["build", str(tiny), "--set", "model.branches.1.block.type=transformer"]) == 2
    assert capsys.readouterr().err.startswith("zoo: error: --set model.branches.1.block.type=transformer: key "
                                              "model.branches.1.block: block 'transformer'")


@pytest.mark.parametrize("argv", [["train", "dit_s_2", "--out", "run"], ["build", "emoji32/dit"],
                                  ["compare", "emoji32/dit", "--no-time"], ["sample", "dit_s_2", "--out", "s.png"]],
                         ids=["train", "build", "compare", "sample"])
def test_a_folder_named_like_a_shipped_recipe_is_answered_with_the_recipes_file_name(argv, tmp_path, monkeypatch,
                                                                                        capsys):
    """In a folder holding ./dit_s_2/ (or ./emoji32/dit/) the bare name means that folder: zoo sample said to
    give dit_s_2.yaml, while zoo train, build and compare said only 'give a recipe's .yaml file', though
    the shipped recipe's name works from anywhere else. Every command now names the file that works."""
    from zoo.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "dit_s_2").mkdir()
    (tmp_path / "emoji32" / "dit").mkdir(parents=True)
    assert main(argv) == 2
    name = argv[1]
    assert capsys.readouterr().err.endswith(
        f"(for the shipped recipe give {name}.yaml: the bare name {name} means this folder)\n")
