"""Training objectives: ε-prediction MSE, iDDPM's hybrid loss (learned σ) and DiMR's multi-scale loss.

Every objective draws a time per sample (:func:`~zoo.diffusion.time_input.training_times`),
noise ε ~ N(0, I), forms x_t = α_t·x_0 + σ_t·ε, drops labels for classifier-free guidance,
calls ``model(x_t, time_input(t), y)`` and scores the output. It returns a dict of per-sample
tensors of shape (B,): ``loss`` (what to average and back-propagate) and its terms.

The model predicts ε (``prediction="eps"``, the papers' choice) or v = α_t·ε − σ_t·x_0
(``prediction="v"``, Salimans & Ho 2022): v keeps the implied x̂_0 = α_t·x_t − σ_t·v accurate at
high noise, where an ε model's x̂_0 = (x_t − σ_t·ε̂)/α_t multiplies its error by 1/α_t (157 at the
last step of DDPM's linear schedule), which is what a young model trained for minutes needs.
Samplers convert v back to ε (:func:`v_to_eps`), so every solver works with either.

``min_snr_gamma`` = γ weights each sample's loss by Min-SNR-γ (Hang et al. 2023): the x_0 error
weighted by min(SNR_t, γ), i.e. min(SNR, γ)/SNR on the ε loss and min(SNR, γ)/(SNR + 1) on the v loss
(SNR = α²/σ²). Low-noise steps, whose gradients dominate and conflict with the others, are capped,
which the paper measured to converge several times faster; γ = 5 is its default. ``loss`` carries
the weight, ``mse`` stays the unweighted error (zoo train logs it beside the loss).

Note on label dropping: DiT drops labels inside its own label embedder in training mode
(``class_dropout_prob``); a recipe states the same rate as ``diffusion.label_drop``, and zoo train
then draws the drops itself, per sample, with the embedder's dropout off (so labels are not dropped
twice). U-ViT/DiMR have no such dropout and rely on ``label_drop`` alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence, Union

import torch
from torch import Tensor, nn

from .denoiser import Denoiser
from .discrete import DiscreteDiffusion, betas_from_schedule
from .gaussian import DECODER_CDFS, discretized_gaussian_log_likelihood, normal_kl, to_bits_per_dim
from .labels import drop_labels
from .time_input import CONTINUOUS_TIME_INPUTS, get_time_input, time_to_index, training_times
from .time_sampling import UNIFORM, TimeSampling

if TYPE_CHECKING:
    from zoo.solvers.schedules import NoiseSchedule

#: What a backbone returns: one prediction, or one per branch (DiMR, lowest resolution first).
ModelOutput = Union[Tensor, Sequence[Tensor]]


def mean_flat(x: Tensor) -> Tensor:
    """Mean over all but the batch dimension."""
    return x.flatten(1).mean(dim=1)


PREDICTIONS = ("eps", "v")


def v_to_eps(v: Tensor, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """ε = σ_t·x_t + α_t·v (exact for a variance-preserving process, α² + σ² = 1)."""
    return sigma * x_t + alpha * v


def _loss_precision(*tensors: Tensor) -> list[Tensor]:
    """Losses are computed in at least float32 (bf16/fp16 model outputs are upcast; float64 kept)."""
    dtype = torch.promote_types(tensors[0].dtype, torch.float32)
    return [t.to(dtype) for t in tensors]


class DiffusionObjective:
    """ε-prediction MSE, L_simple of DDPM eq. 14: mean((ε_θ(x_t, t) − ε)²) per sample.

    ``schedule`` is a :mod:`zoo.solvers` schedule. For a discrete one (``schedule.discrete``)
    the trainer draws the 0-based DDPM index (uniformly unless ``time_sampling`` says otherwise) and forms x_t from the float64 ᾱ table
    of its β's; for a continuous one (the VP-SDE of U-ViT-M/L) it draws t uniformly in [0, 1]
    as U-ViT's trainer does and uses the schedule's marginals. ``time_input`` names the map from t to
    the backbone's input (:mod:`~zoo.diffusion.time_input`); ``num_steps`` N is the schedule's.
    """

    def __init__(
        self,
        schedule: "NoiseSchedule",
        time_input: str = "dit_index",
        label_drop: float = 0.0,
        null_label: int | None = None,
        prediction: str = "eps",
        min_snr_gamma: float | None = None,
        time_sampling: TimeSampling = UNIFORM,
    ):
        if min_snr_gamma is not None and not min_snr_gamma > 0:
            raise ValueError(f"min_snr_gamma must be > 0, got {min_snr_gamma!r}")
        self.min_snr_gamma = None if min_snr_gamma is None else float(min_snr_gamma)
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        self.prediction = prediction
        if label_drop > 0 and null_label is None:
            raise ValueError("label_drop > 0 needs the null label (diffusion.null_label)")
        self.schedule = schedule
        self.continuous = not getattr(schedule, "discrete", True)
        self.num_steps = int(getattr(schedule, "num_steps", 1000))
        self.time_input = time_input
        self.time_map = get_time_input(time_input)
        if self.continuous != (time_input in CONTINUOUS_TIME_INPUTS):
            kind = "continuous" if self.continuous else "discrete"
            raise ValueError(f"time input {time_input!r} does not fit a {kind} schedule ({schedule!r})")
        self.label_drop = float(label_drop)
        self.null_label = null_label
        self.t_min = 0.0  # continuous models train on t ~ U[0, 1] (U-ViT's VP-SDE ``sample(x0, t_init=0)``)
        self.time_sampling = time_sampling
        self.discrete = None if self.continuous else DiscreteDiffusion(betas_from_schedule(schedule, self.num_steps))

    # -- the forward process --------------------------------------------------------------

    def sample_times(self, batch_size: int, generator: torch.Generator | None = None,
                     device: torch.device | str | None = None) -> Tensor:
        return training_times(batch_size, self.num_steps, self.continuous, self.t_min, generator, device,
                              self.time_sampling)

    def coefficients(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """(α_t, σ_t) per sample, shaped to broadcast over ``like`` and in its dtype."""
        if self.discrete is not None:
            index = time_to_index(t, self.num_steps)  # float64 tables: 1 − ᾱ cancels in fp32 at small n
            return (self.discrete._take(self.discrete.sqrt_alphas_cumprod, index, like),
                    self.discrete._take(self.discrete.sqrt_one_minus_alphas_cumprod, index, like))
        view = (-1,) + (1,) * (like.ndim - 1)
        return (self.schedule.marginal_alpha(t).to(like).view(view),
                self.schedule.marginal_std(t).to(like).view(view))

    def add_noise(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = α_t·x_0 + σ_t·ε."""
        if self.discrete is not None:
            return self.discrete.q_sample(x0, time_to_index(t, self.num_steps), noise)
        alpha, sigma = self.coefficients(t, x0)
        return alpha * x0 + sigma * noise

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """What the model is trained to output: ε, or v = α_t·ε − σ_t·x_0."""
        if self.prediction == "eps":
            return noise
        alpha, sigma = self.coefficients(t, noise)
        return alpha * noise - sigma * x0

    def loss_weight(self, t: Tensor, like: Tensor) -> Tensor | None:
        """Min-SNR-γ weight per sample, shape (B,) in ``like``'s dtype; None without ``min_snr_gamma``."""
        if self.min_snr_gamma is None:
            return None
        alpha, sigma = self.coefficients(t, like)
        snr = (alpha / sigma).flatten() ** 2
        capped = snr.clamp(max=self.min_snr_gamma)
        return capped / snr if self.prediction == "eps" else capped / (snr + 1.0)

    @property
    def loss_is_mse(self) -> bool:
        """Whether ``loss`` is ``mse`` itself (no Min-SNR weight, no other term): the trainer logs ``mse`` beside
        the loss only where they differ."""
        return self.min_snr_gamma is None

    def weighted(self, mse: Tensor, t: Tensor) -> Tensor:
        """``mse`` (B,) times the Min-SNR weight (unchanged without one)."""
        weight = self.loss_weight(t, mse)
        return mse if weight is None else mse * weight

    def denoiser(self, model: nn.Module) -> Denoiser:
        """``model`` behind the call the sampler uses too (time map, null label)."""
        return Denoiser(model, lambda t: self.time_map(t, self.num_steps), self.null_label)

    def __call__(
        self, model: nn.Module, x0: Tensor, y: Tensor | None = None, generator: torch.Generator | None = None,
        draws: tuple[Tensor, Tensor, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """Per-sample losses of ``model`` on clean ``x0``. The time, noise and label-drop uniforms come
        from ``generator``, or are given as ``draws = (t, noise, u)`` (the trainer draws them per sample)."""
        drop = None
        if draws is None:
            # Drawn where the generator lives, then moved: a CPU generator cannot draw on a GPU (it raises).
            where = generator.device if generator is not None else x0.device
            t = self.sample_times(x0.shape[0], generator, device=where).to(x0.device)
            noise = torch.randn(x0.shape, generator=generator, device=where, dtype=x0.dtype).to(x0.device)
            if y is not None and self.label_drop > 0:
                drop = drop_labels(y, self.label_drop, self.null_label, generator) == self.null_label
        else:
            t, noise, u = (d.to(x0.device) for d in draws)
            noise = noise.to(x0.dtype)
            if y is not None and self.label_drop > 0:
                drop = u < self.label_drop
        x_t = self.add_noise(x0, t, noise)
        out = self.denoiser(model)(x_t, t, y, drop)
        return self.loss_terms(out, x0=x0, x_t=x_t, noise=noise, t=t)

    # -- scoring --------------------------------------------------------------------------

    def check_output(self, out: ModelOutput, noise_shape: tuple[int, ...]) -> None:
        """Raise ``ValueError`` if the model's output cannot be scored (the trainer asks once, on the meta device)."""
        if isinstance(out, (list, tuple)):
            raise ValueError("the model returns one prediction per branch: use objective type 'multiscale'")
        if tuple(out.shape) != tuple(noise_shape):
            raise ValueError(
                f"model output {tuple(out.shape)} does not match the noise {tuple(noise_shape)}"
                " (a learned-sigma model needs objective type 'hybrid_vlb')"
            )

    def loss_terms(self, out: ModelOutput, *, x0: Tensor, x_t: Tensor, noise: Tensor, t: Tensor) -> dict[str, Tensor]:
        self.check_output(out, noise.shape)
        out, target = _loss_precision(out, self.target(x0, noise, t))
        mse = mean_flat((out - target) ** 2)
        return {"loss": self.weighted(mse, t), "mse": mse.detach()}


class HybridVLBObjective(DiffusionObjective):
    """iDDPM's hybrid loss for learned-σ models (Nichol & Dhariwal 2021, §3.1, eq. 16).

    The model outputs [ε | v] (2C channels). loss = L_simple + L_vlb, where L_vlb is, per sample
    and in bits per dimension, KL(q(x_{n−1}|x_n, x_0) ‖ p_θ(x_{n−1}|x_n)) for n > 0 and the
    discretized Gaussian decoder NLL −log p_θ(x_0|x_1) for n = 0 (0-based index). p_θ has mean
    μ̃(x̂_0(ε_θ), x_n) with ε_θ **detached** (the bound trains only the variance, as in iDDPM) and
    log-variance v·log β_n + (1 − v)·log β̃_n after v ← (v + 1)/2 (eq. 15). As in DiT's
    ``loss_type=MSE`` the bound is not rescaled by N/1000 (iDDPM's ``RESCALED_MSE`` is). The decoder term
    computes Φ as DiT does (``decoder_cdf: tanh``, its approximation and 1e-12 floor) unless
    ``decoder_cdf: exact`` asks for the exact CDF (it then scores a badly placed mean without DiT's floor).
    """

    def __init__(self, *args, vlb_weight: float = 1.0, decoder_cdf: str = "tanh", **kwargs):
        super().__init__(*args, **kwargs)
        if decoder_cdf not in DECODER_CDFS:
            raise ValueError(f"decoder_cdf {decoder_cdf!r}: one of {', '.join(DECODER_CDFS)}")
        self.decoder_cdf = decoder_cdf
        if self.prediction != "eps":
            raise ValueError("the hybrid (learned-sigma) objective is defined for ε prediction only")
        if self.discrete is None:
            raise ValueError("the hybrid (learned-sigma) objective needs a discrete schedule")
        self.vlb_weight = float(vlb_weight)

    @property
    def loss_is_mse(self) -> bool:
        return False  # L_simple + L_vlb

    def vlb_terms(self, eps: Tensor, v: Tensor, *, x0: Tensor, x_t: Tensor, index: Tensor) -> Tensor:
        """L_vlb per sample in bits/dim (KL for n > 0, decoder NLL for n = 0)."""
        d = self.discrete
        true_mean, true_logvar = d.posterior(x0, x_t, index)
        x0_pred = d.predict_x0(x_t, index, eps)
        model_mean, _ = d.posterior(x0_pred, x_t, index)
        model_logvar = d.model_log_variance(v, index)
        kl = to_bits_per_dim(normal_kl(true_mean, true_logvar, model_mean, model_logvar))
        nll = to_bits_per_dim(-discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_logvar,
                                                                   cdf=self.decoder_cdf))
        return torch.where(index == 0, nll, kl)

    def check_output(self, out: ModelOutput, noise_shape: tuple[int, ...]) -> None:
        c = noise_shape[1]
        if isinstance(out, (list, tuple)) or out.shape[1] != 2 * c:
            shape = [tuple(o.shape) for o in out] if isinstance(out, (list, tuple)) else tuple(out.shape)
            raise ValueError(f"the hybrid objective needs a learned-sigma output with {2 * c} channels, got {shape}"
                             " (to learn sigma: DiT's model.learn_sigma: true; for a model without one, as"
                             " weights trained with learn_sigma false: diffusion.objective: eps_mse)")

    def loss_terms(self, out: ModelOutput, *, x0: Tensor, x_t: Tensor, noise: Tensor, t: Tensor) -> dict[str, Tensor]:
        self.check_output(out, noise.shape)
        c = noise.shape[1]
        out, x0, x_t, noise = _loss_precision(out, x0, x_t, noise)
        eps, v = out[:, :c], out[:, c:]
        mse = mean_flat((eps - noise) ** 2)
        index = time_to_index(t, self.num_steps).to(out.device)
        vlb = self.vlb_terms(eps.detach(), v, x0=x0, x_t=x_t, index=index)
        return {"loss": self.weighted(mse, t) + self.vlb_weight * vlb, "mse": mse.detach(), "vlb": vlb.detach()}


class MultiScaleObjective(DiffusionObjective):
    """DiMR's multi-scale ε loss: Σ_i coeff_i·mean((out_i − target_i)²) over the branch outputs
    (lowest resolution first), targets from :mod:`zoo.diffusion.multiscale` (pooled ε, or pooled v
    with ``prediction="v"``: the pooling is linear, so pooled v = α·pooled ε − σ·pooled x_0)."""

    def __init__(self, *args, coeffs: list[float] | tuple[float, ...], **kwargs):
        super().__init__(*args, **kwargs)
        self.coeffs = [float(c) for c in coeffs]

    @property
    def loss_is_mse(self) -> bool:
        return False  # every scale's error, where ``mse`` is the finest one's

    def check_output(self, out: ModelOutput, noise_shape: tuple[int, ...]) -> None:
        if not isinstance(out, (list, tuple)):
            raise ValueError("the multi-scale objective needs a model that returns one prediction per branch")
        if len(out) != len(self.coeffs):
            raise ValueError(f"{len(out)} branch outputs but {len(self.coeffs)} loss coefficients")

    def loss_terms(self, out: ModelOutput, *, x0: Tensor, x_t: Tensor, noise: Tensor, t: Tensor) -> dict[str, Tensor]:
        from .multiscale import multiscale_loss

        self.check_output(out, noise.shape)
        *out, target = _loss_precision(*out, self.target(x0, noise, t))
        loss = multiscale_loss(out, target, self.coeffs)
        last = mean_flat((out[-1] - target) ** 2)
        return {"loss": self.weighted(loss, t), "mse": last.detach()}


OBJECTIVES = {"eps_mse": DiffusionObjective, "hybrid_vlb": HybridVLBObjective, "multiscale": MultiScaleObjective}
