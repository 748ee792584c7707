"""Models from another codebase (``_target_`` classes) through zoo's commands: zoo measures a model on the
meta device (memory before a run, FLOPs), and a model that cannot run there, or has no example inputs,
gets one line instead of a traceback."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

import zoo
from zoo.cli import main

TINY = Path(__file__).parent / "recipes" / "tiny_train.yaml"

PLUGIN = '''
import torch
from torch import nn


class AssertBlock(nn.Module):
    """A block that checks its input for NaN: data-dependent, so it cannot run on meta tensors."""

    def __init__(self, dim, num_heads=1, mlp_ratio=4.0, norm=None, mlp=None, cond_dim=None):
        super().__init__()
        self.fc = nn.Linear(dim, dim)

    def forward(self, x, cond):
        assert not torch.isnan(x).any(), "NaN in block input"
        return x + self.fc(x)


class PlainNet(nn.Module):
    """A backbone with forward(x, t, y) and nothing else zoo's own backbones have."""

    def __init__(self, in_channels=3, input_size=8, num_classes=4):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, 3, padding=1)

    def forward(self, x, t, y=None):
        return self.conv(x)
'''
ASSERT_LINE = next(i for i, line in enumerate(PLUGIN.splitlines(), 1) if "assert not" in line)


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    (tmp_path / "lab_plugin.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def _recipe(directory: Path, model: str) -> Path:
    path = directory / "r.yaml"
    path.write_text(textwrap.dedent(f"""\
        _base_: {TINY}
        model: {model}
        train: {{steps: 2, sample_every: 0, ckpt_every: 0, log_every: 1}}
        """))
    return path


def test_a_block_that_cannot_run_on_meta_trains_and_samples_and_its_flop_count_names_its_line(plugin, capsys):
    """The memory estimate's meta forward ended zoo train and zoo sample with a traceback from the
    plugin's `assert`, though the model runs on real tensors."""
    recipe = _recipe(plugin, "{block: {_target_: lab_plugin.AssertBlock}}")
    assert main(["train", str(recipe), "--out", str(plugin / "run")]) == 0
    out = capsys.readouterr().out
    assert ("zoo train: note: memory not checked before the first step: DiT cannot run on the meta device "
            f"(RuntimeError at lab_plugin.py:{ASSERT_LINE}: ") in out
    assert (plugin / "run" / "last" / "ema.safetensors").is_file()
    assert main(["sample", str(plugin / "run"), "--n", "2", "--steps", "2", "--out", str(plugin / "g.png")]) == 0
    assert (plugin / "g.png").is_file()
    capsys.readouterr()
    assert main(["build", str(recipe), "--flops"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"DiT cannot run on the meta device (RuntimeError at lab_plugin.py:{ASSERT_LINE}" in err
    assert "(count on real tensors: zoo build --flops --device cpu" in err
    assert main(["build", str(recipe), "--flops", "--device", "cpu"]) == 0


def test_a_backbone_without_example_inputs_is_one_line_in_train_and_sample(plugin, capsys):
    recipe = _recipe(plugin, "{_target_: lab_plugin.PlainNet, in_channels: 3, input_size: 8, num_classes: 4}")
    expected = ("zoo: error: PlainNet has no example_inputs(batch) method, so zoo cannot make its inputs (give the "
                "class example_inputs(batch) returning its forward's arguments (x, t, y) for a batch of that size)\n")
    for argv in (["train", str(recipe), "--out", str(plugin / "run")],
                 ["sample", str(recipe), "--n", "2", "--steps", "2", "--out", str(plugin / "g.png")]):
        assert main(argv) == 2
        assert capsys.readouterr().err.endswith(expected)
    assert not (plugin / "g.png").exists()


def test_the_memory_estimate_of_a_model_that_cannot_run_on_meta_is_skipped_not_raised(plugin):
    import torch

    from zoo.memory import require_memory

    with torch.device("meta"):
        model = zoo.build_model(zoo.load_recipe(_recipe(plugin, "{block: {_target_: lab_plugin.AssertBlock}}")))
    est = require_memory(model, "cpu", 4, available=1)  # 1 byte free: any measured estimate would refuse
    assert est.total(4) == 0 and est.unmeasured.startswith("DiT cannot run on the meta device")


def _labnet_distribution(folder: Path, version: str = "0.1") -> Path:
    """An installed distribution ``zoo-labnet`` providing the package ``labnet`` (no entry points)."""
    (folder / "labnet").mkdir(parents=True)
    (folder / "labnet" / "__init__.py").write_text(PLUGIN)
    info = folder / f"zoo_labnet-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: zoo-labnet\nVersion: {version}\n")
    (info / "top_level.txt").write_text("labnet\n")
    return folder


@pytest.fixture
def labnet(tmp_path, monkeypatch):
    import sys

    from zoo import registry

    monkeypatch.syspath_prepend(str(_labnet_distribution(tmp_path / "site")))
    registry.refresh()
    yield tmp_path
    sys.modules.pop("labnet", None)
    registry.refresh()


def test_a_checkpoint_of_a_target_model_records_the_distribution_providing_it(labnet):
    """Only registered names were recorded: a ``_target_: labnet.PlainNet`` run loaded elsewhere said
    'cannot import' with no word of the distribution it needs."""
    import json

    from zoo import checkpoint as ckpt

    recipe = {"model": {"_target_": "labnet.PlainNet", "in_channels": 3}}
    ckpt.save_checkpoint(labnet / "run", zoo.build_model(recipe), recipe)
    config = json.loads((labnet / "run" / ckpt.CONFIG).read_text())
    assert config["plugins"] == {"zoo-labnet": "0.1"}
    ckpt.save_checkpoint(labnet / "own", zoo.build_model({"model": {"_target_": "zoo.backbones.dit.DiT",
                         "input_size": 8, "patch_size": 2, "in_channels": 4, "hidden_size": 32, "depth": 1,
                         "num_heads": 2}}), {"model": {"_target_": "zoo.backbones.dit.DiT", "input_size": 8,
                         "patch_size": 2, "in_channels": 4, "hidden_size": 32, "depth": 1, "num_heads": 2}})
    assert "plugins" not in json.loads((labnet / "own" / ckpt.CONFIG).read_text())  # zoo's own: not listed
    from zoo.registry import plugins_named  # nor zoo's dependencies (torch, timm): installed with zoo itself
    assert plugins_named({"model": {"block": {"_target_": "torch.nn.Identity"}, "x": {"_target_": "timm.layers.Mlp"}},
                          "y": {"_target_": "labnet.PlainNet"}}) == {"zoo-labnet": "0.1"}


def test_a_checkpoint_written_with_another_plugin_version_says_both_versions(labnet):
    """The hint was given for a plugin that is not installed only: one installed at another version, whose
    class is gone, failed with no word of the version the checkpoint was written with."""
    import json

    from zoo import checkpoint as ckpt
    from zoo.errors import UserError

    recipe = {"model": {"_target_": "labnet.PlainNet", "in_channels": 3}}
    ckpt.save_checkpoint(labnet / "run", zoo.build_model(recipe), recipe)
    config_path = labnet / "run" / ckpt.CONFIG
    config = json.loads(config_path.read_text())
    config["plugins"] = {"zoo-labnet": "0.3"}
    config["recipe"]["model"]["_target_"] = "labnet.OldNet"  # what 0.3 had, 0.1 has not
    config_path.write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"cannot import _target_ 'labnet.OldNet'.*\(it was written with "
                       r"zoo-labnet==0\.3 and 0\.1 is installed: pip install zoo-labnet==0\.3\)"):
        ckpt.load_checkpoint(labnet / "run")
