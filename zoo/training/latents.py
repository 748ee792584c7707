"""The ``latents`` dataset: what ``zoo prepare-latents`` writes, or plain pre-sampled latent shards.

With a ``manifest.json`` (see :mod:`zoo.latents`) every item is a fresh draw from the VAE
posterior of a random view (the image or its flip): z = vae_scale·(mean + std·ε), as fast-DiT
and REPA train. Shards are opened lazily and read one row at a time (memory-mapped), so the
whole of ImageNet never has to fit in memory. In training each item's view and ε come from a
generator keyed by (seed, global sample position) that the sampler hands over, so the latents
a run sees do not depend on the number of processes, on workers or on resuming; indexed
directly (``dataset[i]``) it draws from torch's global RNG.

Without a manifest the directory holds plain ``latents``/``labels`` shards
(:func:`zoo.training.data.latent_dataset`).
"""

from __future__ import annotations

import bisect
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

from zoo.errors import UserError
from zoo.jsonfile import read_json_object
from zoo.latents import FORMAT, MANIFEST, PLAN
from zoo.training.worker_errors import user_errors_cross_workers


class LatentMoments(Dataset):
    """``(z, label)`` with z sampled from the stored posterior moments of a random view (the image's or
    its flip's; ``flip`` False: always the image's, as ``data.random_flip: false`` asks)."""

    def __init__(self, root: Path, vae_scale: float, flip: bool = True) -> None:
        rerun = "run the zoo prepare-latents command that made it again: it rewrites the manifest"
        manifest = read_json_object(root / MANIFEST, "latent manifest", suggestion=rerun)
        if manifest.get("format") != FORMAT:
            raise UserError(f"{root / MANIFEST} is not a zoo prepare-latents manifest (format {manifest.get('format')!r})")
        self.root, self.manifest, self.vae_scale, self.flip = root, manifest, float(vae_scale), bool(flip)
        self.shards = manifest.get("shards")
        if not isinstance(self.shards, list) or not all(
                isinstance(s, dict) and isinstance(s.get("file"), str) and isinstance(s.get("start"), int)
                and isinstance(s.get("num_images"), int) for s in self.shards):
            raise UserError(f"the latent manifest {root / MANIFEST} has no valid shard list ('shards': "
                            "[{file, start, num_images}, ...])", suggestion=rerun)
        self.starts = [s["start"] for s in self.shards]
        self.labels = torch.tensor(self._read_labels(), dtype=torch.int64)
        self.num_classes = int(manifest.get("num_classes", 0)) or None  # the class folders it was made from
        self.sources = [(root / s["file"], int(s["num_images"])) for s in self.shards]  # to name a bad label's shard
        self._open: dict[int, object] = {}

    def _read_labels(self) -> list[int]:
        from safetensors import SafetensorError, safe_open

        from zoo.training.data import unreadable_shard

        labels = []
        for s in self.shards:
            path = self.root / s["file"]
            if not path.is_file():
                raise UserError(f"latent shard {path} is missing (the manifest lists it)",
                                suggestion="re-run zoo prepare-latents with the same arguments to write it")
            try:
                with safe_open(str(path), framework="pt") as f:
                    labels += f.get_tensor("labels").tolist()
            except (SafetensorError, OSError) as err:
                raise unreadable_shard(path, err) from None
        return labels

    def __len__(self) -> int:
        return len(self.labels)

    def _shard(self, k: int):
        if k not in self._open:  # opened in the process that reads (DataLoader workers open their own)
            from safetensors import safe_open

            self._open[k] = safe_open(str(self.root / self.shards[k]["file"]), framework="pt")
        return self._open[k]

    def _where(self, index: int) -> tuple[int, int]:
        """The shard and the row in it that hold item ``index``."""
        k = bisect.bisect_right(self.starts, index) - 1
        return k, index - self.starts[k]

    def moments(self, index: int) -> tuple[Tensor, Tensor]:
        """``mean`` and ``std`` (2, C, h, w) of item ``index`` (view 0 the image, 1 its flip), unscaled."""
        k, row = self._where(index)
        f = self._shard(k)
        return f.get_slice("mean")[row].float(), f.get_slice("std")[row].float()

    keyed_draws = True  # the training sampler passes (index, key): the draw is a function of the key
    draws_flips = True  # the flips are drawn here (the flipped image's encoding): the trainer does not flip these

    @user_errors_cross_workers
    def __getitem__(self, item: int | tuple[int, int]) -> tuple[Tensor, int]:
        index, key = item if isinstance(item, tuple) else (item, None)
        gen = torch.Generator().manual_seed(key) if key is not None else None  # None: torch's global RNG
        mean, std = self.moments(index)
        view = int(torch.randint(2, (), generator=gen))  # drawn either way: the same noise with or without flips
        view = view if self.flip else 0
        z = mean[view] + std[view] * torch.randn(mean.shape[1:], generator=gen)
        if not bool(torch.isfinite(z).all()):  # else the run stops later on a non-finite loss, blaming the lr
            k, row = self._where(index)
            raise UserError(f"latent shard {self.root / self.shards[k]['file']} holds NaN or infinite moments "
                            f"(row {row})", suggestion="delete that shard and run the zoo "
                            "prepare-latents command that made it again: it encodes the missing shard")
        return z * self.vae_scale, int(self.labels[index])

    def __getstate__(self) -> dict:  # safetensors handles do not pickle; workers reopen
        return {**self.__dict__, "_open": {}}


def open_latents(root: Path, vae_scale: float, flip: bool = True) -> Dataset:
    """A ``zoo prepare-latents`` output directory, or a directory of plain latent shards; ``flip``: draw the
    flipped image's encoding half the time (prepared latents; the trainer mirrors plain shards itself)."""
    from zoo.training.data import latent_dataset

    if (root / MANIFEST).is_file():
        dataset = LatentMoments(root, vae_scale, flip)
        vae = dataset.manifest.get("vae")
        scale = vae.get("scaling_factor") if isinstance(vae, dict) else None
        if scale is not None and abs(scale - vae_scale) > 1e-6 * scale:
            raise UserError(f"the latents in {root} come from a VAE with scaling factor {scale}, "
                            f"the recipe's data.vae_scale is {vae_scale}", key_path="data.vae_scale",
                            suggestion=f"--set data.vae_scale={scale}")
        return dataset
    if (root / PLAN).is_file():
        raise UserError(f"{root} holds an unfinished zoo prepare-latents run (no {MANIFEST} yet)",
                        suggestion="run the same zoo prepare-latents command again to finish it")
    return latent_dataset(root, vae_scale)
