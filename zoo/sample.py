"""Sampling images from a recipe or a checkpoint: noise → solver → (VAE) → image grid.

Reproducible per sample: sample i's starting noise (and its class, when none is given) comes
from its own generator seeded with ``sample_seed(seed, i)``, so the images do not depend on the
batch size or on how samples are split across processes. Stochastic solvers (``ddpm``, ``ddim``
with eta > 0) draw their per-step noise from a third generator per sample, so they too give the
same images whatever the batch size.
"""

from __future__ import annotations

import math
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from zoo.diffusion.setup import GuidanceSettings, build_schedule, guidance_settings, guided_eps_fn
from zoo.errors import UserError

STOCHASTIC_SOLVERS = ("ddpm",)


def _mix64(x: int) -> int:
    """SplitMix64's finaliser: a bijective scramble of a 64-bit integer."""
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def sample_seed(seed: int, index: int, stream: int = 0) -> int:
    """The 32-bit generator seed of sample ``index`` (PyTorch's CPU generator keeps only 32 bits).

    ``(scramble(seed, stream) + index) mod 2³²``: distinct for every index of one run, and runs
    with different seeds start at unrelated offsets. ``stream`` separates independent draws
    (noise, labels, solver noise) of the same sample.
    """
    return (_mix64((int(seed) << 8) ^ stream) + int(index)) & 0xFFFFFFFF


def _generator(seed: int, index: int, stream: int = 0) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(sample_seed(seed, index, stream))


def initial_noise(n: int, shape: tuple[int, ...], seed: int, start: int = 0) -> Tensor:
    """x_T of samples ``start .. start+n−1``, each from its own generator (float32, CPU)."""
    return torch.stack([torch.randn(shape, generator=_generator(seed, start + i)) for i in range(n)])


def sample_labels(n: int, num_classes: int, seed: int, start: int = 0) -> Tensor:
    """Random classes of samples ``start ..``, from a second generator per sample (independent of x_T)."""
    return torch.stack(
        [torch.randint(num_classes, (), generator=_generator(seed, start + i, stream=1)) for i in range(n)]
    )


@dataclass
class SampleRequest:
    """What to sample (the CLI's options; ``None`` means the recipe's ``sample`` section decides)."""

    n: int = 16
    seed: int = 0
    solver: str | None = None
    steps: int | None = None
    cfg: float | None = None
    class_label: int | None = None
    batch_size: int | None = None
    solver_options: dict = field(default_factory=dict)


def build_solver(recipe: Mapping[str, Any], name: str | None, steps: int | None, options: Mapping[str, Any] = ()):
    """The recipe's ``sample.solver`` with ``name``/``steps`` replacing its own (another type drops its options)."""
    import zoo

    spec = (recipe.get("sample") or {}).get("solver") or {"type": "dpm_solver++", "steps": 25}
    spec = {"type": spec} if isinstance(spec, str) else dict(spec)
    if name is not None and name != spec["type"]:
        spec = {"type": name}
    if steps is not None:
        spec["steps"] = steps
    spec.update(options)
    return zoo.build_component("solver", spec), spec


def num_classes(recipe: Mapping[str, Any]) -> int | None:
    """Real classes to draw labels from (the null label excluded); ``None`` for unconditional models."""
    model = recipe.get("model") or {}
    declared = model.get("num_classes") if isinstance(model, Mapping) else None
    if declared is not None and declared <= 0:
        return None
    null = (recipe.get("diffusion") or {}).get("null_label")
    data = (recipe.get("data") or {}).get("num_classes")
    return data or null or declared


def load_model(source: str | Path, overrides: list[str] = (), device="cpu") -> tuple[nn.Module, dict, str]:
    """The model to sample from and its resolved recipe, and a word on where the weights came from.

    ``source`` is a checkpoint directory (``config.json`` + weights; EMA weights preferred) or a
    recipe (a freshly initialised model). ``--set`` overrides apply to the recipe's other
    sections; a checkpoint's ``model`` section is fixed by its weights.
    """
    import zoo
    from zoo.checkpoint import EMA, load_checkpoint, read_config

    path = Path(source)
    if path.is_dir():
        if any(o.split("=", 1)[0].strip().startswith("model.") for o in overrides):
            raise UserError(f"{path} is a checkpoint: its model section is fixed by its weights; "
                            "--set may change the other sections only")
        recipe = zoo.load_recipe(read_config(path), overrides)
        weights = "ema" if (path / EMA).is_file() else "model"
        model, _ = load_checkpoint(path, weights=weights, device=device)
        return model.eval(), recipe, f"{weights} weights of {path}"
    recipe = zoo.load_recipe(source, overrides)
    model = zoo.build_model(recipe).to(device)
    return model.eval(), recipe, "NO weights: a freshly initialised model (pass a checkpoint directory for real samples)"


@torch.no_grad()
def sample_latents(
    model: nn.Module, recipe: Mapping[str, Any], request: SampleRequest, device: torch.device | str = "cpu"
) -> tuple[Tensor, Tensor | None]:
    """Sample ``request.n`` model-space tensors (latents or pixels in [−1, 1]) and their labels."""
    model.eval()
    schedule = build_schedule(recipe)
    solver, _ = build_solver(recipe, request.solver, request.steps, request.solver_options)
    guidance: GuidanceSettings = guidance_settings(recipe, request.cfg)
    x_example = model.example_inputs(1)[0]
    shape, dtype = tuple(x_example.shape[1:]), x_example.dtype
    classes = num_classes(recipe)
    labels = None
    if classes is not None:
        if request.class_label is not None:
            if not 0 <= request.class_label < classes:
                raise UserError(f"--class {request.class_label} is not a class of this model (0..{classes - 1})")
            labels = torch.full((request.n,), request.class_label, dtype=torch.long)
        else:
            labels = sample_labels(request.n, classes, request.seed)
    elif request.class_label is not None:
        raise UserError("--class was given but this model is unconditional")
    batch = request.batch_size or (recipe.get("sample") or {}).get("batch_size") or request.n
    out = []
    for start in range(0, request.n, batch):
        n = min(batch, request.n - start)
        x_T = initial_noise(n, shape, request.seed, start).to(device=device, dtype=dtype)
        y = None if labels is None else labels[start : start + n].to(device)
        eps_fn = guided_eps_fn(model, recipe, schedule, y, guidance, eps_channels=shape[0])
        generators = [_generator(request.seed, start + i, stream=2) for i in range(n)]
        out.append(solver.sample(eps_fn, x_T, schedule=schedule, generator=generators).float().cpu())
    return torch.cat(out), labels


def vae_weights(recipe: Mapping[str, Any], vae_dir: str | Path | None) -> Path | None:
    """The VAE weights a latent model decodes with (``--vae`` or ``data.vae``); ``None`` for pixel models.

    Called before sampling, so a missing VAE is reported before any compute is spent.
    """
    data = recipe.get("data") or {}
    if not data.get("latent"):
        return None
    from zoo.vae import find_vae_weights

    return find_vae_weights(vae_dir or data.get("vae"))


def to_images(x: Tensor, recipe: Mapping[str, Any], vae_dir: str | Path | None, device="cpu") -> Tensor:
    """Model-space samples → images in [0, 1]: latents through the SD VAE, pixels mapped from [−1, 1]."""
    data = recipe.get("data") or {}
    weights = vae_weights(recipe, vae_dir)
    if weights is not None:
        from zoo.vae import SCALE, load_vae

        vae = load_vae(weights, device=device, scale=data.get("vae_scale", SCALE))
        x = vae.decode(x.to(device)).cpu()
    return ((x.clamp(-1.0, 1.0) + 1.0) / 2.0).float()


def image_grid(images: Tensor, nrow: int, padding: int = 2, pad_value: float = 1.0) -> Tensor:
    """Tile (B, C, H, W) into one (C, H', W') image, ``nrow`` per row, ``padding`` px around every tile
    (torchvision's ``make_grid`` layout, without importing torchvision)."""
    b, c, h, w = images.shape
    rows = math.ceil(b / nrow)
    step_h, step_w = h + padding, w + padding
    grid = images.new_full((c, rows * step_h + padding, nrow * step_w + padding), pad_value)
    for i in range(b):
        r, col = divmod(i, nrow)
        grid[:, padding + r * step_h : padding + r * step_h + h, padding + col * step_w : padding + col * step_w + w] = images[i]
    return grid


def save_grid(images: Tensor, path: str | Path, nrow: int | None = None) -> Path:
    """Write images (B, C, H, W) in [0, 1] as one 8-bit PNG grid, atomically; nrow defaults to ⌈√B⌉."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = image_grid(images.float().clamp(0.0, 1.0), nrow or math.ceil(math.sqrt(images.shape[0])))
    pixels = grid.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    image = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        image.save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
