"""REPA's training objective L = L_velocity + lambda L_REPA (REPA Sec. 3.3): denoising + alignment terms."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from repa.transport import TimeSampling, create_diffusion, get_path, sample_time

__all__ = ["AlignKind", "RepaLoss", "alignment_loss", "alignment_per_sample", "denoising_loss", "resample_tokens"]

AlignKind = Literal["cos", "ntxent"]


def denoising_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Per-sample mean squared error over all non-batch dims, computed in (at least) fp32.

    Args:
        pred: (B, C, H, W) prediction (any float dtype, e.g. bf16 under autocast).
        target: same shape.

    Returns:
        (B,) losses.
    """
    diff = pred.float() - target.float() if pred.dtype != torch.float64 else pred - target
    return (diff**2).mean(dim=tuple(range(1, diff.ndim)))


def _square_grid(n: int, what: str) -> tuple[int, int]:
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"{what} has {n} tokens, not a square grid; pass its grid (h, w) explicitly")
    return side, side


def resample_tokens(
    tokens_BND: Tensor,
    grid_hw: tuple[int, int] | int,
    *,
    src_grid_hw: tuple[int, int] | None = None,
    mode: Literal["bilinear", "area"] = "bilinear",
) -> Tensor:
    """Resample a row-major token grid to another grid size (e.g. encoder 16x16 -> model 8x8).

    Bilinear (align_corners=False) interpolation on the (h, w) grid, anti-aliased when shrinking; "area"
    averages. Tokens are resampled as raw features (alignment normalises afterwards). Identity when the
    grids already match.

    Args:
        tokens_BND: (B, N, D) tokens, row-major over a (h, w) grid.
        grid_hw: target grid (h', w') or its side for a square grid.
        src_grid_hw: the source grid; None = square grid (N must be a perfect square).
        mode: "bilinear" or "area".

    Returns:
        (B, h' w', D) tokens in the input dtype.

    Raises:
        ValueError: the source grid is unknown (N not square) or does not hold N tokens.
    """
    b, n, d = tokens_BND.shape
    gh, gw = (grid_hw, grid_hw) if isinstance(grid_hw, int) else tuple(grid_hw)
    h, w = _square_grid(n, "the token sequence") if src_grid_hw is None else tuple(src_grid_hw)
    if h * w != n:
        raise ValueError(f"source grid {h}x{w} does not hold {n} tokens")
    if (h, w) == (gh, gw):
        return tokens_BND
    grid = tokens_BND.float().transpose(1, 2).reshape(b, d, h, w)  # (B, D, h, w)
    if mode == "area":
        out = F.interpolate(grid, size=(gh, gw), mode="area")
    elif mode == "bilinear":
        shrink = gh < h or gw < w
        out = F.interpolate(grid, size=(gh, gw), mode="bilinear", align_corners=False, antialias=shrink)
    else:
        raise ValueError(f"unknown resampling mode {mode!r}; choose 'bilinear' or 'area'")
    return out.flatten(2).transpose(1, 2).to(tokens_BND.dtype)  # (B, h' w', D)


def _fp32(x: Tensor) -> Tensor:
    return x if x.dtype == torch.float64 else x.float()


def alignment_per_sample(
    pred_BND: Tensor,
    target_BMD: Tensor,
    kind: AlignKind = "cos",
    temperature: float = 0.1,
    *,
    resample: bool = True,
    pred_grid_hw: tuple[int, int] | None = None,
    target_grid_hw: tuple[int, int] | None = None,
) -> Tensor:
    """Alignment loss of one encoder, per sample, in fp32 with autocast disabled. See `alignment_loss`.

    Returns:
        (B,) losses.
    """
    if pred_BND.ndim != 3 or target_BMD.ndim != 3:
        raise ValueError(f"expected (B, N, D) tokens, got {tuple(pred_BND.shape)} and {tuple(target_BMD.shape)}")
    if pred_BND.shape[0] != target_BMD.shape[0] or pred_BND.shape[2] != target_BMD.shape[2]:
        raise ValueError(
            f"projector output {tuple(pred_BND.shape)} and target {tuple(target_BMD.shape)} differ in batch or "
            "feature dimension (the projector's output width must equal the encoder's embed_dim)"
        )
    with torch.autocast(device_type=pred_BND.device.type, enabled=False):
        pred, target = _fp32(pred_BND), _fp32(target_BMD)  # fp16 norms overflow/underflow -> NaN
        n, m = pred.shape[1], target.shape[1]
        if n != m or (target_grid_hw is not None and pred_grid_hw is not None and target_grid_hw != pred_grid_hw):
            if not resample:
                raise ValueError(
                    f"model has {n} tokens but the encoder gives {m}; enable resampling or match the grids "
                    "(e.g. choose the encoder resolution so its patch grid equals the model's)"
                )
            grid = pred_grid_hw if pred_grid_hw is not None else _square_grid(n, "the model")
            target = resample_tokens(target, grid, src_grid_hw=target_grid_hw)
        pred, target = F.normalize(pred, dim=-1), F.normalize(target, dim=-1)
        if kind == "cos":  # L_REPA (Sec. 3.3): -(1/N) sum_n cos(y*[n], h_phi(h_t[n]))
            return -(pred * target).sum(dim=-1).mean(dim=-1)
        if kind == "ntxent":
            b, n, _ = pred.shape
            logits = pred @ target.transpose(1, 2) / temperature  # (B, N, N): token n vs target tokens of its image
            labels = torch.arange(n, device=pred.device).repeat(b)
            ce = F.cross_entropy(logits.reshape(b * n, n), labels, reduction="none")
            return ce.reshape(b, n).mean(dim=-1)
        raise ValueError(f"unknown alignment kind {kind!r}; choose 'cos' or 'ntxent'")


def alignment_loss(
    preds: Sequence[Tensor],
    targets: Sequence[Tensor],
    kind: AlignKind = "cos",
    temperature: float = 0.1,
    *,
    resample: bool = True,
) -> Tensor:
    """REPA's alignment loss averaged over encoders, samples and patches, computed in fp32.

    - "cos" (L_REPA, REPA Sec. 3.3): mean of -cos(proj(h_t)[n], y*[n]); -1 for perfectly aligned features,
      equal to the official `proj_loss` (sum over encoders and samples divided by their count).
    - "ntxent": InfoNCE over the tokens of each image: predicted token n must pick target token n among the
      N target tokens of the same image (the others are negatives), logits = cos / temperature; mean over
      tokens, samples and encoders. >= 0, log(N) at chance.

    Inputs of any float dtype are cast to fp32 first (the official fp16 path gives NaN); autocast is disabled
    inside. When the model and encoder grids differ, the TARGETS are resampled to the model grid (square
    grids), or a ValueError is raised with `resample=False`.

    Args:
        preds: per encoder, projector outputs (B, N, D_k).
        targets: per encoder, encoder tokens (B, M, D_k).
        kind: "cos" or "ntxent".
        temperature: NT-Xent temperature.
        resample: allow resampling target grids.

    Returns:
        a 0-d fp32 tensor.
    """
    if len(preds) != len(targets) or len(preds) == 0:
        raise ValueError(f"got {len(preds)} projector outputs for {len(targets)} encoder targets")
    terms = [alignment_per_sample(p, t, kind, temperature, resample=resample) for p, t in zip(preds, targets)]
    return torch.stack([term.mean() for term in terms]).mean()


class RepaLoss:
    """L = L_denoise + align_coeff * L_align (REPA Sec. 3.3) for SiT (flow, v-prediction) or DiT (DDPM).

    Args:
        path: "linear" or "cosine" interpolant (flow only; DDPM uses its discrete schedule).
        prediction: "v" (velocity; SiT/REPA).
        time_sampling: "uniform" or "lognormal" (see `repa.transport.sample_time`; flow only).
        align_coeff: lambda (0.5 in the paper).
        align_kind: "cos" or "ntxent".
        resample: resample encoder token grids to the model grid when they differ.
        temperature: NT-Xent temperature.
        time_mean, time_std: log-normal parameters.
        diffusion: "flow" (interpolant, default) or "ddpm" (DiT: integer timesteps, eps target + L_vlb with
            learned Sigma; the model must output 2C channels).
        num_timesteps: DDPM steps.
    """

    def __init__(
        self,
        path: str = "linear",
        prediction: Literal["v"] = "v",
        time_sampling: TimeSampling = "uniform",
        align_coeff: float = 0.5,
        align_kind: AlignKind = "cos",
        resample: bool = True,
        *,
        temperature: float = 0.1,
        time_mean: float = 0.0,
        time_std: float = 1.0,
        diffusion: Literal["flow", "ddpm"] = "flow",
        num_timesteps: int = 1000,
    ) -> None:
        if prediction != "v":
            raise ValueError(
                f"prediction {prediction!r} is not supported; use 'v' (DDPM uses eps via diffusion='ddpm')"
            )
        if time_sampling not in ("uniform", "lognormal"):
            raise ValueError(f"unknown time sampling {time_sampling!r}; choose 'uniform' or 'lognormal'")
        if align_kind not in ("cos", "ntxent"):
            raise ValueError(f"unknown alignment kind {align_kind!r}; choose 'cos' or 'ntxent'")
        if diffusion not in ("flow", "ddpm"):
            raise ValueError(f"unknown diffusion {diffusion!r}; choose 'flow' or 'ddpm'")
        self.path = get_path(path)
        self.prediction = prediction
        self.time_sampling = time_sampling
        self.align_coeff = align_coeff
        self.align_kind = align_kind
        self.resample = resample
        self.temperature = temperature
        self.time_mean, self.time_std = time_mean, time_std
        self.diffusion = diffusion
        self.ddpm = (
            create_diffusion(None, num_timesteps=num_timesteps, learn_sigma=True) if diffusion == "ddpm" else None
        )

    def draw_time(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """One time per sample, drawn like the official SILoss: on the CPU global RNG (or `generator`), then
        moved to x's device. Flow: float t in [0, 1]; DDPM: integer timesteps (torch.randint, as DiT)."""
        device = generator.device if generator is not None else "cpu"
        if self.ddpm is not None:
            return self.ddpm.sample_timesteps(x.shape[0], device=device, generator=generator).to(x.device)
        t = sample_time(x.shape[0], self.time_sampling, device=device, generator=generator,
                        mean=self.time_mean, std=self.time_std, path=self.path)  # fmt: skip
        return t.to(device=x.device, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)

    def __call__(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        targets: Sequence[Tensor] | None = None,
        *,
        t: Tensor | None = None,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
        model_kwargs: dict[str, Any] | None = None,
        per_sample: bool = False,
    ) -> dict[str, Tensor]:
        """Compute the loss terms for one batch.

        Random draws when not given, in this order (the official SILoss order, so `torch.manual_seed(s)`
        replays it): `t` (one `torch.rand(B)` on the CPU, or `torch.randint(0, T, (B,))` for DDPM), then
        `noise = torch.randn_like(x)`. With `generator`, both come from it (noise on the generator's device).
        The model's own label dropout (train mode) draws after these, inside the model call.

        Args:
            model: `model(x_t, t, y, **model_kwargs) -> (out, zs)` (or just `out`).
            x: (B, C, H, W) clean inputs.
            y: (B,) labels.
            targets: per encoder (B, M, D_k) tokens, or None (vanilla: align = 0, projectors skipped).
            t: (B,) times in [0, 1]. DDPM: long timesteps 0..T-1, or floats in [0, 1) mapped to floor(t T).
            noise: (B, C, H, W) standard normal noise.
            generator: RNG for the draws.
            model_kwargs: extra model arguments, e.g. {"force_drop_ids": drop_mask.long()}.
            per_sample: also return (B,) tensors `denoise/per_sample`, `align/per_sample`.

        Returns:
            dict of scalars: denoise, align, align/<k> per encoder, total (+ mse, vb for DDPM).
        """
        if t is None:
            t = self.draw_time(x, generator)
        if noise is None:
            noise = torch.randn_like(x) if generator is None else torch.randn(
                x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)  # fmt: skip
        kwargs = dict(model_kwargs or {})
        if targets is None:
            kwargs.setdefault("project", False)

        terms: dict[str, Tensor] = {}
        if self.ddpm is None:
            t = t.to(x.device)
            x_t = self.path.interpolate(x, noise, t)  # x_t = alpha_t x + sigma_t noise (REPA Sec. 2)
            target = self.path.velocity_target(x, noise, t)
            out, zs = _split(model(x_t, t.flatten(), y, **kwargs))
            denoise = denoising_loss(out, target)  # L_velocity (REPA Sec. 2), per sample
        else:
            timestep = t.to(x.device)
            timestep = (
                timestep.long() if not timestep.is_floating_point() else self.ddpm.timesteps_from_uniform(timestep)
            )
            x_t = self.ddpm.q_sample(x, timestep, noise).to(x.dtype)
            out, zs = _split(model(x_t, self.ddpm.model_time(timestep), y, **kwargs))
            ddpm_terms = self.ddpm.training_losses(out, x, x_t, timestep, noise)  # iDDPM Eq. 16 (DiT)
            denoise = ddpm_terms["loss"]
            terms["mse"], terms["vb"] = ddpm_terms["mse"].mean(), ddpm_terms["vb"].mean()

        align_ps = self._align(zs, targets, x)
        terms["denoise"] = denoise.mean()
        terms["align"] = align_ps["all"].mean()
        for k, v in align_ps.items():
            if k != "all":
                terms[f"align/{k}"] = v.mean()
        terms["total"] = terms["denoise"] + self.align_coeff * terms["align"]
        if per_sample:
            terms["denoise/per_sample"], terms["align/per_sample"] = denoise, align_ps["all"]
        return terms

    def _align(self, zs: Sequence[Tensor], targets: Sequence[Tensor] | None, x: Tensor) -> dict[Any, Tensor]:
        """Per-sample alignment terms per encoder k and their mean over encoders ("all")."""
        if targets is None or len(targets) == 0:
            return {"all": torch.zeros(x.shape[0], device=x.device, dtype=torch.float32)}
        if len(zs) != len(targets):
            raise ValueError(f"the model returned {len(zs)} projector outputs for {len(targets)} encoder targets")
        per = {
            k: alignment_per_sample(z, tgt, self.align_kind, self.temperature, resample=self.resample)
            for k, (z, tgt) in enumerate(zip(zs, targets))
        }
        per["all"] = torch.stack(list(per.values())).mean(dim=0)
        return per


def _split(output: Any) -> tuple[Tensor, list[Tensor]]:
    if isinstance(output, (tuple, list)):
        return output[0], list(output[1])
    return output, []
