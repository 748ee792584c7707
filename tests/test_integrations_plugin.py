"""The example plugin package (examples/zoo_plugin_example): its entry point adds a block recipes can name."""

from __future__ import annotations

import contextlib
import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
import torch
from fake_plugins import write_distribution

import zoo
from zoo import registry
from zoo.conditioning.base import Conditioning, apply_gate
from zoo.errors import UserError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest depends on tomli there
    import tomli as tomllib

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "zoo_plugin_example"
DIT = {"type": "dit", "input_size": 8, "patch_size": 2, "in_channels": 4, "hidden_size": 32, "depth": 2,
       "num_heads": 2, "class_dropout_prob": 0.1, "num_classes": 10}


pytestmark = pytest.mark.usefixtures("one_thread")


@contextlib.contextmanager
def on_path(*folders: Path) -> Iterator[None]:
    """Make the distributions in ``folders`` importable and visible to the registry, then forget them."""
    sys.path[:0] = [str(f) for f in folders]
    registry.refresh()
    try:
        yield
    finally:
        for folder in folders:
            sys.path.remove(str(folder))
        sys.modules.pop("zoo_plugin_example", None)
        registry.refresh()


def _entry_points_txt() -> str:
    """The example's ``[project.entry-points]`` from its pyproject.toml, as an installer writes them."""
    groups = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]["entry-points"]
    return "".join(f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()) for group, eps in groups.items())


def _check_plugin_block() -> None:
    entry = registry.find("block", "parallel_transformer")
    assert (entry.source, entry.target) == ("zoo-plugin-example", "zoo_plugin_example:ParallelTransformerBlock")
    torch.manual_seed(0)
    parallel = zoo.build_model({**DIT, "block": "parallel_transformer"}).double().eval()
    sequential = zoo.build_model(DIT).double().eval()
    state = {k: torch.randn_like(v) for k, v in sequential.state_dict().items()}
    parallel.load_state_dict(state), sequential.load_state_dict(state)  # same parts, same keys (strict)
    block = parallel.blocks[0]
    assert type(block).__name__ == "ParallelTransformerBlock"
    x, t, y = torch.randn(2, 4, 8, 8, dtype=torch.float64), torch.tensor([10, 800]), torch.tensor([1, 10])
    tokens, cond = torch.randn(2, 16, 32, dtype=torch.float64), Conditioning(t=t, emb=parallel.embed(t, y), y=y)
    (h1, g1), (h2, g2) = block.norm1(tokens, cond), block.norm2(tokens, cond)
    expected = tokens + apply_gate(block.attn(h1), g1) + apply_gate(block.mlp(h2), g2)  # both read the input
    torch.testing.assert_close(block(tokens, cond), expected, rtol=0, atol=1e-12)
    assert (parallel(x, t, y) - sequential(x, t, y)).abs().max() > 1e-3  # it is not the sequential block


def test_recipes_cannot_name_the_block_until_the_plugin_is_installed():
    with pytest.raises(UserError, match="unknown block 'parallel_transformer'.*zoo.blocks"):
        zoo.build_model({**DIT, "block": "parallel_transformer"})


def test_example_plugin_adds_a_block_through_its_entry_point(tmp_path):
    write_distribution(tmp_path, "zoo-plugin-example", _entry_points_txt())  # what pip writes, from pyproject
    with on_path(EXAMPLE, tmp_path):
        _check_plugin_block()


@pytest.mark.slow
def test_example_plugin_pip_installs_and_works(tmp_path):
    setuptools = pytest.importorskip("setuptools", reason="building the example offline needs setuptools here")
    version = tuple(int(part) for part in re.findall(r"\d+", setuptools.__version__)[:2])
    if version < (70, 1) and importlib.util.find_spec("wheel") is None:  # a fresh Python 3.11 venv: 65.5, no wheel
        pytest.skip(f"setuptools {setuptools.__version__} builds a wheel offline only with the wheel package, absent here")
    source, target = tmp_path / "src", tmp_path / "site"
    shutil.copytree(EXAMPLE, source)  # pip builds in the source tree; keep the repository clean
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                    "--no-build-isolation", "--target", str(target), str(source)], check=True)
    assert (target / "zoo_plugin_example-0.1.0.dist-info" / "entry_points.txt").is_file()
    with on_path(target):
        _check_plugin_block()


@pytest.mark.parametrize("recipe", ["dit_s_2", "uvit_m_4"])
def test_the_block_line_the_example_advertises_builds(tmp_path, recipe):
    """pyproject.toml said any recipe can say `block: {type: parallel_transformer, num_heads: 6}`, which DiT
    and U-ViT refuse (the backbone passes num_heads): the advertised line must build as written."""
    text = (EXAMPLE / "pyproject.toml").read_text()
    line = re.search(r"any recipe can say `block: ([^`]+)`", text).group(1)
    import yaml

    write_distribution(tmp_path, "zoo-plugin-example", _entry_points_txt())
    with on_path(EXAMPLE, tmp_path), torch.device("meta"):
        model = zoo.build_model(recipe, {"model.block": yaml.safe_load(line)})
    assert any(type(m).__name__ == "ParallelTransformerBlock" for m in model.modules())
