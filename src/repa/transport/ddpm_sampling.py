"""Sampling DiT's discrete diffusion: ancestral steps (DDPM, Ho et al. 2020 Alg. 2) and DDIM (Song et al. 2021).

`DiffusionSampling` holds the reverse-process steps and loops that `repa.transport.ddpm.GaussianDiffusion` inherits;
they use its `p_mean_variance`, `predict_eps_from_x`, `model_time`, `_extract` and schedule tensors. A loop runs from
x_{T-1} = noise down to x over the (possibly respaced) process, the model seeing the original step index as DiT does.

REG models (a class token, arXiv 2507.01467) are sampled jointly, as the flow samplers do: pass `cls_noise` and a
joint `fn(x_t, cls_t, t_model, y) -> (out, eps_cls)` (`repa.transport.ddpm_joint`); the class token takes the same
steps, its per-step noise drawn right after the image's, and is dropped at the end (`return_class_token` keeps it).
It has no variance output: its steps use DDPM's fixed small variance beta_tilde (our choice; REG is SiT-only).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch import Tensor
from tqdm.auto import tqdm

__all__ = ["DiffusionSampling", "ModelFn"]

ModelFn = Callable[[Tensor, Tensor, Tensor], Tensor]  # (x_t, t_model, y) -> (B, 2C, ...) eps and v
JointModelFn = Callable[[Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]  # REG: (x_t, cls_t, t_model, y)
Noises = Sequence[Tensor] | Tensor | None


class DiffusionSampling:
    """Ancestral (`p_sample_loop`) and DDIM (`ddim_sample_loop`) sampling, mixed into `GaussianDiffusion`."""

    num_timesteps: int  # these are set by GaussianDiffusion
    learn_sigma: bool
    alphas_cumprod: Tensor
    alphas_cumprod_prev: Tensor

    def p_sample(
        self, model_output: Tensor, x_t: Tensor, timestep: Tensor, noise: Tensor, clip_denoised: bool = False
    ) -> Tensor:
        """One ancestral step x_{t-1} = mean + exp(log_var / 2) noise (no noise at step 0)."""
        out = self.p_mean_variance(model_output, x_t, timestep, clip_denoised)
        nonzero = (timestep != 0).to(x_t.dtype).reshape(-1, *([1] * (x_t.ndim - 1)))
        return out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise

    @torch.no_grad()
    def p_sample_loop(
        self,
        fn: ModelFn,
        noise: Tensor,
        y: Tensor,
        *,
        clip_denoised: bool = False,
        generator: torch.Generator | None = None,
        eps: Noises = None,
        progress: bool = False,
        cls_noise: Tensor | None = None,
        cls_eps: Noises = None,
        return_class_token: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Ancestral sampling from x_{T-1} = noise down to x (DDPM Alg. 2), over this (possibly respaced) process.

        Args:
            fn: `fn(x_t, t_model, y) -> (B, 2C, ...)` where t_model = `model_time(i)` (original index as float),
                e.g. `ddpm_model_fn(model)` or `cfg_eps_fn(...)`.
            noise: (B, C, ...) starting latents.
            y: (B,) labels.
            clip_denoised: clamp x predictions to [-1, 1].
            generator: RNG for the per-step noise (global RNG when None); one `randn` per step except the last.
            eps: optional injected per-step noises (T - 1 of them, in sampling order), replacing the draws.
            progress: show a tqdm bar.
            cls_noise: REG: (B, D_enc) initial class tokens; `fn` is then `fn(x_t, cls_t, t_model, y) -> (out, eps_cls)`.
            cls_eps: REG: injected class-token noises (with `eps`).
            return_class_token: also return the generated class token.

        Returns:
            samples, same shape and dtype as `noise` (and the (B, D_enc) class tokens with `return_class_token`).
        """
        step = partial(self.p_sample, clip_denoised=clip_denoised)
        return self._sample_loop(step, fn, noise, y, noisy=True, generator=generator, eps=eps, progress=progress,
                                 desc="ddpm", cls_noise=cls_noise, cls_eps=cls_eps,
                                 return_class_token=return_class_token)  # fmt: skip

    def ddim_sample(
        self,
        model_output: Tensor,
        x_t: Tensor,
        timestep: Tensor,
        noise: Tensor | None = None,
        eta: float = 0.0,
        clip_denoised: bool = False,
    ) -> Tensor:
        """One DDIM step (Song et al. 2021, Eq. 12) from step t to the previous kept step, as iDDPM/DiT's `ddim_sample`.

        x_prev = sqrt(abar_prev) x_pred + sqrt(1 - abar_prev - sigma^2) eps + sigma noise with
        sigma = eta sqrt((1 - abar_prev) / (1 - abar)) sqrt(1 - abar / abar_prev), eps re-derived from the
        (possibly clipped) x prediction, no noise at step 0. eta = 0 is deterministic; eta = 1 gives sigma^2 =
        `posterior_variance` (DDPM's beta_tilde) and the posterior mean, i.e. ancestral sampling with the fixed small
        variance. A learned variance (the v channels) is ignored.

        Args:
            model_output: (B, 2C, ...) [eps, v] if learn_sigma else (B, C, ...) eps.
            x_t: (B, C, ...) current state.
            timestep: (B,) step indices of this (possibly respaced) process.
            noise: (B, C, ...) standard normal draws (needed when eta > 0).
            eta: 0 = deterministic DDIM, 1 = DDPM-like stochasticity.
            clip_denoised: clamp the x prediction to [-1, 1].
        """
        out = self.p_mean_variance(model_output, x_t, timestep, clip_denoised)
        pred_x = out["pred_x"]
        eps = self.predict_eps_from_x(x_t, timestep, pred_x)
        abar = self._extract(self.alphas_cumprod, timestep, x_t)
        abar_prev = self._extract(self.alphas_cumprod_prev, timestep, x_t)
        sigma = eta * ((1 - abar_prev) / (1 - abar)).sqrt() * (1 - abar / abar_prev).sqrt()
        mean = pred_x * abar_prev.sqrt() + (1 - abar_prev - sigma**2).clamp(min=0).sqrt() * eps
        if eta == 0:
            return mean
        if noise is None:
            raise ValueError("ddim_sample with eta > 0 needs noise")
        nonzero = (timestep != 0).to(x_t.dtype).reshape(-1, *([1] * (x_t.ndim - 1)))
        return mean + nonzero * sigma * noise

    @torch.no_grad()
    def ddim_sample_loop(
        self,
        fn: ModelFn,
        noise: Tensor,
        y: Tensor,
        *,
        eta: float = 0.0,
        clip_denoised: bool = False,
        generator: torch.Generator | None = None,
        eps: Noises = None,
        progress: bool = False,
        cls_noise: Tensor | None = None,
        cls_eps: Noises = None,
        return_class_token: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """DDIM sampling from x_{T-1} = noise down to x over this (possibly respaced) process (iDDPM/DiT's
        `ddim_sample_loop`): one model call per kept step, the model seeing the original index as in `p_sample_loop`.

        Args:
            fn: `fn(x_t, t_model, y) -> (B, 2C, ...)` (or (B, C, ...) without learned Sigma), e.g. `cfg_eps_fn(...)`.
            noise: (B, C, ...) starting latents.
            y: (B,) labels.
            eta: 0 (default) = deterministic given `noise`; 1 = the ancestral posterior variance (beta_tilde).
            clip_denoised: clamp x predictions to [-1, 1].
            generator: RNG for the per-step noise when eta > 0 (global RNG when None); one `randn` per step except
                the last, as `p_sample_loop`. Nothing is drawn when eta = 0.
            eps: optional injected per-step noises (T - 1 of them, in sampling order), replacing the draws.
            progress: show a tqdm bar.
            cls_noise, cls_eps, return_class_token: REG, as in `p_sample_loop`.

        Returns:
            samples, same shape and dtype as `noise` (and the (B, D_enc) class tokens with `return_class_token`).
        """
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"DDIM eta must be in [0, 1], got {eta}")
        step = partial(self.ddim_sample, eta=eta, clip_denoised=clip_denoised)
        return self._sample_loop(step, fn, noise, y, noisy=eta > 0, generator=generator, eps=eps, progress=progress,
                                 desc="ddim", cls_noise=cls_noise, cls_eps=cls_eps,
                                 return_class_token=return_class_token)  # fmt: skip

    def _sample_loop(
        self,
        step: Callable[[Tensor, Tensor, Tensor, Tensor | None], Tensor],
        fn: ModelFn | JointModelFn,
        noise: Tensor,
        y: Tensor,
        *,
        noisy: bool,
        generator: torch.Generator | None,
        eps: Noises,
        progress: bool,
        desc: str,
        cls_noise: Tensor | None = None,
        cls_eps: Noises = None,
        return_class_token: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Steps T-1 .. 0: `x = step(fn(x, model_time(i), y), x, i, z)`. With `noisy`, z is the k-th injected noise
        or one `randn` (from `generator`, else the global RNG) per step, zeros at step 0; without it, z is None.
        REG (`cls_noise`): `out, eps_cls = fn(x, cls, model_time(i), y)`, then the image's step, then the class
        token's (its z drawn right after the image's)."""
        if cls_noise is not None and (cls_noise.ndim != 2 or cls_noise.shape[0] != noise.shape[0]):
            raise ValueError(f"cls_noise must have shape ({noise.shape[0]}, D_enc), got {tuple(cls_noise.shape)}")
        if cls_noise is not None and noisy and eps is not None and cls_eps is None:
            raise ValueError("injected noises `eps` for a class-token model need `cls_eps` as well")
        if return_class_token and cls_noise is None:
            raise ValueError("return_class_token needs cls_noise (a REG model)")
        x, cls = noise, None if cls_noise is None else cls_noise.to(noise.device, noise.dtype)
        b = x.shape[0]
        steps = list(range(self.num_timesteps))[::-1]
        for k, i in enumerate(tqdm(steps, disable=not progress, desc=desc)):
            timestep = torch.full((b,), i, device=x.device, dtype=torch.long)
            if cls is None:
                out = fn(x, self.model_time(timestep), y)
            else:
                out, out_cls = fn(x, cls, self.model_time(timestep), y)  # type: ignore[call-arg]
            z = self._step_noise(x, k, i, noisy, eps, generator)
            x_next = step(out.to(x.dtype), x, timestep, z)
            if cls is not None:
                z_cls = self._step_noise(cls, k, i, noisy, cls_eps, generator)
                cls = step(self._class_token_output(out_cls.to(cls.dtype)), cls, timestep, z_cls)
            x = x_next
        return (x, cls) if return_class_token else x  # type: ignore[return-value]

    @staticmethod
    def _step_noise(
        like: Tensor, k: int, i: int, noisy: bool, eps: Noises, generator: torch.Generator | None
    ) -> Tensor | None:
        """The noise of sampling step k (process step i): None without noise, zeros at step 0, else the k-th
        injected one or one `randn` from `generator` (the global RNG when None)."""
        if not noisy:
            return None
        if i == 0:
            return torch.zeros_like(like)
        if eps is not None:
            return eps[k].to(device=like.device, dtype=like.dtype)
        g_dev = generator.device if generator is not None else like.device
        return torch.randn(like.shape, generator=generator, device=g_dev, dtype=like.dtype).to(like.device)

    def _class_token_output(self, eps_cls: Tensor) -> Tensor:
        """REG's class-token prediction (B, D) as a model output of this process: eps with, when the process learns
        Sigma, v = -1 (iDDPM Eq. 15: the fixed small variance beta_tilde), as it has no variance output."""
        return torch.cat([eps_cls, -torch.ones_like(eps_cls)], dim=1) if self.learn_sigma else eps_cls
