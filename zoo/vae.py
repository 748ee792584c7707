"""Stable Diffusion's KL-f8 VAE (4 latent channels, ×8 down) for latent models; never downloads.

The network is diffusers' ``AutoencoderKL`` built offline from the SD config below (83,653,863
parameters), or from the ``config.json`` of a diffusers directory (any ``AutoencoderKL``: what
prepare-latents encoded with, the sampler decodes with); weights come from a LOCAL directory the user gives (``--vae DIR`` or the recipe's
``data.vae``): a diffusers snapshot (``diffusion_pytorch_model.safetensors``, also under
``vae/``), a single ``.safetensors`` file, or an LDM/U-ViT-style state dict
(``autoencoder_kl*.pth``, ``*.ckpt``; the recipe's ``data.vae_file`` picks one of several; read
with ``weights_only=True`` and renamed with diffusers' converter). Latents are scaled by 0.18215
(z = 0.18215·E(x)) as every SD-VAE diffusion model (DiT, U-ViT, DiMR) was trained.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from zoo.errors import UserError
from zoo.options import CommandOptions, EVAL_OPTIONS

SCALE = 0.18215

SD_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=256,
    scaling_factor=SCALE,
)

DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors")
LDM_PATTERNS = ("*.safetensors", "*.pth", "*.ckpt", "*.pt", "*.bin")

_FIX = (
    "give a local copy of the Stable Diffusion KL-f8 VAE: --vae DIR to zoo prepare-latents, sample and eval, "
    "data.vae in a recipe (--set data.vae=DIR), "
    "e.g. the files of huggingface.co/stabilityai/sd-vae-ft-ema (diffusion_pytorch_model.safetensors) "
    "or U-ViT's assets/stable-diffusion/autoencoder_kl_ema.pth; zoo never downloads weights"
)


def build_sd_vae(device: torch.device | str | None = None, config: dict | None = None,
                 source: str | Path = "config.json") -> nn.Module:
    """The SD KL-f8 ``AutoencoderKL`` (or the one ``config`` describes, read from ``source``) with
    diffusers' random init (on ``meta`` it allocates nothing)."""
    try:
        from diffusers import AutoencoderKL
    except ImportError as err:  # pragma: no cover - depends on the install
        raise UserError(f"the VAE needs diffusers ({err}); install it with pip install 'zoo-diffusion[vae]'") from None
    with torch.device(device or "cpu"):
        if config is None:
            return AutoencoderKL(**SD_VAE_CONFIG)
        try:
            return AutoencoderKL.from_config(config)
        except (ValueError, TypeError, KeyError) as err:  # diffusers' own check of the config's values
            raise UserError(f"{source} describes no AutoencoderKL diffusers can build: {err}",
                            suggestion="give the VAE's own folder, with its config.json as diffusers saved it") from None


def vae_config(weights: Path) -> dict | None:
    """The ``config.json`` of the diffusers directory ``weights`` is in (its own architecture), or
    ``None`` for weights without one (read as the SD KL-f8 VAE)."""
    from zoo.jsonfile import read_json_object

    config = weights.parent / "config.json"
    if weights.name != "diffusion_pytorch_model.safetensors" or not config.is_file():
        return None
    loaded = read_json_object(config, "VAE config")
    kind = loaded.get("_class_name")
    if kind not in (None, "AutoencoderKL") or not isinstance(loaded.get("block_out_channels"), list) \
            or not isinstance(loaded.get("latent_channels"), int):  # SD's unet/ has block_out_channels too
        said = f"_class_name {kind}" if kind not in (None, "AutoencoderKL") else "no block_out_channels/latent_channels"
        raise UserError(f"{config} is not an AutoencoderKL config ({said})",
                        suggestion="give the VAE's own folder (Stable Diffusion's vae/, or sd-vae-ft-ema)")
    return loaded


def vae_downsample(weights: Path) -> int:
    """How many pixels one latent spans per side: 8 for the SD VAE."""
    config = vae_config(weights)
    return 2 ** (len((config or SD_VAE_CONFIG)["block_out_channels"]) - 1)


def find_vae_weights(directory: str | Path, options: CommandOptions = EVAL_OPTIONS, name: str | None = None) -> Path:
    """The weights file inside a user's VAE directory, or a ``UserError`` that says how to fix it
    (``options``: what it calls the caller's VAE option; zoo train's is data.vae).

    ``name`` (a recipe's ``data.vae_file``) picks the file of a folder that holds several: U-ViT's
    assets/stable-diffusion/ holds autoencoder_kl.pth and autoencoder_kl_ema.pth, and its models
    decode with different ones. Unset, such a folder gives its one ``*ema*`` file. A file given
    itself is used whatever ``name`` says."""
    if directory is None or str(directory) == "":
        raise UserError(f"this model works in the SD-VAE latent space and needs the VAE weights: {_FIX}")
    directory = Path(directory).expanduser()
    if directory.is_file() and directory.suffix == ".json":  # a diffusers folder's config.json, say
        raise UserError(f"{directory} is a config file, not VAE weights",
                        suggestion=f"give the folder that holds it and the weights, {directory.parent}")
    if directory.is_file():
        return directory
    if not directory.is_dir():
        raise UserError(f"VAE directory {directory} does not exist: {_FIX}")
    if name and Path(name).name != name or name in (".", ".."):  # ../other/x.pth read another folder's file
        raise UserError(f"data.vae_file {name!r} is not a file name: it names a file inside the VAE folder",
                        suggestion=f"give the file itself as the VAE: {options.given('vae', directory / name)}")
    if name and (directory / name).is_file():
        return directory / name
    for weights in DIFFUSERS_WEIGHTS:
        if (directory / weights).is_file():
            return directory / weights
    found = [f for pattern in LDM_PATTERNS for f in sorted(directory.glob(pattern))]
    ema = [f for f in found if "ema" in f.stem.lower()]
    if len(found) > 1 and name:
        raise UserError(f"VAE directory {directory} holds no {name} (the recipe's data.vae_file), only "
                        f"{', '.join(f.name for f in found)}",
                        suggestion=f"put {name} there, or give the file to decode with itself: "
                        f"{options.given('vae', found[0])}")
    if len(found) == 1 or len(ema) == 1:
        return (ema or found)[0]
    if found:
        raise UserError(f"VAE directory {directory} holds several weight files ({', '.join(f.name for f in found)})",
                        suggestion=f"give the file itself: {options.given('vae', found[0])}")
    raise UserError(f"no VAE weights (.safetensors/.pth/.ckpt/.bin) in {directory}: {_FIX}")


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        from zoo.weights import load_weights

        return load_weights(path)  # a truncated or foreign file is an error naming it
    from zoo.torchfile import torch_load_plain

    state = torch_load_plain(path, "VAE weights")
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise UserError(f"VAE weights {path} do not hold a state dict of tensors")
    return state


def _check_keys(vae: nn.Module, state: dict[str, Tensor], path: Path, options: CommandOptions) -> None:
    """Refuse ``state`` (read from ``path``) whose keys or shapes are not ``vae``'s, naming ``path`` with the
    option the calling command takes it by."""
    from zoo.weights import check_keys

    option = options.vae if options.recipe_keys else f"{options.vae}, or data.vae in a recipe"
    check_keys(vae.state_dict(), state, source=f"{path} (the VAE: {option})",
               suggestion=f"these are not AutoencoderKL (SD VAE) weights; {_FIX}")


def check_vae_weights(path: Path, options: CommandOptions = EVAL_OPTIONS) -> None:
    """Refuse a ``.safetensors`` file whose keys or shapes are not the VAE's, read from its header alone (no
    tensor is loaded), so a wrong folder (a zoo checkpoint, say) is said before any sampling, not at each
    decode. Other files are checked when :func:`load_vae` reads them. ``options``: as in :func:`find_vae_weights`."""
    from zoo.weights import weights_on_meta

    state = weights_on_meta(path) if path.suffix == ".safetensors" else None
    if state is None:  # not safetensors, or unreadable: load_vae says why
        return
    vae = build_sd_vae("meta", vae_config(path), source=path.parent / "config.json")
    _check_keys(vae, _to_diffusers_keys(state), path, options)


def _to_diffusers_keys(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename an LDM-layout VAE state dict (``encoder.down.0.block...``) to diffusers' layout."""
    if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in state):
        return state
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    return convert_ldm_vae_checkpoint(state, SD_VAE_CONFIG)


class LatentVAE(nn.Module):
    """Image ↔ scaled latent codec: ``decode(z)`` gives images in [−1, 1], ``encode(x)`` sampled latents.

    Decoding runs in chunks of ``chunk_size`` images (the decoder's activations are large).
    """

    def __init__(self, vae: nn.Module, scale: float = SCALE, chunk_size: int = 8):
        super().__init__()
        self.vae = vae
        self.scale = float(scale)
        self.chunk_size = int(chunk_size)

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        param = next(self.vae.parameters())
        out = [
            self.vae.decode(chunk.to(param) / self.scale).sample.float()
            for chunk in z.split(max(1, self.chunk_size))
        ]
        return torch.cat(out).clamp(-1.0, 1.0)

    @torch.no_grad()
    def encode(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        param = next(self.vae.parameters())
        out = [
            self.vae.encode(chunk.to(param)).latent_dist.sample(generator) * self.scale
            for chunk in x.split(max(1, self.chunk_size))
        ]
        return torch.cat(out)


def load_vae(
    directory: str | Path | None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    scale: float = SCALE,
    chunk_size: int = 8,
    options: CommandOptions = EVAL_OPTIONS,
) -> LatentVAE:
    """Build the VAE on ``meta`` and load the local weights strictly (no random init, no download).

    A diffusers directory is built from its own ``config.json`` (any ``AutoencoderKL``); other
    weights are read as the SD KL-f8 VAE. ``options``: what a message calls the caller's VAE option.
    """
    path = find_vae_weights(directory, options)
    # first: without diffusers installed, this is the one-line error
    vae = build_sd_vae("meta", vae_config(path), source=path.parent / "config.json")
    state = _to_diffusers_keys(_read_state_dict(path))
    _check_keys(vae, state, path, options)
    vae.load_state_dict(state, strict=True, assign=True)  # onto the meta-built VAE: no second copy
    if any(p.dtype != dtype for p in vae.parameters()):  # e.g. fp16 weights on disk
        vae = vae.to(dtype=dtype)
    return LatentVAE(vae.to(device=device).eval(), scale=scale, chunk_size=chunk_size)
