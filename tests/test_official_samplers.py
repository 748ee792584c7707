"""Each row of the solver table in docs/sampling.md: an official sampling call against the zoo pipeline.

zoo side: what a user runs — the shipped recipe's ``sample`` section (plus the row's CLI options),
``sample_latents`` with given x_T and per-sample labels, on the network the converter builds from
a golden file's official weights (equal to the official network: tests/test_*_parity.py).

reference side: the official loop written here from its equations, in float64 — its own beta
table, respacing or time grid, time input, guidance rule and update — calling that same network.
The official scripts build some tables in float32 (U-ViT/DiMR: ``betas.float()``, ``t.float()``);
the reference keeps float64, so the comparison checks the algorithm rather than float32 rounding.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import zoo
from official_dpm_solver import SD_BETAS, Discrete, VPLinear, dpm_solver_2022_fast, dpm_solver_pp_fast
from zoo.convert import get_family
from zoo.parity import build_official_model
from zoo.sample import SampleRequest, sample_latents
from zoo.seeds import solver_generators

F64 = torch.float64
ROOT = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).parent / "golden"
LABELS = [3, 7]  # classes of the two samples; label 10 is the golden models' null class
NULL = 10
SEED = 0


pytestmark = pytest.mark.usefixtures("one_thread")


def _golden(name: str, family: str):
    golden = torch.load(GOLDEN / f"{name}.pt", weights_only=True)
    model = build_official_model(family, golden["config"], golden["state_dict"]).to(F64)
    spec = get_family(family).official_config_to_model_spec(golden["config"])
    return model, spec


@pytest.fixture(scope="module")
def dit():
    return _golden("golden_dit_tiny", "dit")


@pytest.fixture(scope="module")
def uvit():
    return _golden("golden_uvit_tiny", "uvit")


@pytest.fixture(scope="module")
def uvit_noconv():
    return _golden("golden_uvit_tiny_noconv", "uvit")


@pytest.fixture(scope="module")
def dimr():
    return _golden("golden_dimr_tiny_r2", "dimr")


def _recipe(name: str, spec: dict, overrides: list[str] = ()) -> dict:
    """A shipped recipe with the golden model in its model section (10 classes, null label 10)."""
    recipe = zoo.load_recipe(ROOT / "recipes" / f"{name}.yaml", list(overrides))
    recipe["model"] = spec
    recipe["data"]["num_classes"] = 10
    if recipe["diffusion"].get("null_label") is not None:
        recipe["diffusion"]["null_label"] = NULL
    return recipe


def _zoo(model, recipe, **request) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_T, samples) of the zoo pipeline: given noise, labels [3, 7], the recipe plus ``request`` options."""
    x_T = torch.randn(len(LABELS), 4, 16, 16, generator=torch.Generator().manual_seed(1), dtype=F64)
    x, y = sample_latents(model, recipe, SampleRequest(class_labels=LABELS, x_T=x_T, seed=SEED, **request))
    assert x.dtype == F64 and y.tolist() == LABELS
    return x_T, x


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    # Both sides evaluate the same float64 network on the same inputs; they differ only by the
    # rounding of algebraically equal coefficient formulas (~1e-16 relative per step). Measured:
    # 0 (DiT) to 2e-15 (U-ViT, DiMR) of the scale; 1e-12 keeps a 500x margin and lies far below
    # what a wrong setting moves (a wrong variance, chain, skip type, guidance scale or power:
    # 1e-6 to 4e-2 of the scale on these tiny models).
    scale = expected.abs().max().item()
    err = (actual - expected).abs().max().item()
    assert err <= 1e-12 * scale, (err, scale)


def _step_noise(shape):
    """The per-step noise the zoo pipeline draws (one generator per sample), in step order."""
    generators = solver_generators(SEED, 0, len(LABELS))
    return lambda: torch.stack([torch.randn(shape, generator=g, dtype=F64) for g in generators])


# ---------------------------------------------------------------- DiT / ADM (gaussian_diffusion.py)

def _adm_kept(num_steps: int, spec: str) -> list[int]:
    """ADM ``space_timesteps`` for one section ("250", "25") or "ddimN"."""
    if spec.startswith("ddim"):
        count = int(spec[4:])
        stride = next(i for i in range(1, num_steps) if len(range(0, num_steps, i)) == count)
        return list(range(0, num_steps, stride))
    count, position, kept = int(spec), 0.0, []
    for _ in range(count):
        kept.append(round(position))
        position += (num_steps - 1) / (count - 1)
    return kept


def _dit_forward_with_cfg(model, x, k, y, scale):
    """DiT ``forward_with_cfg`` on the batch [x; x] with labels [y; null]; the first half is the sample's."""
    out = model(torch.cat([x, x]), torch.cat([k, k]), torch.cat([y, torch.full_like(y, NULL)]))
    eps, rest = out[:, :3], out[:, 3:]
    cond, uncond = eps.chunk(2)
    half = uncond + scale * (cond - uncond)
    return torch.cat([torch.cat([half, half]), rest], dim=1)[: x.shape[0]]


def _dit_official(model, x_T, spec, sampler, scale=1.5, eta=0.0):
    """``create_diffusion(spec)`` then ``p_sample_loop`` / ``ddim_sample_loop`` (clip_denoised=False)."""
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=F64)
    abar_all = torch.cumprod(1 - betas, 0)
    kept = _adm_kept(1000, spec)
    abar = abar_all[kept].tolist()
    abar_prev = [1.0] + abar[:-1]
    beta = [1 - a / p for a, p in zip(abar, abar_prev)]
    post_var = [b * (1 - p) / (1 - a) for b, a, p in zip(beta, abar, abar_prev)]
    log_post_clipped = [math.log(post_var[1])] + [math.log(v) for v in post_var[1:]]
    y = torch.tensor(LABELS)
    noise, x = _step_noise(x_T.shape[1:]), x_T
    for i in reversed(range(len(kept))):
        out = _dit_forward_with_cfg(model, x, torch.full((x.shape[0],), kept[i]), y, scale)
        eps, v = out[:, :4], out[:, 4:]
        x0 = math.sqrt(1 / abar[i]) * x - math.sqrt(1 / abar[i] - 1) * eps
        if sampler == "p_sample_loop":
            mean = beta[i] * math.sqrt(abar_prev[i]) / (1 - abar[i]) * x0 \
                + (1 - abar_prev[i]) * math.sqrt(1 - beta[i]) / (1 - abar[i]) * x
            frac = (v + 1) / 2
            log_var = frac * math.log(beta[i]) + (1 - frac) * log_post_clipped[i]
            x = mean + torch.exp(0.5 * log_var) * noise() if i > 0 else mean
        else:
            eps = (math.sqrt(1 / abar[i]) * x - x0) / math.sqrt(1 / abar[i] - 1)
            sigma = eta * math.sqrt((1 - abar_prev[i]) / (1 - abar[i])) * math.sqrt(1 - abar[i] / abar_prev[i])
            mean = x0 * math.sqrt(abar_prev[i]) + math.sqrt(1 - abar_prev[i] - sigma**2) * eps
            x = mean + sigma * noise() if i > 0 else mean
    return x


# The recipe's DDPM keeps 250 steps; the test keeps 50 by the same rule (both sides, "50"): a
# 250-step float64 chain costs 10 s of CPU, and the rule itself is pinned for "250" in test_solvers.
@pytest.mark.parametrize("spec, sampler, request_options, eta", [
    ("50", "p_sample_loop", dict(steps=50), 0.0),                                   # the recipe's own sampler
    ("ddim25", "ddim_sample_loop", dict(solver="ddim", respacing="ddim25"), 0.0),
    ("25", "ddim_sample_loop", dict(solver="ddim", steps=25), 0.0),
    ("25", "ddim_sample_loop", dict(solver="ddim", steps=25, solver_options={"eta": 1.0}), 1.0),
])
def test_dit(dit, spec, sampler, request_options, eta):
    model, model_spec = dit
    recipe = _recipe("dit_xl_2", model_spec)
    assert recipe["sample"]["solver"] == {"type": "ddpm", "steps": 250, "variance": "learned"}
    assert recipe["sample"]["cfg"] == {"scale": 1.5, "convention": "dit", "channels": 3}
    x_T, x = _zoo(model, recipe, **request_options)
    expected = _dit_official(model, x_T, spec, sampler, scale=1.5, eta=eta)
    _close(x, expected)
    if spec == "25" and eta == 0:  # the chain matters: 'ddim25' walks another one and lands elsewhere
        assert (x - _dit_official(model, x_T, "ddim25", sampler)).abs().max() > 1e-3


# ---------------------------------------------------------------- U-ViT / DiMR (DPM-Solver releases)

def _uvit_cfg(model, t_in, scale):
    """U-ViT's ``cfg_nnet``: ε_c + s·(ε_c − ε_u) (s = 0: the conditional prediction only)."""
    y = torch.tensor(LABELS)

    def eps(x, t):
        tt = torch.full((x.shape[0],), t_in(t), dtype=F64)
        cond = model(x, tt, y)
        return cond if scale == 0 else cond + scale * (cond - model(x, tt, torch.full_like(y, NULL)))
    return eps


def _dimr_cfg(model, scale, power):
    """DiMR eval.py's ``cfg_nnet`` on log_snr = 8·(N·t)/1000 − 4: s-form, or w with the cosine power decay."""
    y = torch.tensor(LABELS)

    def eps(x, t):
        n = t * 1000
        log_snr = torch.full((x.shape[0],), n / 1000 * 8 - 4, dtype=F64)
        cond = model(x, log_snr, y)[-1]
        uncond = model(x, log_snr, torch.full_like(y, NULL))[-1]
        if power is None:
            return cond + scale * (cond - uncond)
        w = (scale - 1) * (1 - math.cos(((1 - n / 1000) ** power) * math.pi)) / 2 + 1
        return uncond + w * (cond - uncond)
    return eps



# The recipes' 50 NFE run here as 20 (same 'fast' rule both sides; 50 = 3·16 + 2 and 20 = 3·6 + 2
# end alike), to keep the float64 references cheap.
@pytest.mark.parametrize("script, recipe_name, fixture, scale", [
    ("eval.py", "uvit_m_4", "uvit", 0.0),             # 64 px, continuous VP, no guidance
    ("eval_ldm.py", "uvit_l_2", "uvit", 0.4),         # 256 px latents, continuous VP, s = 0.4
    ("eval_ldm_discrete.py", "uvit_h_2", "uvit_noconv", 0.4),  # U-ViT-H: discrete SD betas, DPM-Solver++
])
def test_uvit(request, script, recipe_name, fixture, scale):
    model, spec = request.getfixturevalue(fixture)
    recipe = _recipe(recipe_name, spec)
    assert recipe["sample"]["solver"]["steps"] == 50 and (recipe["sample"].get("cfg") or {}).get("scale", 0) == scale
    x_T, x = _zoo(model, recipe, steps=20)
    if script == "eval_ldm_discrete.py":
        eps = _uvit_cfg(model, lambda t: t * 1000, scale)
        expected = dpm_solver_pp_fast(eps, Discrete(SD_BETAS), x_T, 20, 1e-3)
    else:
        eps = _uvit_cfg(model, lambda t: 999 * t, scale)
        expected = dpm_solver_2022_fast(eps, VPLinear(), x_T, 20, 1e-4)
    _close(x, expected)


# DiMR's sampler is the recipe's (dpm_solver++ singlestep order 3, time-uniform, 250 NFE). The test runs
# it with fewer NFE (same rule, both sides): float64 depthwise 7x7 convolutions make 250 NFE slow on
# a CPU, and 31 = 3·10 + 1 ends with a first-order step like 250 = 3·83 + 1 (20 ends with order 2).
@pytest.mark.parametrize("flags, cfg_set, nfe", [
    ("", None, 31),                                   # config.sample.scale = 0.4 (s form), no decay
    ("--cfg 1.5 --cfg_scale_pow 2", "sample.cfg={scale: 1.5, convention: dit, power: 2.0}", 20),
])
def test_dimr(dimr, flags, cfg_set, nfe):
    model, spec = dimr
    recipe = _recipe("dimr_xl_2r", spec, [cfg_set] if cfg_set else [])
    assert recipe["sample"]["solver"] == {"type": "dpm_solver++", "steps": 250, "order": 3, "method": "singlestep",
                                          "skip": "time_uniform"}
    x_T, x = _zoo(model, recipe, steps=nfe)
    eps = _dimr_cfg(model, 0.4, None) if not flags else _dimr_cfg(model, 1.5, 2.0)
    expected = dpm_solver_pp_fast(eps, Discrete(SD_BETAS), x_T, nfe, 1e-3)
    _close(x, expected)
