"""Training data from a recipe's ``data`` section, as an endless, resumable stream of batches.

- ``synthetic``: ``data.size`` deterministic images of the model's input shape (class-coloured,
  smooth), for smoke tests and benchmarks.
- ``image_folder``: ``root/CLASS/*.png|jpg`` (classes sorted, as torchvision's ImageFolder);
  ADM's centre crop to ``image_size`` (``zoo.training.crop``), scaled to [−1, 1].
- ``latents``: ``root/*.safetensors`` shards with ``latents`` (N, C, H, W) and ``labels`` (N,).
  Latents are stored as the VAE encoder gives them and multiplied by ``data.vae_scale`` here,
  unless the shard's metadata says ``{"scaled": "true"}`` (then used as stored).
- ``imagenet`` (the paper recipes): ``latents`` when ``data.latent`` is true, else ``image_folder``.

The order is a function of (seed, epoch) and the stream can start at any step, so a resumed
run sees exactly the batches an uninterrupted one would. Random flips are drawn by the trainer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset

from zoo.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


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


class ImageFolder(Dataset):
    """``root/CLASS/IMAGE`` → (image in [−1, 1] of ``image_size``², class index)."""

    def __init__(self, root: Path, image_size: int) -> None:
        self.classes = sorted(d.name for d in root.iterdir() if d.is_dir())
        self.items = [(f, i) for i, c in enumerate(self.classes) for f in sorted((root / c).iterdir())
                      if f.suffix.lower() in IMAGE_SUFFIXES]
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        from PIL import Image

        path, label = self.items[index]
        from zoo.training.crop import adm_center_crop, to_tensor

        with Image.open(path) as im:
            return to_tensor(adm_center_crop(im.convert("RGB"), self.image_size)), label


def latent_dataset(root: Path, vae_scale: float) -> TensorDataset:
    """All shards of ``root`` concatenated (sorted by name)."""
    from safetensors import safe_open

    latents, labels = [], []
    for shard in sorted(root.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            keys = set(f.keys())
            if not {"latents", "labels"} <= keys:
                raise UserError(f"latent shard {shard} must hold 'latents' and 'labels', it has {sorted(keys)}")
            scaled = (f.metadata() or {}).get("scaled") == "true"
            z = f.get_tensor("latents").float()
            latents.append(z if scaled else z * vae_scale)
            labels.append(f.get_tensor("labels").long())
    if not latents:
        return TensorDataset(torch.zeros(0), torch.zeros(0))
    return TensorDataset(torch.cat(latents), torch.cat(labels))


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


def build_dataset(data: Mapping[str, Any], shape: tuple[int, ...], num_classes: int | None, seed: int = 0) -> Dataset:
    """The dataset the ``data`` section names (a ``dataset`` registry entry); ``shape`` is the model's (C, H, W)."""
    from zoo import registry

    kind = data.get("dataset", "synthetic")
    builder = registry.get("dataset", kind)
    splits = getattr(builder, "splits", ("train",))  # a builder with more splits lists them
    if data.get("split", "train") not in splits:
        raise UserError(f"dataset {kind!r} has no {data['split']!r} split; it has {', '.join(splits)}",
                        key_path="data.split", suggestion="remove data.split or pick one of those")
    ds = builder(data, shape, num_classes, seed)
    if len(ds) == 0:
        latent = kind == "latents" or (kind == "imagenet" and data.get("latent"))
        what = "*.safetensors shards" if latent else "images in class subfolders (root/CLASS/*.png)"
        raise UserError(f"data.root {data.get('root')} holds no {what}", key_path="data.root",
                        suggestion="point data.root at a directory with data")
    return ds


class EpochSampler(Sampler):
    """A permutation per epoch from (seed, epoch), starting ``skip`` samples into the stream."""

    def __init__(self, n: int, batch_size: int, seed: int, start_step: int = 0, rank: int = 0, world: int = 1) -> None:
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.lo, self.hi = rank * batch_size // world, (rank + 1) * batch_size // world  # this rank's slice
        self.per_epoch = n // batch_size
        if self.per_epoch == 0:
            raise UserError(f"the dataset has {n} samples, fewer than train.batch_size={batch_size}",
                            key_path="train.batch_size", suggestion=f"use a batch size <= {n}")
        self.epoch, self.offset = divmod(start_step, self.per_epoch)

    def __iter__(self) -> Iterator[int]:
        epoch, offset = self.epoch, self.offset
        while True:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))
            chosen = order[offset * self.batch_size: self.per_epoch * self.batch_size].view(-1, self.batch_size)
            yield from chosen[:, self.lo:self.hi].reshape(-1).tolist()
            epoch, offset = epoch + 1, 0


def batches(dataset: Dataset, batch_size: int, seed: int, start_step: int = 0, num_workers: int = 0,
            pin_memory: bool = False, rank: int = 0, world: int = 1) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless ``(x, y)`` batches; batch k of the stream is the same whatever ``start_step`` it began at.

    With ``world`` processes, rank ``rank`` reads only its contiguous slice of every global batch
    (``batch_size`` must be divisible by ``world``).
    """
    sampler = EpochSampler(len(dataset), batch_size, seed, start_step, rank, world)
    loader = DataLoader(dataset, batch_size=batch_size // world, sampler=sampler, num_workers=num_workers,
                        pin_memory=pin_memory, drop_last=True, persistent_workers=num_workers > 0,
                        generator=torch.Generator().manual_seed(seed))  # worker seeds; keeps the global RNG untouched
    return iter(loader)
