"""REG under DDPM: the joint model function and classifier-free guidance of a class-token DiT, for
`GaussianDiffusion.p_sample_loop` / `ddim_sample_loop` with `cls_noise` (see `repa.transport.ddpm_sampling`).

REG itself is SiT-only; under DDPM the class token is q_sampled at the image's step and predicts its own noise
(`RepaLoss`), so it is sampled as one more eps-predicting state beside the image, on the same steps and guidance.
"""

from __future__ import annotations

import torch
from torch import Tensor

from repa.transport.ddpm import guide_eps, in_guidance_interval
from repa.transport.ddpm_sampling import JointModelFn

__all__ = ["cfg_joint_eps_fn", "ddpm_joint_model_fn"]


def ddpm_joint_model_fn(model: torch.nn.Module) -> JointModelFn:
    """`fn(x_t, cls_t, t_model, y) -> (out (B, 2C, ...), eps_cls (B, D_enc))` for a `DiffusionTransformer` with a
    class token (no projectors)."""

    def fn(x_t: Tensor, cls_t: Tensor, t_model: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        out, _, extras = model(x_t, t_model, y, project=False, cls_t=cls_t)
        return out, extras["class_token"]

    return fn


def cfg_joint_eps_fn(
    fn: JointModelFn,
    cfg_scale: float,
    null_label: int,
    guidance_channels: int | None = None,
    guidance_low: float = 0.0,
    guidance_high: float = 1.0,
    cls_cfg_scale: float | None = None,
) -> JointModelFn:
    """`repa.transport.ddpm.cfg_eps_fn` for a joint function: the batch [x, x] with [cls, cls] and labels [y, null];
    the image's eps channels and the class token's eps are guided on the same steps (the guidance interval in REPA
    time), the class token with `cls_cfg_scale` (None = cfg_scale; <= 0 = its conditional prediction only, REG's
    rule, as the flow samplers take it).

    Returns:
        a joint function with the same signature for the B conditional inputs.
    """
    cls_scale = cfg_scale if cls_cfg_scale is None else cls_cfg_scale

    def guided(x_t: Tensor, cls_t: Tensor, t_model: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        b = x_t.shape[0]
        if not in_guidance_interval(t_model, guidance_low, guidance_high):
            return fn(x_t, cls_t, t_model, y)
        out, out_cls = fn(torch.cat([x_t, x_t]), torch.cat([cls_t, cls_t]), torch.cat([t_model, t_model]),
                          torch.cat([y, torch.full_like(y, null_label)]))  # fmt: skip
        k = x_t.shape[1] if guidance_channels is None else guidance_channels
        image = guide_eps(out[:b], out[b:], cfg_scale, k)
        cls_cond, cls_uncond = out_cls[:b], out_cls[b:]
        cls = cls_cond if cls_scale <= 0 else cls_uncond + cls_scale * (cls_cond - cls_uncond)
        return image, cls

    return guided
