"""The registry: entry-point plugins, lazy loading, broken plugins, duplicates, the decorator."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from fake_plugins import on_sys_path, write_distribution

import zoo
from zoo import registry
from zoo.cli import main
from zoo.errors import UserError

pytestmark = pytest.mark.usefixtures("plugins")


@pytest.fixture
def plugins():
    with on_sys_path():
        yield


def test_builtins_are_entry_points_of_this_distribution():
    entry = registry.find("block", "transformer")
    assert (entry.source, entry.target) == ("zoo-diffusion", "zoo.blocks.transformer:TransformerBlock")
    from zoo.blocks.transformer import TransformerBlock

    assert registry.get("block", "transformer") is TransformerBlock
    assert {"transformer", "mlp", "geglu_mlp"} <= set(registry.names("block"))
    assert {"layernorm", "rmsnorm"} <= set(registry.names("conditioner"))


def test_names_resolve_lazily():
    assert "fake_block" in registry.names("block")
    entry = registry.find("block", "fake_block")
    assert "zoo_fake_plugin" not in sys.modules  # discovered from metadata, not imported
    cls = entry.load()
    assert "zoo_fake_plugin" in sys.modules
    assert cls is sys.modules["zoo_fake_plugin"].ScaleBlock
    assert entry.source == "zoo-fake-plugin"


def test_fake_plugin_block_builds_from_a_recipe():
    recipe = {"model": {"type": "fake_net", "in_features": 3, "dim": 8, "depth": 2,
                        "block": {"type": "fake_block", "init": 0.5, "norm": "rmsnorm"}}}
    model = zoo.build_model(recipe)
    plugin = sys.modules["zoo_fake_plugin"]
    assert isinstance(model, plugin.TinyNet) and len(model.blocks) == 2
    assert all(isinstance(b, plugin.ScaleBlock) for b in model.blocks)
    assert type(model.blocks[0].norm).__name__ == "RMSNorm"
    assert model.blocks[1].scale.tolist() == [0.5] * 8
    # 3*8+8 in, 2 blocks x (8 scale + 8 RMSNorm weight), 8*3+3 out
    assert sum(p.numel() for p in model.parameters()) == 32 + 2 * 16 + 27


def test_broken_plugin_is_reported_by_name_and_breaks_nothing_else():
    with pytest.raises(UserError) as info:
        registry.get("block", "broken_block")
    message = str(info.value)
    for part in ("broken_block", "zoo-broken-plugin", "zoo.blocks", "zoo_broken_plugin:BrokenBlock",
                 "ImportError", "frobnicate"):
        assert part in message
    assert registry.get("block", "fake_block").__name__ == "ScaleBlock"
    assert registry.get("block", "mlp").__name__ == "Mlp"
    assert "broken_block" in registry.names("block")


def test_zoo_list_shows_a_broken_plugin_as_an_error_row(capsys):
    assert main(["list", "block"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.startswith("  ")}
    assert "zoo-broken-plugin" in rows["broken_block"] and "error:" in rows["broken_block"]
    assert "frobnicate" in rows["broken_block"]
    assert rows["fake_block"].split(None, 2)[1:] == ["zoo-fake-plugin", "Residual block adding a learned per-channel scale of its normed input."]
    assert "zoo-diffusion" in rows["transformer"] and "error" not in rows["transformer"]


def test_zoo_list_all_kinds(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for kind, group in registry.GROUPS.items():
        assert f"{kind}s ({group})" in out
    assert "fake_net" in out


def test_two_distributions_claiming_one_name_is_an_error_naming_both(tmp_path):
    write_distribution(tmp_path, "zoo-dup-plugin", "[zoo.blocks]\nmlp = zoo_fake_plugin:ScaleBlock\n")
    with on_sys_path(tmp_path):
        with pytest.raises(UserError) as info:
            registry.get("block", "mlp")
        message = str(info.value)
        assert "registered twice" in message
        assert "zoo-diffusion (zoo.blocks.mlp:Mlp)" in message
        assert "zoo-dup-plugin (zoo_fake_plugin:ScaleBlock)" in message
        assert registry.get("block", "transformer").__name__ == "TransformerBlock"  # other names unaffected
        sources = [e.source for e in registry.entries("block") if e.name == "mlp"]
        assert sorted(sources) == ["zoo-diffusion", "zoo-dup-plugin"]
    assert registry.get("block", "mlp").__name__ == "Mlp"


def test_unknown_name_suggests_close_matches_and_says_where_plugins_come_from():
    with pytest.raises(UserError) as info:
        registry.get("block", "transfomer")
    message = str(info.value)
    assert "unknown block 'transfomer'" in message
    assert "did you mean transformer?" in message
    assert "'zoo.blocks'" in message and "zoo.register('block')" in message
    with pytest.raises(UserError, match="did you mean conditioner"):
        registry.get("conditoner", "layernorm")
    assert registry.check_kind("blocks") == "block"


def test_a_name_of_another_kind_says_which_kind_it_is():
    """``build_component("block", "adaln_zero")`` listed the known blocks only; the name is a conditioner."""
    with pytest.raises(UserError, match=r"unknown block 'adaln_zero'.*\('adaln_zero' is a conditioner, not a block\)"):
        registry.get("block", "adaln_zero")
    with pytest.raises(UserError, match=r"key model.block: unknown block 'td_rmsnorm'.*is a conditioner, not a block"):
        zoo.build_model({"type": "dit", "input_size": 8, "patch_size": 2, "in_channels": 4, "hidden_size": 32,
                         "depth": 1, "num_heads": 2, "block": "td_rmsnorm"})


def test_decorator_registers_in_process():
    @zoo.register("block")
    class PlainDoubleBlock(torch.nn.Module):
        """Doubles its width (a decorator-registered test block)."""

        def __init__(self, dim: int, factor: int = 2):
            super().__init__()
            self.width = dim * factor

    try:
        entry = registry.find("block", "plain_double_block")
        assert entry.source == f"in-process ({__name__})"
        assert zoo.get_component("block", "plain_double_block") is PlainDoubleBlock
        assert zoo.build_component("block", {"type": "plain_double_block", "factor": 3}, dim=4).width == 12
        assert zoo.register("block")(PlainDoubleBlock) is PlainDoubleBlock  # same class again: fine
        with pytest.raises(UserError, match="registered twice in this process"):
            zoo.register("block", "plain_double_block")(type("Other", (), {}))
    finally:
        registry.unregister("block", "plain_double_block")
    with pytest.raises(UserError, match="unknown block"):
        registry.get("block", "plain_double_block")


def test_decorator_clashing_with_an_entry_point_is_refused_at_once_naming_both():
    """It used to be accepted, and then broke that name for every recipe in the process."""
    class Mlp:
        """Not zoo's Mlp."""

    with pytest.raises(UserError) as info:
        zoo.register("block", "mlp")(Mlp)
    assert "block 'mlp' is already registered by distribution zoo-diffusion (zoo.blocks.mlp:Mlp)" in str(info.value)
    assert f"{__name__}:" in str(info.value) and "pick another name" in str(info.value)
    assert registry.get("block", "mlp").__module__ == "zoo.blocks.mlp"  # still zoo's
    from zoo.blocks.mlp import Mlp as ZooMlp

    zoo.register("block", "mlp")(ZooMlp)  # decorating the entry point's own class is not a clash
    try:
        assert registry.get("block", "mlp") is ZooMlp
    finally:
        registry.unregister("block", "mlp")


def test_a_non_callable_entry_is_refused_every_time_it_is_loaded():
    from zoo.registry import Entry

    entry = Entry("block", "not_callable", "some-dist", "some_mod:VALUE", lambda: 42)
    for _ in range(2):
        with pytest.raises(UserError, match="not a class or callable"):
            entry.load()


def test_register_without_its_arguments_says_how_to_call_it():
    with pytest.raises(TypeError, match=r"decorate with @zoo.register\(KIND\)"):
        @zoo.register
        class Forgot:  # noqa: F841
            pass



@pytest.mark.parametrize("name", [5, "", " my_block", ["a"]])
def test_a_name_that_is_no_plain_string_is_refused_at_registration(name):
    """register('block', 5) was accepted, then every names('block') sort failed with a TypeError far away;
    '' silently fell back to the class name."""
    with pytest.raises(UserError, match=r"a component's name is a non-empty string without surrounding spaces"):
        zoo.register("block", name)
    assert all(isinstance(n, str) for n in zoo.registry.names("block"))


class _PlainBlock:
    """Takes a block's arguments but is no nn.Module: PyTorch would refuse it deep in the build."""

    def __init__(self, dim, num_heads=1, mlp_ratio=4.0, norm=None, mlp=None, cond_dim=None, qkv_bias=True):
        self.dim = dim


class _MapBlock(torch.nn.Module):
    """A block on (B, H, W, C) maps that also takes the token blocks' arguments."""

    spatial_input = True

    def __init__(self, dim, num_heads=1, mlp_ratio=4.0, norm=None, mlp=None, cond_dim=None, qkv_bias=True):
        super().__init__()


@pytest.mark.parametrize("spec", ["plain_block_for_test", {"_target_": f"{__name__}._PlainBlock"}])
def test_a_registered_class_that_is_no_module_is_one_line_naming_it(spec, capsys):
    zoo.register("block", "plain_block_for_test")(_PlainBlock)
    try:
        with pytest.raises(UserError, match=r"_PlainBlock.*is a class but not an nn.Module subclass"):
            zoo.build_model("dit_s_2", {"model.block": spec})
        assert main(["build", "dit_s_2", "--set", "model.block=plain_block_for_test"]) == 2
        assert "derive _PlainBlock from torch.nn.Module" in capsys.readouterr().err
    finally:
        registry.unregister("block", "plain_block_for_test")


@pytest.mark.parametrize("recipe", ["dit_s_2", "uvit_m_4"])
def test_a_map_block_in_a_token_backbone_is_refused_before_any_forward(recipe):
    with pytest.raises(UserError, match=r"key model.block: block _MapBlock takes 2-D maps .* passes token sequences"):
        zoo.build_model(recipe, {"model.block": {"_target_": f"{__name__}._MapBlock"}})


REEXPORT = Path(__file__).resolve().parent / "fake_plugins" / "reexport"
TINY_DIT = {"type": "dit", "input_size": 8, "patch_size": 2, "in_channels": 4, "hidden_size": 32, "depth": 1,
            "num_heads": 2, "num_classes": 10}


@pytest.fixture
def reexport_plugin():
    """The plugin whose entry points name classes its package re-exports from a submodule."""
    with on_sys_path(REEXPORT):
        try:
            yield
        finally:
            registry.unregister("block", "reexp_block")
            for name in [m for m in sys.modules if m.split(".")[0] == "zoo_reexp_plugin"]:
                del sys.modules[name]


def test_a_class_reached_by_its_package_and_its_module_is_one_registration(reexport_plugin):
    """Entry ``pkg:ReexpBlock`` and ``@zoo.register`` in pkg.blocks were compared as "module:qualname"
    strings: importing the package raised 'already registered by distribution ...; pkg.blocks:ReexpBlock
    cannot take its name', so the plugin could not be loaded at all."""
    import zoo_reexp_plugin

    cls = zoo_reexp_plugin.ReexpBlock
    assert registry.get("block", "reexp_block") is cls
    assert [e.source for e in registry.entries("block") if e.name == "reexp_block"] == ["zoo-reexp-plugin"]
    model = zoo.build_model({**TINY_DIT, "block": "reexp_block"})
    assert type(model.blocks[0]) is cls
    model = zoo.build_model({**TINY_DIT, "block": {"_target_": "zoo_reexp_plugin.blocks.ReexpBlock"}})
    assert type(model.blocks[0]) is cls


def test_loading_the_re_exported_class_through_its_entry_point_first_works(reexport_plugin):
    model = zoo.build_model({**TINY_DIT, "block": "reexp_block"})
    assert type(model.blocks[0]).__module__ == "zoo_reexp_plugin.blocks"
    assert len([e for e in registry.entries("block") if e.name == "reexp_block"]) == 1


def test_a_target_naming_a_registered_class_by_its_module_is_known_as_registered(reexport_plugin):
    """The _target_ check compared strings too: the entry point's ``pkg:PlainBlock`` beside the class's
    ``pkg.blocks:PlainBlock`` called a registered component 'not ... a registered component'."""
    registry.get("block", "reexp_plain")
    with pytest.raises(UserError, match=r"PlainBlock.*is a class but not an nn.Module subclass"):
        zoo.build_model({**TINY_DIT, "block": {"_target_": "zoo_reexp_plugin.blocks.PlainBlock"}})


def _nameless_distribution(folder: Path) -> Path:
    """An installed distribution whose METADATA has no Name (its entry point names zoo's own block)."""
    info = folder / "nameless-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[zoo.blocks]\nnameless_block = zoo.blocks.transformer:TransformerBlock\n")
    return folder


def test_a_distribution_without_a_name_is_listed_as_unknown_and_works(tmp_path, capsys):
    """ep.dist.name is None there: zoo list crashed (len of None) and naming the block raised
    AttributeError (None.startswith)."""
    with on_sys_path(_nameless_distribution(tmp_path)):
        assert main(["list", "block"]) == 0
        rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.startswith("  ")}
        assert "unknown distribution" in rows["nameless_block"]
        assert main(["list", "block", "nameless_block"]) == 0
        assert "block nameless_block (unknown distribution (zoo.blocks" in capsys.readouterr().out
        model = zoo.build_model({**TINY_DIT, "block": "nameless_block"})
        assert type(model.blocks[0]).__name__ == "TransformerBlock"
        assert registry.plugins_named({"block": "nameless_block"}) == {}


class _Dist:
    """A distribution whose name cannot be read (newer importlib.metadata raise KeyError)."""

    @property
    def name(self):
        raise KeyError("Name")


@pytest.mark.parametrize("dist", [None, _Dist(), type("NoName", (), {"name": None})()])
def test_a_distribution_name_that_cannot_be_read_is_unknown(dist):
    ep = type("EP", (), {"dist": dist})()
    assert registry.distribution_name(ep) == "unknown distribution"
    assert registry.distribution_version("surely-not-installed-zoo-dist") is None


def test_a_plugin_installed_after_the_first_lookup_is_found_without_refresh(tmp_path):
    """The entry points were scanned once: a notebook's ``pip install`` mid-session stayed 'unknown block'."""
    with pytest.raises(UserError, match="unknown block 'late_block'"):
        zoo.build_model({**TINY_DIT, "block": "late_block"})
    write_distribution(tmp_path, "zoo-late-plugin", "[zoo.blocks]\nlate_block = zoo.blocks.transformer:TransformerBlock\n")
    sys.path.insert(0, str(tmp_path))  # what pip does: no registry.refresh()
    try:
        model = zoo.build_model({**TINY_DIT, "block": "late_block"})
        assert type(model.blocks[0]).__name__ == "TransformerBlock"
        assert registry.find("block", "late_block").source == "zoo-late-plugin"
    finally:
        sys.path.remove(str(tmp_path))
        registry.refresh()


@pytest.mark.parametrize("argv", [["list", "block", "broken_block"], ["build", "--help-component", "broken_block"]])
def test_describing_a_broken_component_is_its_error_once_and_exit_2(argv, capsys):
    """It printed the load error twice (as the description and as the arguments) and exited 0."""
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("frobnicate") == 1


def test_a_clashing_name_is_counted_once_and_described_with_every_source(tmp_path, capsys):
    """'blocks: N' counted entries (a clash is one row per source), and ``zoo list block NAME`` named only
    the first source."""
    write_distribution(tmp_path, "zoo-dup-plugin", "[zoo.blocks]\nmlp = zoo_fake_plugin:ScaleBlock\n")
    with on_sys_path(tmp_path):
        assert main(["list", "block"]) == 0
        out = capsys.readouterr().out
        assert f"blocks (zoo.blocks): {len(registry.names('block'))}\n" in out
        assert len(registry.entries("block")) == len(registry.names("block")) + 1
        assert main(["list", "block", "mlp"]) == 2
        err = capsys.readouterr().err
        assert "zoo-diffusion (zoo.blocks.mlp:Mlp)" in err and "zoo-dup-plugin (zoo_fake_plugin:ScaleBlock)" in err


def test_some_of_names_three_in_full_and_counts_the_rest():
    """some_of shows up to three names whole; only past three does it say how many more there are."""
    from zoo.errors import some_of

    assert some_of(["a", "b", "c"]) == "a, b, c"
    assert some_of(list("abcd")) == "a, b, c and 1 more"
