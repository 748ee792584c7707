"""Training data from a recipe's ``data`` section, as an endless, resumable stream of batches.

- ``synthetic``: ``data.size`` deterministic images of the model's input shape (class-coloured,
  smooth), for smoke tests and benchmarks.
- ``image_folder``: ``root/CLASS/**/IMAGE`` listed as torchvision's ImageFolder lists it (classes
  sorted, subfolders walked, its image suffixes); ADM's centre crop to ``image_size``
  (``zoo.training.crop``), scaled to [−1, 1].
- ``latents``: ``root/*.safetensors`` shards with ``latents`` (N, C, H, W) and ``labels`` (N,).
  Latents are stored as the VAE encoder gives them and multiplied by ``data.vae_scale`` here,
  unless the shard's metadata says ``{"scaled": "true"}`` (then used as stored).
- ``imagenet`` (the paper recipes): ``latents`` when ``data.latent`` is true, else ``image_folder``.

The order is a function of (seed, epoch) and the stream can start at any step, so a resumed
run sees exactly the batches an uninterrupted one would. Random flips are drawn by the trainer.
"""

from __future__ import annotations

import os
import struct
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler, Subset, TensorDataset

from zoo.errors import UserError, some_of
from zoo.training.data_workers import (ended_at_exit, one_line_errors, worker_deaths_surface_at_the_next_batch,
                                       workers_ignore_stop_signals)
from zoo.training.sections import data_setting
from zoo.training.worker_errors import user_errors_cross_workers

BAD_IMAGE_HINT = "delete or replace the file"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's, any case


def synthetic_dataset(shape: tuple[int, ...], size: int, num_classes: int | None, seed: int = 0) -> TensorDataset:
    """``size`` images in [−1, 1]: a per-class colour plus smooth (2×2 upsampled) noise."""
    g = torch.Generator().manual_seed(seed)
    c, h, w = shape
    classes = num_classes or 1
    labels = torch.randint(0, classes, (size,), generator=g)
    colours = torch.rand(classes, c, 1, 1, generator=g) * 1.2 - 0.6
    coarse = torch.randn(size, c, 2, 2, generator=g) * 0.3
    smooth = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    return TensorDataset((colours[labels] + smooth).clamp(-1, 1), labels)


#: Folder names that are a dataset's splits: an image folder whose subfolders are all these was given one
#: level too high (``imagenet/`` for ``imagenet/train``), which would train on two "classes".
SPLIT_NAMES = frozenset({"train", "training", "val", "valid", "validation", "test", "testing", "holdout"})


class ImageFolder(Dataset):
    """``root/CLASS/**/IMAGE`` → (image in [−1, 1] of ``image_size``², class index).

    Lists the files in torchvision's ImageFolder order (class folders sorted, each walked with
    its subfolders in sorted order, symlinks followed), so index i is the same image in both.
    """

    def __init__(self, root: Path, image_size: int, flat: bool = False) -> None:
        try:
            self.skipped_files: list[Path] = []  # files with other suffixes in the class folders (not metadata)
            self.items: list[tuple[Path, int]] = []
            skipped_in: dict[str, int] = {}  # per class folder
            if flat:  # no labels: the images directly in root (an FD reference as pytorch-fid reads it), label 0
                self.classes = []
                self.items = [(f, 0) for f in sorted(root.iterdir()) if f.is_file() and _is_image_name(f.name)]
            else:
                self.classes = self.class_folders(root)
                _refuse_links_to_the_root(root, self.classes)
                for i, c in enumerate(self.classes):
                    before = len(self.skipped_files)
                    self.items += [(f, i) for f in _images_under(root / c, self.skipped_files)]
                    skipped_in[c] = len(self.skipped_files) - before
        except OSError as err:
            raise UserError(f"cannot list the image folder {err.filename or root}: {err.strerror}") from None
        # imagenet/ given for imagenet/train would encode or train for hours on two "classes"
        splits = [c for c in self.classes if c.lower() in SPLIT_NAMES]
        if splits and len(splits) == len(self.classes):  # imagenet/ holding train/ alone (val/ not unpacked yet) too
            split = next((c for c in splits if c.lower() in ("train", "training")), splits[0])
            raise UserError(f"the subfolders of {root} ({', '.join(splits)}) are the splits of a dataset, not its "
                            "classes", suggestion=f"pass one split's folder, e.g. {root / split}")
        found = {label for _, label in self.items}
        empty = [c for i, c in enumerate(self.classes) if i not in found]
        if self.items and empty:  # each would take a label (and shift the others'), as torchvision refuses too
            names = some_of([str(root / c) for c in empty])
            others = sum(skipped_in[c] for c in empty)
            raise UserError(f"class folder{'s' * (len(empty) > 1)} {names} hold{'s' * (len(empty) == 1)} no images: "
                            f"{self.skipped(others, 'there' if len(empty) == 1 else 'in them')}",
                            suggestion="convert those files to one of these formats, or " * (others > 0) +
                            "move folders that are not classes (e.g. .ipynb_checkpoints, __MACOSX) out of the "
                            "image folder")
        self.image_size = image_size
        self.num_classes = len(self.classes)

    @staticmethod
    def skipped(count: int, where: str) -> str:
        """What the "holds no images" errors add: the files skipped ``where`` and the suffixes read."""
        files = f"{count} file{'s' * (count != 1)} with other suffixes skipped" if count else "no files with other suffixes"
        return f"{files} {where}; images are files ending {', '.join(IMAGE_SUFFIXES)} in any case"

    def skipped_note(self) -> str | None:
        """One line on the class folders' files that are not read (a GIF, an AVIF, a PNG without its suffix):
        the run trains on fewer images than the folder holds, which only the image count showed."""
        if not self.skipped_files:
            return None
        n = len(self.skipped_files)
        return (f"{n} file{'s' * (n != 1)} with other suffixes in the class folders {'are' if n != 1 else 'is'} not "
                f"read (e.g. {self.skipped_files[0]}); images are files ending {', '.join(IMAGE_SUFFIXES)} in any case")

    @staticmethod
    def class_folders(root: Path) -> list[str]:
        """The class names: ``root``'s subfolders, sorted."""
        return sorted(d.name for d in root.iterdir() if d.is_dir())

    def __len__(self) -> int:
        return len(self.items)

    @user_errors_cross_workers
    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        from PIL import Image

        path, label = self.items[index]
        try:
            return self._read(path, Image), label
        # truncated, not an image, unreadable; PIL's decoders also raise SyntaxError (a broken PNG
        # chunk), EOFError and struct.error on damaged data
        except (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError) as err:
            reason = err.strerror if isinstance(err, OSError) and err.strerror else (str(err).splitlines() or [""])[0]
            reason = reason or type(err).__name__
            raise UserError(f"cannot read image {path}: {reason}", suggestion=BAD_IMAGE_HINT) from None

    def _read(self, path: Path, Image) -> Tensor:
        from zoo.training.crop import adm_center_crop, to_rgb, to_tensor

        _quiet_size_warning(Image)
        with Image.open(path) as im:
            return to_tensor(adm_center_crop(to_rgb(im), self.image_size))


_SIZE_WARNING_QUIET = False


def _quiet_size_warning(Image) -> None:
    """PIL warns above 89 MP (and refuses above 179 MP): the run's own data, read without the warning. Set
    once per process: changing the filters (a catch_warnings() per read) resets Python's once-per-place
    record, so each palette PNG's or EXIF warning came again for every image, every epoch."""
    global _SIZE_WARNING_QUIET
    if not _SIZE_WARNING_QUIET:
        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
        _SIZE_WARNING_QUIET = True


def _images_under(folder: Path, skipped: list[Path] | None = None) -> list[Path]:
    """The image files below ``folder``, walked as torchvision walks a class folder, except that a
    symlink back to a folder on the way down to it (a loop, through one link or several) is not
    followed: torchvision lists such a tree over and over until the path is too long, with other
    classes' images under this label; and
    that macOS's ``._NAME`` files (AppleDouble metadata that a tar or zip made on a Mac holds beside
    each image, never an image) are skipped: each stopped a run as an unreadable image. ``skipped`` gets the
    files with other suffixes (not hidden files such as ``.DS_Store`` or ``._NAME``: no conversion makes
    those images)."""
    def fail(err: OSError) -> None:
        raise err

    walked, above = [], {str(folder): frozenset()}  # the real folders on the walk down to each folder
    for top, dirs, names in os.walk(folder, followlinks=True, onerror=fail):
        chain = above.pop(top, frozenset()) | {os.path.realpath(top)}
        keep = []
        for d in dirs:  # a link back to any folder on the way down (c0/toc1/toc0: a loop through two) is not followed
            if not any(_contains(os.path.realpath(os.path.join(top, d)), real) for real in chain):
                keep.append(d)
                above[os.path.join(top, d)] = chain
        dirs[:] = keep
        walked.append((top, names))
    if skipped is not None:
        skipped += [Path(top) / name for top, names in sorted(walked) for name in sorted(names)
                    if not _is_image_name(name) and not name.startswith(".")]
    return [Path(top) / name for top, names in sorted(walked) for name in sorted(names) if _is_image_name(name)]


def _refuse_links_to_the_root(root: Path, classes: list[str]) -> None:
    """A class folder that is a link to the image folder itself (``self -> .``) or to a folder above it
    would be one more class holding every image under another label: one line instead."""
    real_root = os.path.realpath(root)
    for c in classes:
        if _contains(os.path.realpath(root / c), real_root):
            raise UserError(f"class folder {root / c} is a link to {os.path.realpath(root / c)}, which holds the "
                            f"image folder {root} itself: its images would train twice, once under the label {c!r}",
                            suggestion=f"remove the link {root / c}")


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES) and not name.startswith("._")


def _contains(outer: str, inner: str) -> bool:
    """``inner`` is ``outer`` or below it (both real paths)."""
    return inner == outer or inner.startswith(outer.rstrip(os.sep) + os.sep)


def latent_dataset(root: Path, vae_scale: float) -> TensorDataset:
    """All shards of ``root`` concatenated (sorted by name)."""
    from safetensors import SafetensorError, safe_open

    latents, labels = [], []
    for shard in sorted(root.glob("*.safetensors")):
        try:
            with safe_open(str(shard), framework="pt") as f:
                keys = set(f.keys())
                if not {"latents", "labels"} <= keys:
                    raise UserError(f"latent shard {shard} must hold 'latents' and 'labels', it has {sorted(keys)}")
                scaled = (f.metadata() or {}).get("scaled") == "true"
                z, y = f.get_tensor("latents"), f.get_tensor("labels")
        except (SafetensorError, OSError) as err:
            raise unreadable_shard(shard, err) from None
        _check_shard(shard, z, y)
        if latents and z.shape[1:] != latents[0].shape[1:]:
            raise UserError(f"latent shard {shard} holds latents of shape {tuple(z.shape[1:])}, the shards before it "
                            f"{tuple(latents[0].shape[1:])}", suggestion="keep the latents of one VAE and resolution "
                            "in one directory")
        latents.append(z.float() if scaled else z.float() * vae_scale)
        labels.append(y.long())
    if not latents:
        return TensorDataset(torch.zeros(0), torch.zeros(0))
    ds = TensorDataset(torch.cat(latents), torch.cat(labels))
    ds.sources = [(shard, len(y)) for shard, y in zip(sorted(root.glob("*.safetensors")), labels)]
    return ds


def unreadable_shard(shard: Path, err: Exception) -> UserError:
    """The one-line error for a latent shard that safetensors cannot open (truncated, not safetensors)."""
    reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    return UserError(f"cannot read latent shard {shard}: not a complete safetensors file ({reason})",
                     suggestion="delete it and write it again (zoo prepare-latents resumes)")


def _check_shard(shard: Path, z: Tensor, y: Tensor) -> None:
    """A latent shard holds finite float latents (N, C, H, W) and N integer labels."""
    if z.ndim != 4 or not z.is_floating_point():
        raise UserError(f"latent shard {shard}: 'latents' must be float (N, C, H, W), it is {z.dtype} {tuple(z.shape)}")
    if y.ndim != 1 or y.shape[0] != z.shape[0] or y.is_floating_point() or y.dtype == torch.bool:
        raise UserError(f"latent shard {shard}: 'labels' must be {z.shape[0]} integers (one per latent), "
                        f"it is {y.dtype} {tuple(y.shape)}")
    if not torch.isfinite(z).all():
        raise UserError(f"latent shard {shard} holds NaN or infinite latents")


def _root(data: Mapping[str, Any], kind: str) -> Path:
    root = data.get("root")
    fix = f"pass --set data.root=/path/to/{'latents' if kind.startswith('latent') else 'images'}"
    if not root:
        raise UserError(f"data.root is not set: dataset {data.get('dataset')!r} needs a directory of {kind}",
                        key_path="data.root", suggestion=fix)
    path = Path(root).expanduser()
    if not path.is_dir():
        raise UserError(f"data.root {root} is not a directory", key_path="data.root", suggestion=fix)
    return path


#: ``data`` keys only some datasets read; a dataset entry lists those it reads in ``reads``.
OPTIONAL_KEYS = ("size", "image_size", "cache")


def unread_data_keys(data: Mapping[str, Any]) -> list[str]:
    """The keys of ``data`` its dataset does not read (``data.size`` beside emoji32, say: a note, not
    an error, as a recipe switched to another dataset by ``--set`` keeps its old settings)."""
    from zoo import registry

    reads = getattr(registry.get("dataset", data_setting(data, "dataset")), "reads", None)
    return [] if reads is None else [key for key in OPTIONAL_KEYS if key in data and key not in reads]


def reads_root(builder: Callable[..., Any]) -> bool:
    """Whether a registered dataset builder reads ``data.root`` (``ignores_root = True`` on those that
    make their images: synthetic, emoji32)."""
    return not getattr(builder, "ignores_root", False)


def build_dataset(data: Mapping[str, Any], shape: tuple[int, ...], num_classes: int | None, seed: int = 0) -> Dataset:
    """The dataset the ``data`` section names (a ``dataset`` registry entry); ``shape`` is the model's (C, H, W)."""
    builder = check_data_section(data, shape, num_classes)
    ds = builder(data, shape, num_classes, seed)
    kind, latent = data_setting(data, "dataset"), gives_latents(data)
    if len(ds) == 0:
        what = ("*.safetensors shards" if latent else "images in class subfolders (root/CLASS/*.png; files "
                f"ending {', '.join(IMAGE_SUFFIXES)} in any case are images)")
        raise UserError(f"data.root {data.get('root')} holds no {what}", key_path="data.root",
                        suggestion=_other_data_hint(Path(data["root"]).expanduser(), latent, shape))
    check_against_model(ds, kind, shape, num_classes, latent, from_data=bool(data.get("num_classes")))
    return ds


def gives_latents(data: Mapping[str, Any]) -> bool:
    """Whether the ``data`` section's model works in the VAE's latent space: what its dataset yields
    (``latents`` always; ``imagenet`` and ``synthetic`` with ``data.latent``; image_folder and emoji32 never),
    or ``data.latent`` for a plugin dataset that does not say. What sampling decodes and training reads agree."""
    from zoo import registry

    kind, declared = data_setting(data, "dataset"), bool(data.get("latent"))
    if kind not in registry.names("dataset"):  # an uninstalled plugin's checkpoint: as its recipe says
        return declared
    builder = registry.get("dataset", kind)
    switch = getattr(builder, "latent_keys", None)
    if switch is None:  # a builtin image dataset (it lists what it reads), or a plugin that does not say
        return False if getattr(builder, "reads", None) is not None else declared
    return "latent" not in switch or declared  # latents: always; imagenet, synthetic: by data.latent


def data_line(data: Mapping[str, Any], count: int, shape: tuple[int, ...]) -> str:
    """What a run trains on, for its first lines: ``"emoji32:train, 3,421 images of 3x32x32"``. A recipe
    that names no dataset trains on synthetic images: said there, as that is rarely what was meant."""
    kind, latent = data_setting(data, "dataset"), gives_latents(data)
    line = (f"{kind}:{data_setting(data, 'split')}, {count:,} {'latents' if latent else 'images'} of "
            f"{'x'.join(map(str, shape))}")
    if "dataset" not in data:
        line += (" (the recipe sets no data.dataset: synthetic class-coloured images; set data.dataset and "
                 "data.root to train on real data)")
    return line


def check_data_section(data: Mapping[str, Any], shape: tuple[int, ...], num_classes: int | None) -> Callable:
    """What can be checked of ``data`` against the model without reading any data (``zoo build`` runs
    this too): the split, a root the dataset would ignore, and the dataset's own ``check(data, shape,
    num_classes)`` where it has one (e.g. a fixed image size). Returns the dataset's builder."""
    from zoo import registry

    kind = data_setting(data, "dataset")
    builder = registry.get("dataset", kind)
    splits = getattr(builder, "splits", ("train",))  # a builder with more splits lists them
    if data_setting(data, "split") not in splits:
        raise UserError(f"dataset {kind!r} has no {data['split']!r} split; it has {', '.join(splits)}",
                        key_path="data.split", suggestion="remove data.split or pick one of those")
    if data.get("root") and not reads_root(builder):
        raise UserError(f"data.root is set, but dataset {kind!r}{' (the default)' * ('dataset' not in data)} "
                        "reads no root", key_path="data.dataset",
                        suggestion="--set data.dataset=image_folder (root/CLASS/*.png) or latents "
                        "(zoo prepare-latents output)")
    _check_latent_switch(data, kind, builder)
    check = getattr(builder, "check", None)
    if check is not None:
        check(data, shape, num_classes)
    return builder


def _check_latent_switch(data: Mapping[str, Any], kind: str, builder: Callable[..., Any]) -> None:
    """Refuse a ``data.latent`` the dataset contradicts: ``latent: true`` beside images trained on pixels
    and then found no VAE to draw grids; ``latents`` without ``latent: true`` drew undecoded latents."""
    if data.get("latent") is None or getattr(builder, "reads", None) is None:  # unset, or a plugin: its own switch
        return
    latent = gives_latents(data)
    if bool(data["latent"]) != latent:
        from zoo import registry

        gives = "VAE latents" if latent else "images (pixels)"
        switched = [name for name in registry.names("dataset")  # imagenet, synthetic
                    if "latent" in getattr(registry.get("dataset", name), "latent_keys", ())]
        raise UserError(f"data.latent is {str(data['latent']).lower()}, but dataset {kind!r} gives {gives}",
                        key_path="data.latent", suggestion=f"remove data.latent (it chooses between latents and "
                        f"images only for {' and '.join(switched)}); latent data is data.dataset: latents "
                        "(zoo prepare-latents output)")


def _other_data_hint(root: Path, latent: bool, shape: tuple[int, ...]) -> str:
    """What to do when ``data.root`` holds no data of the recipe's kind: it may hold the other kind."""
    from zoo.latents import MANIFEST

    if latent and any(_images_under(root / c) for c in ImageFolder.class_folders(root)[:10]):
        return (f"it is an image folder, and this recipe trains on VAE latents: make them with zoo prepare-latents "
                f"{root} --vae VAE_DIR --out LATENT_DIR --resolution {8 * shape[-1]} and pass "
                "--set data.root=LATENT_DIR")
    if not latent and (any(root.glob("*.safetensors")) or (root / MANIFEST).is_file()):
        return ("it holds latent shards, and this recipe trains on pixels: point data.root at the image folder "
                "(root/CLASS/*.png), or train a latent recipe on these")
    if not latent and ImageFolder(root, shape[-1], flat=True).items:  # the images of a flat folder, as --ref reads one
        return ("its images lie in data.root itself: an image folder takes each image's label from its subfolder, "
                f"so move them into one (e.g. {root / 'all'}/ for one class)")
    return "point data.root at a directory with data"


def held_out(data: Mapping[str, Any], dataset: Dataset, shape: tuple[int, ...], num_classes: int | None,
             seed: int, limit: int) -> tuple[Dataset, str]:
    """Images to measure a run on, and what they are: the dataset's ``holdout`` split when it has one
    and the run does not train on it (``"emoji32:holdout"``), else a fixed seeded subset of at most
    ``limit`` of the training images ``dataset`` (``"NAME:SPLIT (N images)"``, SPLIT the one trained
    on; drawn from its own generator, the global RNG untouched)."""
    from zoo import registry

    name, trained_on = data_setting(data, "dataset"), data_setting(data, "split")
    build = registry.get("dataset", name)
    if "holdout" in getattr(build, "splits", ()) and trained_on != "holdout":
        return build({**data, "split": "holdout"}, shape, num_classes, seed), f"{name}:holdout"
    count = min(len(dataset), limit)
    if count < len(dataset):
        picked = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:count]
        dataset = Subset(dataset, picked.sort().values.tolist())
    return dataset, f"{name}:{trained_on} ({count} images)"


def class_names(data: Mapping[str, Any]) -> list[str]:
    """The names of the classes of a ``data`` section, in label order, where its dataset knows them.

    A dataset entry may carry ``class_names(data) -> list[str]``; an image folder or prepared
    latents only know theirs while ``data.root`` is still there. ``[]`` when unknown.
    """
    from zoo import registry

    kind = data_setting(data, "dataset")
    names = getattr(registry.get("dataset", kind), "class_names", None) if kind in registry.names("dataset") else None
    try:
        return [str(name) for name in names(data)] if names else []
    except (OSError, ValueError, UserError):  # a moved or unreadable root: names unknown, numbers still work
        return []


def latent_size_hint(model_side: int, factor: Any, made_at: int | None = None, image_size: int | None = None,
                     side: int | None = None) -> str:
    """How latents of ``side`` (made from ``made_at`` px images by an f``factor`` VAE, trained at
    ``data.image_size`` ``image_size``, default ``made_at``) meet a model of input size ``model_side``:
    the data's size and the model's (its own setting, not derived from data.image_size), or latents
    of the model's size."""
    known = isinstance(factor, int) and factor > 0
    side = side or (made_at // factor if made_at and known else model_side)
    image_size = image_size or made_at
    fits = [f"data.image_size to {made_at}"] if made_at and image_size != made_at else []
    if side != model_side:
        fits.append(f"the model's input size to {side} (model.input_size, or model.img_size for U-ViT)")
    res = (factor if known else 8) * model_side
    again = (f"prepare latents of {model_side}x{model_side}: zoo prepare-latents --resolution {res} "
             + (f"with this f{factor} VAE" if known else "with an f8 VAE (SD's)")
             + (f" and train with data.image_size {res}" if image_size and image_size != res else ""))
    if not fits:
        return again
    fix = f"set {' and '.join(fits)}"
    return fix if res == made_at else f"{fix}, or {again}"  # (latents of that resolution are the ones there)


def check_against_model(ds: Dataset, kind: str, shape: tuple[int, ...], num_classes: int | None,
                        latent: bool = False, from_data: bool = False) -> None:
    """Fail before training when the data cannot feed the model: the first sample's shape, the labels' range
    (``num_classes`` labels; ``from_data``: that count is the recipe's ``data.num_classes``).

    Labels are checked in full where the dataset holds them (latent shards, tensors) and by the
    class count of an image folder; a sample read later that is broken names its own file.
    """
    x, _ = ds[0]
    if tuple(x.shape) != tuple(shape):
        if latent and x.shape[0] != shape[0]:  # another size would not fix this: named first
            hint = (f"the latents have {x.shape[0]} channels: set model.in_channels to {x.shape[0]} "
                    "(model.in_chans for U-ViT)")
        elif latent:
            manifest = getattr(ds, "manifest", None) or {}  # zoo prepare-latents output: its size and VAE
            vae = manifest.get("vae") if isinstance(manifest.get("vae"), dict) else {}
            hint = latent_size_hint(shape[-1], vae.get("downsample"), manifest.get("resolution"), side=x.shape[-1])
        elif x.shape[0] != shape[0]:
            hint = (f"the images load with {x.shape[0]} channels: a pixel model takes in_channels {x.shape[0]}; "
                    "a latent model trains on dataset: latents (made by zoo prepare-latents)")
        else:
            hint = f"set data.image_size to {shape[-1]}, the model's input size"
        raise UserError(f"dataset {kind!r} gives samples of shape {tuple(x.shape)}, the model takes {tuple(shape)}",
                        key_path="data", suggestion=hint)
    if num_classes is None:
        return
    classes = getattr(ds, "num_classes", None)
    if isinstance(classes, int) and classes > num_classes and from_data:
        raise UserError(f"dataset {kind!r} has {classes} classes, data.num_classes is {num_classes}",
                        key_path="data.num_classes", suggestion=f"set data.num_classes to {classes} where the model "
                        "has as many (model.num_classes), or use fewer class folders")
    if isinstance(classes, int) and classes > num_classes:
        raise UserError(f"dataset {kind!r} has {classes} classes, the model has {num_classes}",
                        key_path="data.root", suggestion="use a model with as many classes, or fewer class folders")
    labels = ds.tensors[1] if isinstance(ds, TensorDataset) and len(ds.tensors) > 1 else getattr(ds, "labels", None)
    labels = labels if isinstance(labels, Tensor) else None  # e.g. prepared latents hold theirs as a tensor
    bad = ((labels < 0) | (labels >= num_classes)).nonzero() if labels is not None else ()
    if len(bad):
        index = int(bad[0])
        where = f"dataset {kind!r}"
        for source, count in getattr(ds, "sources", ()):  # name the shard that holds it
            if index < count:
                where = str(source)
                break
            index -= count
        raise UserError(f"{where}: label {int(labels[bad[0]])} (sample {index}) is outside the model's classes "
                        f"0..{num_classes - 1}", key_path="data", suggestion="check the labels, or the model's num_classes")

DATA_STREAM = 17  # the generator stream of a dataset's own per-item draws (see zoo.training.draws)


class EpochSampler(Sampler):
    """A permutation per epoch from (seed, epoch), starting ``skip`` samples into the stream.

    With ``keyed=True`` it yields ``(index, key)``: ``key`` seeds the item's own random draws
    from (seed, global sample position) alone, so they do not depend on the number of processes,
    on workers or on where a run was resumed (datasets that draw set ``keyed_draws = True``).
    """

    def __init__(self, n: int, batch_size: int, seed: int, start_step: int = 0, rank: int = 0, world: int = 1,
                 keyed: bool = False) -> None:
        self.n, self.batch_size, self.seed, self.keyed = n, batch_size, seed, keyed
        self.lo, self.hi = rank * batch_size // world, (rank + 1) * batch_size // world  # this rank's slice
        self.per_epoch = self.batches_per_epoch(n, batch_size)
        self.epoch, self.offset = divmod(start_step, self.per_epoch)

    @staticmethod
    def batches_per_epoch(n: int, batch_size: int, processes: int = 1, accum: int = 1) -> int:
        """Whole batches in one pass over ``n`` samples; the trainer calls it during setup too, where
        all ranks agree on one message, since a dataset smaller than one batch is a recipe mistake.
        The batch size must divide by ``processes`` × ``accum`` (train.grad_accum): the hint names the
        largest batch size that fits and is accepted."""
        if n < batch_size:
            multiple = processes * accum
            fits = n // multiple * multiple
            split = f"{processes} process{'es' * (processes != 1)} x grad_accum {accum}"
            hint = (f"use a batch size <= {n}" if multiple == 1 else f"use train.batch_size={fits} (the largest "
                    f"multiple of {multiple}, {split}, that fits)" if fits else
                    f"use more data: {split} = {multiple} micro-batches need at least {multiple} samples"
                    + (", or a smaller train.grad_accum" if accum > 1 else ""))
            raise UserError(f"the dataset has {n} samples, fewer than train.batch_size={batch_size}",
                            key_path="train.batch_size", suggestion=hint)
        return n // batch_size

    def __iter__(self) -> Iterator[int]:
        epoch, offset = self.epoch, self.offset
        while True:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed((self.seed * 100003 + epoch) & 0xFFFFFFFFFFFFFFFF))
            chosen = order[offset * self.batch_size: self.per_epoch * self.batch_size].view(-1, self.batch_size)
            indices = chosen[:, self.lo:self.hi].reshape(-1).tolist()
            if self.keyed:
                from zoo.seeds import sample_seed

                first = (epoch * self.per_epoch + offset) * self.batch_size  # global position of chosen[0, 0]
                positions = (first + torch.arange(chosen.shape[0])[:, None] * self.batch_size
                             + torch.arange(self.lo, self.hi)[None, :]).reshape(-1).tolist()
                yield from ((i, sample_seed(self.seed, g, DATA_STREAM)) for i, g in zip(indices, positions))
            else:
                yield from indices
            epoch, offset = epoch + 1, 0


def batches(dataset: Dataset, batch_size: int, seed: int, start_step: int = 0, num_workers: int = 0,
            pin_memory: bool = False, rank: int = 0, world: int = 1) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless ``(x, y)`` batches; batch k of the stream is the same whatever ``start_step`` it began at.

    With ``world`` processes, rank ``rank`` reads only its contiguous slice of every global batch
    (``batch_size`` must be divisible by ``world``).
    """
    sampler = EpochSampler(len(dataset), batch_size, seed, start_step, rank, world,
                           keyed=getattr(dataset, "keyed_draws", False))
    loader = DataLoader(dataset, batch_size=batch_size // world, sampler=sampler, num_workers=num_workers,
                        pin_memory=pin_memory, drop_last=True, persistent_workers=num_workers > 0,
                        generator=torch.Generator().manual_seed(seed),  # worker seeds; keeps the global RNG untouched
                        worker_init_fn=workers_ignore_stop_signals)
    it = iter(loader)
    if num_workers > 0:
        worker_deaths_surface_at_the_next_batch()
    return one_line_errors(ended_at_exit(it))
