"""The built-in datasets, registered in the ``zoo.datasets`` entry-point group (``data.dataset``).

A dataset entry is a callable ``(data, shape, num_classes, seed) -> torch Dataset`` of
``(x, label)`` pairs: ``data`` is the recipe's ``data`` section, ``shape`` the model's input
(C, H, W). Plugins register their own under the same group. Optional attributes of an entry:
``splits`` (names for ``data.split``), ``class_names(data)``, ``reads`` (which of ``data.size``,
``image_size``, ``cache`` it reads: another one set gets a note), and ``ignores_root = True`` for
one that reads no ``data.root`` (a recipe that sets one then gets an error, not silent data). ``emoji32`` lives in
:mod:`zoo.training.emoji`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from torch.utils.data import Dataset

from zoo.errors import UserError
from zoo.training.data import ImageFolder, _root, latent_size_hint, synthetic_dataset
from zoo.training.sections import data_setting


def synthetic(data: Mapping[str, Any], shape: tuple[int, ...], num_classes: int | None, seed: int = 0) -> Dataset:
    """``data.size`` deterministic class-coloured smooth images of the model's input shape."""
    _synthetic_size(data, shape, num_classes)
    return synthetic_dataset(shape, int(data.get("size", 64)), num_classes, seed)


def _synthetic_size(data: Mapping[str, Any], shape: tuple[int, ...], num_classes: int | None) -> None:
    size = data.get("image_size")
    if size is not None and int(size) != shape[-1]:
        raise UserError(f"data.image_size is {size}, but the synthetic images take the model's input size {shape[-1]}",
                        key_path="data.image_size", suggestion=f"set it to {shape[-1]} or remove it")


synthetic.reads = ("size", "image_size")  # type: ignore[attr-defined]
synthetic.seeded_images = True  # type: ignore[attr-defined]  # train.seed draws the images themselves
synthetic.check = _synthetic_size  # type: ignore[attr-defined]  # also run by zoo build
synthetic.ignores_root = True  # type: ignore[attr-defined]  # a data.root beside it is a mistake (see build_dataset)
synthetic.latent_keys = ("latent", "vae_scale", "vae", "vae_file")  # type: ignore[attr-defined]  # latent: stand-in latents


def image_folder(data: Mapping[str, Any], shape: tuple[int, ...], num_classes: int | None, seed: int = 0) -> Dataset:
    """``root/CLASS/*.png|jpg`` (classes sorted), ADM centre crop to ``image_size``, in [-1, 1]."""
    return ImageFolder(_root(data, "images"), int(data.get("image_size", shape[-1])))


def _folder_classes(data: Mapping[str, Any]) -> list[str]:
    return ImageFolder.class_folders(Path(data["root"]).expanduser()) if data.get("root") else []


def _image_folder_fits(data: Mapping[str, Any], shape: tuple[int, ...], num_classes: int | None) -> None:
    """Image folders load RGB at ``data.image_size``: refused before any file is read where the model
    takes another size or channel count (else zoo build passed and zoo train failed on the first image)."""
    size = int(data.get("image_size", shape[-1]))
    if tuple(shape) == (3, size, size):
        return
    if shape[0] != 3:
        raise UserError(f"image folders give RGB images, but the model takes {shape[0]} input channels",
                        key_path="data", suggestion="give the model 3 input channels (model.in_channels, or "
                        "model.in_chans for U-ViT), or train a latent recipe on zoo prepare-latents output")
    raise UserError(f"data.image_size is {size}, but the model takes {shape[-2]}x{shape[-1]} images",
                    key_path="data.image_size", suggestion=f"set data.image_size to {shape[-1]}, or the model's "
                    f"input size to {size} (model.input_size, or model.img_size for U-ViT)")


image_folder.seeded_images = False  # type: ignore[attr-defined]  # train.seed picks none of them
image_folder.reads = ("image_size",)  # type: ignore[attr-defined]
image_folder.check = _image_folder_fits  # type: ignore[attr-defined]  # also run by zoo build
image_folder.class_names = _folder_classes  # type: ignore[attr-defined]


def latents(data: Mapping[str, Any], shape: tuple[int, ...], num_classes: int | None, seed: int = 0) -> Dataset:
    """``zoo prepare-latents`` output (VAE moments, image and flip) or plain ``latents`` shards."""
    from zoo.training.latents import open_latents

    dataset = open_latents(_root(data, "latent shards"), float(data_setting(data, "vae_scale")),
                           flip=bool(data_setting(data, "random_flip")))
    manifest = getattr(dataset, "manifest", {})  # zoo prepare-latents output says its size and its VAE's
    made_at, vae = manifest.get("resolution"), manifest.get("vae")
    vae = vae if isinstance(vae, dict) else {}
    if data.get("image_size") and made_at and int(data["image_size"]) != int(made_at) \
            and vae.get("latent_channels", shape[0]) == shape[0]:  # other channels: named as the data meets the model
        raise UserError(f"data.image_size is {data['image_size']}, but the latents in {data['root']} were made "
                        f"from {made_at}x{made_at} images (zoo prepare-latents --resolution {made_at})",
                        key_path="data.image_size", suggestion=latent_size_hint(
                            shape[-1], vae.get("downsample"), int(made_at), int(data["image_size"])))
    return dataset


def _manifest_classes(data: Mapping[str, Any]) -> list[str]:
    from zoo.jsonfile import read_json_object
    from zoo.latents import MANIFEST

    manifest = Path(data["root"]).expanduser() / MANIFEST if data.get("root") else None
    if manifest is None or not manifest.is_file():
        return []
    classes = read_json_object(manifest, "latent manifest").get("classes")
    return classes if isinstance(classes, list) else []


latents.seeded_images = False  # type: ignore[attr-defined]  # train.seed picks none of them
latents.reads = ("image_size",)  # type: ignore[attr-defined]  # checked against the resolution they were made at
latents.latent_keys = ("vae_scale", "vae", "vae_file")  # type: ignore[attr-defined]  # listed by zoo list / --help-component
latents.class_names = _manifest_classes  # type: ignore[attr-defined]


def _needs(data: Mapping[str, Any], shape: tuple[int, ...]) -> str:
    """One sentence: what ImageNet data a paper recipe trains on, where it goes and how to make it."""
    size = int(data.get("image_size", shape[-1] * (8 if data.get("latent") else 1)))
    if data.get("latent"):
        return (f"this recipe trains on ImageNet {size}x{size} latents from the Stable Diffusion VAE "
                f"(sd-vae-ft-ema, {shape[0]}x{shape[1]}x{shape[2]}); make them with `zoo prepare-latents "
                f"IMAGENET/train --vae VAE_DIR --out LATENT_DIR --resolution {size}` and pass "
                f"--set data.root=LATENT_DIR")
    return (f"this recipe trains on ImageNet images at {size}x{size} pixels; pass --set data.root=IMAGENET/train, "
            f"an image folder laid out as root/CLASS/*.JPEG (e.g. n01440764/n01440764_10026.JPEG), "
            f"centre-cropped to {size} when read")


def imagenet(data: Mapping[str, Any], shape: tuple[int, ...], num_classes: int | None, seed: int = 0) -> Dataset:
    """ImageNet as the paper recipes read it: ``latents`` if ``data.latent``, else ``image_folder``."""
    if not data.get("root"):
        raise UserError(f"data.root is not set: {_needs(data, shape)}")
    return (latents if data.get("latent") else image_folder)(data, shape, num_classes, seed)


imagenet.seeded_images = False  # type: ignore[attr-defined]  # train.seed picks none of them
imagenet.reads = ("image_size",)  # type: ignore[attr-defined]
imagenet.check = lambda data, shape, num_classes: (  # type: ignore[attr-defined]  # pixels: as an image folder
    None if data.get("latent") else _image_folder_fits(data, shape, num_classes))
imagenet.latent_keys = ("latent", "vae_scale", "vae", "vae_file")  # type: ignore[attr-defined]
imagenet.class_names = lambda data: (_manifest_classes if data.get("latent") else _folder_classes)(data)  # type: ignore[attr-defined]
