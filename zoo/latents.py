"""``zoo prepare-latents``: an ImageNet-style image folder → VAE latent moments on disk.

Each image is centre-cropped the ADM way (:func:`zoo.training.crop.adm_center_crop`) and
encoded together with its horizontal flip, as fast-DiT and REPA pre-extract ImageNet. What is
stored is the encoder's posterior, not one sample of it: ``mean`` and ``std`` of the diagonal
Gaussian, both (N, 2, C, H, W) with view 0 the image and view 1 its flip, unscaled (the
trainer multiplies by ``data.vae_scale``), and ``labels`` (N,) from the sorted class folders.
The ``latents`` dataset draws z = mean + std·ε from a random view at every step.

Layout of ``OUT``: ``shard_XXXXX.safetensors`` (``shard_size`` images each, in folder order),
``prepare.json`` (the plan: written first, checked on resume) and ``manifest.json`` (the plan
plus the shard list: written last, once every shard exists). Every file is written to a
temporary name and renamed, so an interrupted run leaves only whole shards, and running the
same command again encodes only the missing ones. Under ``torchrun`` rank r encodes shards
r, r+world, ...; the rank that finds all shards present writes the manifest (every rank
writes the same bytes, atomically).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from zoo.errors import UserError

FORMAT = "zoo-latent-moments"
FORMAT_VERSION = 1
PLAN, MANIFEST = "prepare.json", "manifest.json"
VIEWS = ("image", "hflip")


def shard_name(k: int) -> str:
    return f"shard_{k:05d}.safetensors"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def load_encoder(vae_dir: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """The VAE in ``vae_dir`` and its identity (weights file, sha256, scale, channels); never downloads.

    A diffusers directory (``config.json`` beside the weights, also under ``vae/``) is built from
    its own config; anything else is read as the Stable Diffusion KL-f8 VAE (:func:`zoo.vae.load_vae`).
    """
    from zoo.vae import SCALE, find_vae_weights, load_vae

    weights = find_vae_weights(vae_dir)
    config = weights.parent / "config.json"
    if weights.name == "diffusion_pytorch_model.safetensors" and config.is_file():
        from diffusers import AutoencoderKL

        # low_cpu_mem_usage=False: the plain load, without diffusers asking for accelerate on stderr
        vae = AutoencoderKL.from_pretrained(str(weights.parent), local_files_only=True, low_cpu_mem_usage=False)
    else:
        vae = load_vae(vae_dir).vae
    cfg = vae.config
    identity = {"weights": str(weights.resolve()), "sha256": _sha256(weights),
                "scaling_factor": float(getattr(cfg, "scaling_factor", None) or SCALE),
                "latent_channels": int(cfg.latent_channels), "downsample": 2 ** (len(cfg.block_out_channels) - 1)}
    return vae.eval().requires_grad_(False), identity


@torch.no_grad()
def encode_moments(vae: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """Posterior ``mean`` and ``std`` (B, 2, C, h, w) of images ``x`` (B, 3, H, W) in [-1, 1] and their flips."""
    both = torch.cat([x, x.flip(-1)])
    posterior = vae.encode(both).latent_dist
    b = x.shape[0]

    def views(t: Tensor) -> Tensor:
        return torch.stack([t[:b], t[b:]], dim=1).float()

    return views(posterior.mean), views(posterior.std)


def make_plan(classes: list[str], num_images: int, resolution: int, shard_size: int, identity: dict,
              dtype: str) -> dict[str, Any]:
    """Everything that fixes the output's contents; a resumed run must agree with it."""
    c, f = identity["latent_channels"], identity["downsample"]
    return {"format": FORMAT, "version": FORMAT_VERSION, "num_images": num_images, "resolution": resolution,
            "latent_shape": [c, resolution // f, resolution // f], "views": list(VIEWS), "dtype": dtype,
            "shard_size": shard_size, "num_shards": -(-num_images // shard_size), "vae": identity,
            "crop": "adm_center_crop", "num_classes": len(classes), "classes": classes}


def _write_json(path: Path, payload: dict) -> None:
    from zoo.atomic import write_text

    write_text(path, json.dumps(payload, indent=1) + "\n")


def check_or_write_plan(out: Path, plan: dict) -> None:
    """Write ``prepare.json``, or check that an existing one (an interrupted run) asks for the same output."""
    existing = out / PLAN
    if existing.is_file():
        old = json.loads(existing.read_text())
        diff = [k for k in plan if k != "vae" and old.get(k) != plan[k]]
        if old.get("vae", {}).get("sha256") != plan["vae"]["sha256"]:
            diff.append("vae")
        if diff:
            raise UserError(f"{out} holds latents prepared with other settings ({', '.join(diff)} differ)",
                            suggestion="use a new --out directory, or the same images, VAE and options as before")
        return
    _write_json(existing, plan)


def write_shard(path: Path, mean: Tensor, std: Tensor, labels: Tensor, start: int, dtype: torch.dtype) -> None:
    """One shard, atomically (a temporary name, then a rename)."""
    from safetensors.torch import save_file

    from zoo.atomic import write_file

    tensors = {"mean": mean.to(dtype).contiguous(), "std": std.to(dtype).contiguous(), "labels": labels.long()}
    meta = {"format": FORMAT, "start": str(start), "scaled": "false"}
    write_file(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def finish(out: Path, plan: dict) -> bool:
    """Write ``manifest.json`` if every shard is on disk; return whether it is complete."""
    shards = []
    for k in range(plan["num_shards"]):
        if not (out / shard_name(k)).is_file():
            return False
        start = k * plan["shard_size"]
        shards.append({"file": shard_name(k), "start": start,
                       "num_images": min(plan["shard_size"], plan["num_images"] - start)})
    _write_json(out / MANIFEST, {**plan, "shards": shards})
    return True


def prepare_latents(image_dir: str | Path, vae_dir: str | Path, out: str | Path, resolution: int = 256,
                    batch_size: int = 32, shard_size: int = 10000, num_workers: int = 4, dtype: str = "float32",
                    device: str | None = None, rank: int = 0, world: int = 1,
                    progress: Callable[..., Any] | None = None, log: Callable[[str], None] | None = None) -> bool:
    """Encode the shards of ``image_dir`` that rank ``rank`` of ``world`` owns and are not on disk yet.

    ``log`` gets one line saying what was found and what is left to encode. Returns whether the
    output is complete (``manifest.json`` written).
    """
    from torch.utils.data import DataLoader, Subset

    from zoo.training.data import ImageFolder, one_line_errors

    root, out = Path(image_dir).expanduser(), Path(out).expanduser()
    if not root.is_dir():
        raise UserError(f"image folder {root} does not exist", suggestion="pass IMAGE_DIR laid out as IMAGE_DIR/CLASS/*.JPEG")
    images = ImageFolder(root, resolution)
    if len(images) == 0:
        raise UserError(f"{root} holds no images in class subfolders", suggestion="lay it out as IMAGE_DIR/CLASS/*.JPEG")
    vae, identity = load_encoder(vae_dir)
    if resolution % identity["downsample"]:
        raise UserError(f"--resolution {resolution} is not a multiple of the VAE's downsampling {identity['downsample']}")
    plan = make_plan(images.classes, len(images), resolution, shard_size, identity, dtype)
    out.mkdir(parents=True, exist_ok=True)
    check_or_write_plan(out, plan)
    device = torch.device(device or "cpu")
    vae = vae.to(device)
    todo = [k for k in range(rank, plan["num_shards"], world) if not (out / shard_name(k)).is_file()]
    total = sum(min(shard_size, len(images) - k * shard_size) for k in todo)
    if log is not None:
        n = plan["num_shards"]
        mine = f"rank {rank} of {world} encodes" if world > 1 else "encoding"
        left = f"{mine} {len(todo)} ({total} images) on {device}" if todo else "none left to encode"
        log(f"{len(images)} images in {len(images.classes)} classes under {root}; {n} shard{'s' * (n != 1)} of "
            f"up to {shard_size} in {out}, {left}")
    bar = progress(total=total, unit="img", desc=f"rank {rank}" if world > 1 else "encode") if progress else None
    try:
        for k in todo:
            start = k * shard_size
            subset = Subset(images, range(start, min(start + shard_size, len(images))))
            loader = DataLoader(subset, batch_size=batch_size, num_workers=num_workers)
            means, stds, labels = [], [], []
            for x, y in one_line_errors(iter(loader)):  # a bad image: its one-line message, not a worker's traceback
                mean, std = encode_moments(vae, x.to(device))
                means.append(mean.cpu())
                stds.append(std.cpu())
                labels.append(y)
                if bar is not None:
                    bar.update(len(y))
            write_shard(out / shard_name(k), torch.cat(means), torch.cat(stds), torch.cat(labels), start,
                        getattr(torch, dtype))
    finally:  # the bar's last line ends before any error message is printed
        if bar is not None:
            bar.close()
    return finish(out, plan)
