"""DiT's discrete Gaussian diffusion: linear betas, eps-prediction with learned Sigma, L_simple + L_vlb, respacing,
ancestral (DDPM) and DDIM sampling (the loops `GaussianDiffusion` inherits from `repa.transport.ddpm_sampling`).

Follows Ho et al. 2020 (DDPM) and Nichol & Dhariwal 2021 (improved DDPM, "iDDPM"), as used by DiT
(Peebles & Xie 2023). Discrete timestep i = 0 .. T-1 is the noise level of x_t, with i = 0 closest to data,
so the direction agrees with the continuous convention (t = 0 data). The model input for timestep i is the
float `float(i)` in 0 .. 999 (the ORIGINAL index when respaced), exactly what DiT feeds its sinusoidal
timestep embedder, so official DiT checkpoints work unchanged. Schedules are float64; values are extracted
to float32 (float64 if the data is float64), as DiT does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from repa.transport.ddpm_sampling import DiffusionSampling, ModelFn
from repa.transport.likelihood import discretized_gaussian_log_likelihood, mean_flat, normal_kl

__all__ = [
    "GaussianDiffusion",
    "cfg_eps_fn",
    "create_diffusion",
    "linear_time_of_step",
    "ddpm_model_fn",
    "linear_beta_schedule",
    "space_timesteps",
]


def linear_beta_schedule(num_timesteps: int = 1000) -> Tensor:
    """DDPM's linear betas from 1e-4 to 0.02 for 1000 steps, rescaled by 1000 / num_timesteps (float64)."""
    scale = 1000 / num_timesteps
    return torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64)


def space_timesteps(num_timesteps: int, section_counts: str | int | Sequence[int]) -> set[int]:
    """Timesteps kept by respacing (iDDPM Sec. 4): the range is cut into equal sections and each section
    keeps `count` evenly strided steps (fractional stride, rounded), first and last included.

    "ddimN" is iDDPM's DDIM spacing instead: the integer stride s with len(range(0, T, s)) == N, i.e. the steps
    0, s, 2s, ... (the last kept step is below T - 1 unless s divides T - 1).

    Args:
        num_timesteps: steps of the base process.
        section_counts: "250", "10,15,20", "ddim50", an int, or a list of ints.

    Returns:
        the set of kept base indices.
    """
    if isinstance(section_counts, str) and section_counts.startswith("ddim"):
        desired = int(section_counts[len("ddim") :])
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == desired:
                return set(range(0, num_timesteps, stride))
        raise ValueError(f"cannot take {desired} equally strided steps from {num_timesteps} (ddim spacing)")
    if isinstance(section_counts, str):
        counts = [int(c) for c in section_counts.split(",")]
    elif isinstance(section_counts, int):
        counts = [section_counts]
    else:
        counts = [int(c) for c in section_counts]
    size_per, extra = divmod(num_timesteps, len(counts))
    kept: set[int] = set()
    start = 0
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if count < 1 or count > size:
            raise ValueError(f"cannot take {count} steps from a section of {size} (num_timesteps={num_timesteps})")
        stride = (size - 1) / (count - 1) if count > 1 else 1.0
        kept.update(start + round(k * stride) for k in range(count))
        start += size
    return kept


class GaussianDiffusion(DiffusionSampling):
    """Discrete forward process q(x_t | x) = N(sqrt(abar_t) x, (1 - abar_t) I) and its learned reverse process.

    Args:
        betas: (T,) float64 betas of this process (already respaced if `timestep_map` is given).
        timestep_map: (T,) original index of each step (respacing); None = identity.
        learn_sigma: model outputs 2C channels: eps and v in [-1, 1] interpolating the log-variance between
            beta_tilde (v = -1) and beta (v = +1) (iDDPM Eq. 15). False: C channels (eps), variance beta_tilde.
        vlb_scale: weight of the one sampled vlb term L_t in the loss; default T / 1000. Since L_vlb = sum of
            the T terms, T / 1000 * L_t is iDDPM's lambda = 1e-3 on L_vlb in expectation; DiT (T = 1000) uses 1.
    """

    def __init__(
        self,
        betas: Tensor,
        *,
        timestep_map: Sequence[int] | Tensor | None = None,
        learn_sigma: bool = True,
        vlb_scale: float | None = None,
    ) -> None:
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.ndim != 1 or not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("betas must be a 1-D tensor with values in (0, 1]")
        self.num_timesteps = int(betas.shape[0])
        self.learn_sigma = learn_sigma
        self.timestep_map = (
            torch.arange(self.num_timesteps) if timestep_map is None else torch.as_tensor(timestep_map).long()
        )
        self.vlb_scale = self.num_timesteps / 1000.0 if vlb_scale is None else vlb_scale
        self.betas = betas
        alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(alphas, 0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        self.sqrt_recip_alphas_cumprod = (1.0 / self.alphas_cumprod).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / self.alphas_cumprod - 1).sqrt()
        # posterior q(x_{t-1} | x_t, x) (DDPM Eq. 6-7)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # log clipped at step 0, where the posterior variance is 0
        pv = self.posterior_variance
        self.posterior_log_variance_clipped = torch.log(torch.cat([pv[1:2], pv[1:]]) if len(pv) > 1 else pv)
        self.posterior_mean_coef1 = betas * self.alphas_cumprod_prev.sqrt() / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * alphas.sqrt() / (1.0 - self.alphas_cumprod)

    # ------------------------------------------------------------------------------------------ helpers

    @staticmethod
    def _extract(arr: Tensor, timestep: Tensor, like: Tensor) -> Tensor:
        """arr[timestep] as (B, 1, ..., 1) on like's device; float32 unless `like` is float64."""
        dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
        out = arr.to(like.device)[timestep.to(like.device).long()].to(dtype)
        return out.reshape(-1, *([1] * (like.ndim - 1)))

    def model_time(self, timestep: Tensor) -> Tensor:
        """The model's time input for step indices `timestep`: the original index as float (0 .. 999)."""
        return self.timestep_map.to(timestep.device)[timestep.long()].float()

    # ------------------------------------------------------------------------------------------ forward

    def q_mean_variance(self, x: Tensor, timestep: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and log-variance of q(x_t | x)."""
        mean = self._extract(self.sqrt_alphas_cumprod, timestep, x) * x
        var = self._extract(1.0 - self.alphas_cumprod, timestep, x)
        return mean, var, self._extract(torch.log(1.0 - self.alphas_cumprod), timestep, x)

    def q_sample(self, x: Tensor, timestep: Tensor, noise: Tensor) -> Tensor:
        """x_t = sqrt(abar_t) x + sqrt(1 - abar_t) noise (DDPM Eq. 4)."""
        return (
            self._extract(self.sqrt_alphas_cumprod, timestep, x) * x
            + self._extract(self.sqrt_one_minus_alphas_cumprod, timestep, x) * noise
        )

    def q_posterior_mean_variance(self, x: Tensor, x_t: Tensor, timestep: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x) (DDPM Eq. 6-7)."""
        mean = (
            self._extract(self.posterior_mean_coef1, timestep, x_t) * x
            + self._extract(self.posterior_mean_coef2, timestep, x_t) * x_t
        )
        var = self._extract(self.posterior_variance, timestep, x_t)
        return mean, var, self._extract(self.posterior_log_variance_clipped, timestep, x_t)

    def predict_x_from_eps(self, x_t: Tensor, timestep: Tensor, eps: Tensor) -> Tensor:
        """x = x_t / sqrt(abar_t) - sqrt(1 / abar_t - 1) eps."""
        return (
            self._extract(self.sqrt_recip_alphas_cumprod, timestep, x_t) * x_t
            - self._extract(self.sqrt_recipm1_alphas_cumprod, timestep, x_t) * eps
        )

    def predict_eps_from_x(self, x_t: Tensor, timestep: Tensor, pred_x: Tensor) -> Tensor:
        """eps = (x_t / sqrt(abar_t) - x) / sqrt(1 / abar_t - 1), the inverse of `predict_x_from_eps`."""
        scaled = self._extract(self.sqrt_recip_alphas_cumprod, timestep, x_t) * x_t
        return (scaled - pred_x) / self._extract(self.sqrt_recipm1_alphas_cumprod, timestep, x_t)

    # ------------------------------------------------------------------------------------------ reverse

    def p_mean_variance(
        self, model_output: Tensor, x_t: Tensor, timestep: Tensor, clip_denoised: bool = False
    ) -> dict[str, Tensor]:
        """Mean and variance of p(x_{t-1} | x_t) from a model output.

        Args:
            model_output: (B, 2C, ...) [eps, v] if learn_sigma else (B, C, ...) eps.
            x_t: (B, C, ...) noisy input.
            timestep: (B,) step indices of this process.
            clip_denoised: clamp the x prediction to [-1, 1] (pixel models; DiT samples latents unclipped).

        Returns:
            dict with mean, variance, log_variance, pred_x, pred_eps.
        """
        c = x_t.shape[1]
        if self.learn_sigma:
            if model_output.shape[1] != 2 * c:
                raise ValueError(f"learned-Sigma model must output {2 * c} channels, got {model_output.shape[1]}")
            eps, v = model_output[:, :c], model_output[:, c:]
            min_log = self._extract(self.posterior_log_variance_clipped, timestep, x_t)
            max_log = self._extract(torch.log(self.betas), timestep, x_t)
            frac = (v + 1) / 2  # iDDPM Eq. 15: log Sigma = frac log beta + (1 - frac) log beta_tilde
            log_variance = frac * max_log + (1 - frac) * min_log
            variance = torch.exp(log_variance)
        else:
            eps = model_output[:, :c]
            variance = self._extract(self.posterior_variance, timestep, x_t).expand_as(x_t)
            log_variance = self._extract(self.posterior_log_variance_clipped, timestep, x_t).expand_as(x_t)
        pred_x = self.predict_x_from_eps(x_t, timestep, eps)
        if clip_denoised:
            pred_x = pred_x.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_x, x_t, timestep)
        return {"mean": mean, "variance": variance, "log_variance": log_variance, "pred_x": pred_x, "pred_eps": eps}

    def vb_terms_bpd(self, model_output: Tensor, x: Tensor, x_t: Tensor, timestep: Tensor) -> Tensor:
        """Per-sample variational bound term L_t in bits/dim (iDDPM Eq. 4-6): KL(q(x_{t-1}|x_t,x) || p) for
        t > 0, the discretised decoder NLL -log p(x | x_0) at t = 0. Returns (B,)."""
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x, x_t, timestep)
        out = self.p_mean_variance(model_output, x_t, timestep)
        kl = mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x, means=out["mean"], log_scales=0.5 * out["log_variance"])
        nll = mean_flat(nll) / math.log(2.0)
        return torch.where(timestep.to(kl.device) == 0, nll, kl)

    def training_losses(
        self, model_output: Tensor, x: Tensor, x_t: Tensor, timestep: Tensor, noise: Tensor
    ) -> dict[str, Tensor]:
        """DiT/iDDPM hybrid loss L_simple + lambda L_vlb per sample (iDDPM Eq. 16).

        L_simple = mean over (C, H, W) of (eps_pred - noise)^2. L_vlb uses the eps half DETACHED (stop-grad
        on the mean), so it trains only the variance output; it is scaled by `vlb_scale`. Computed in fp32.

        Args:
            model_output: (B, 2C, ...) raw model output at (x_t, model_time(timestep)).
            x, x_t, noise: (B, C, ...) clean data, q_sample(x, timestep, noise), the noise.
            timestep: (B,) step indices.

        Returns:
            dict of (B,) tensors: loss, mse, vb (vb is zeros when not learn_sigma).
        """
        c = x.shape[1]
        model_output = model_output.float() if model_output.dtype != torch.float64 else model_output
        eps = model_output[:, :c]
        mse = mean_flat((noise - eps) ** 2)
        if self.learn_sigma:
            frozen = torch.cat([eps.detach(), model_output[:, c:]], dim=1)
            vb = self.vb_terms_bpd(frozen, x.to(frozen.dtype), x_t.to(frozen.dtype), timestep) * self.vlb_scale
        else:
            vb = torch.zeros_like(mse)
        return {"loss": mse + vb, "mse": mse, "vb": vb}

    def sample_timesteps(
        self, batch: int, *, device: torch.device | str = "cpu", generator: torch.Generator | None = None
    ) -> Tensor:
        """Uniform integer timesteps (B,) in 0 .. T-1 (DiT: torch.randint(0, T, (B,)))."""
        return torch.randint(0, self.num_timesteps, (batch,), device=device, generator=generator)

    def timesteps_from_uniform(self, u: Tensor) -> Tensor:
        """Map U(0, 1) draws to uniform integer timesteps floor(u T)."""
        return (u * self.num_timesteps).long().clamp(0, self.num_timesteps - 1)


def create_diffusion(
    timestep_respacing: str | int | Sequence[int] | None = None,
    *,
    num_timesteps: int = 1000,
    learn_sigma: bool = True,
) -> GaussianDiffusion:
    """DiT's `create_diffusion`: linear betas over `num_timesteps`, optionally respaced.

    Args:
        timestep_respacing: None/"" = all steps (training), "250" / 250 / "10,20" = respaced (sampling),
            "ddim50" = iDDPM's equally strided DDIM spacing.
        num_timesteps: base steps (1000).
        learn_sigma: learned-range variance (DiT: True).

    Returns:
        a `GaussianDiffusion` whose alphas_cumprod are the base ones at the kept steps.
    """
    betas = linear_beta_schedule(num_timesteps)
    if timestep_respacing in (None, ""):
        return GaussianDiffusion(betas, learn_sigma=learn_sigma)
    kept = sorted(space_timesteps(num_timesteps, timestep_respacing))
    base_alphas_cumprod = torch.cumprod(1.0 - betas, 0)
    new_betas, last = [], torch.tensor(1.0, dtype=torch.float64)
    for i in kept:  # choose betas so the kept steps have the base alphas_cumprod
        new_betas.append(1.0 - base_alphas_cumprod[i] / last)
        last = base_alphas_cumprod[i]
    return GaussianDiffusion(torch.stack(new_betas), timestep_map=kept, learn_sigma=learn_sigma,
                             vlb_scale=num_timesteps / 1000.0)  # fmt: skip


def ddpm_model_fn(model: torch.nn.Module) -> ModelFn:
    """Adapter `fn(x_t, t_model, y) -> out` for a `DiffusionTransformer` with learned Sigma (no projectors)."""

    def fn(x_t: Tensor, t_model: Tensor, y: Tensor) -> Tensor:
        out, _ = model(x_t, t_model, y, project=False)
        return out

    return fn


def linear_time_of_step(t_model: Tensor, num_timesteps: int = 1000) -> Tensor:
    """REPA time t of DDPM steps: the linear-path noise level with the same signal-to-noise ratio.

    x_t = (1 - t) x + t noise and x_i = sqrt(abar_i) x + sqrt(1 - abar_i) noise have the same ratio when
    t / (1 - t) = sqrt((1 - abar_i) / abar_i), i.e. t = sqrt(1 - abar) / (sqrt(abar) + sqrt(1 - abar)); the inverse of
    `repa.convert.linear_to_ddpm`. Used to apply a guidance interval given in REPA time to a DDPM sampler.

    Args:
        t_model: (B,) original step indices as fed to the model (0 .. num_timesteps - 1).
        num_timesteps: steps of the base (linear-beta) process.
    """
    abar = torch.cumprod(1.0 - linear_beta_schedule(num_timesteps), 0)
    a = abar[t_model.detach().round().long().clamp(0, num_timesteps - 1).cpu()]
    return ((1 - a).sqrt() / (a.sqrt() + (1 - a).sqrt())).to(torch.float32)


def cfg_eps_fn(
    fn: ModelFn,
    cfg_scale: float,
    null_label: int,
    guidance_channels: int | None = None,
    guidance_low: float = 0.0,
    guidance_high: float = 1.0,
) -> ModelFn:
    """Classifier-free guidance for an eps model (Ho & Salimans 2022): eps = eps_u + s (eps_c - eps_u).

    The batch [x, x] is evaluated with labels [y, null]; the variance channels are the conditional ones.
    We guide all C eps channels. DiT's `forward_with_cfg` guides only the first 3 channels of its 4-channel
    latents (a known quirk of the official code); pass `guidance_channels=3` to reproduce it.

    Args:
        fn: `fn(x_t, t_model, y) -> (B, 2C, ...)`.
        cfg_scale: guidance scale s (1 = no guidance).
        null_label: the unconditional class (num_classes).
        guidance_channels: number of leading eps channels guided (None = all C).
        guidance_low, guidance_high: the guidance interval in REPA time (as the flow samplers take it): steps whose
            noise level (`linear_time_of_step`) lies outside it run the conditional model alone.

    Returns:
        a function with the same signature returning (B, 2C, ...) for the B conditional inputs.
    """

    def guided(x_t: Tensor, t_model: Tensor, y: Tensor) -> Tensor:
        b = x_t.shape[0]
        if not in_guidance_interval(t_model, guidance_low, guidance_high):
            return fn(x_t, t_model, y)
        out = fn(torch.cat([x_t, x_t]), torch.cat([t_model, t_model]), torch.cat([y, torch.full_like(y, null_label)]))
        return guide_eps(out[:b], out[b:], cfg_scale, x_t.shape[1] if guidance_channels is None else guidance_channels)

    return guided


def in_guidance_interval(t_model: Tensor, low: float, high: float) -> bool:
    """Whether a sampling step's noise level (REPA time `linear_time_of_step`) lies in the guidance interval; one step
    at a time, so the batch's first entry speaks for all."""
    return low <= float(linear_time_of_step(t_model[:1])[0]) <= high


def guide_eps(cond: Tensor, uncond: Tensor, cfg_scale: float, k: int) -> Tensor:
    """eps_u + s (eps_c - eps_u) on the first k channels of (B, 2C, ...) model outputs; the rest (the remaining eps
    channels and the variance channels) are the conditional ones."""
    return torch.cat([uncond[:, :k] + cfg_scale * (cond[:, :k] - uncond[:, :k]), cond[:, k:]], dim=1)
