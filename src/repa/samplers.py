"""Samplers for velocity models (t = 1 noise -> t = 0 data): Euler/Heun ODE, Euler-Maruyama SDE and the adaptive
dopri5 ODE solver (SiT's default ODE sampler, through the optional torchdiffeq), all with CFG.

Both follow the official REPA samplers step for step (float64 integration, model evaluated in float32, CFG
on a doubled batch inside a guidance interval [guidance_low, guidance_high] of t_cur), so they reproduce the
official outputs. They take a velocity function `fn(x_t, t, y) -> v` (t of shape (B,)); `model_velocity_fn`
builds one from a `DiffusionTransformer`. DDPM (DiT) sampling lives in `repa.transport.ddpm`.

REG models (a class token, arXiv 2507.01467) are sampled jointly: pass `cls_noise` and a joint function
`fn(x_t, cls_t, t, y) -> (v, v_cls)` (`model_joint_velocity_fn`); the class token follows the image's grid, CFG and
(SDE) noise injection step for step, as REG's official sampler, and is dropped at the end unless asked for.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from repa.transport import InterpolationPath, get_path

__all__ = [
    "DOPRI5_ATOL",
    "DOPRI5_RTOL",
    "JointVelocityFn",
    "VelocityFn",
    "dopri5_sampler",
    "euler_maruyama_sampler",
    "euler_sampler",
    "model_joint_velocity_fn",
    "model_velocity_fn",
]

VelocityFn = Callable[[Tensor, Tensor, Tensor], Tensor]
# SiT's ODE defaults (train_utils.parse_ode_args, transport.Sampler.sample_ode): dopri5, atol 1e-6, rtol 1e-3
DOPRI5_ATOL = 1e-6
DOPRI5_RTOL = 1e-3
JointVelocityFn = Callable[[Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]


def model_velocity_fn(model: nn.Module) -> VelocityFn:
    """`fn(x_t, t, y) -> v` for a `DiffusionTransformer`: puts it in eval mode, skips the projectors, keeps the
    first C output channels (drops learned-Sigma channels), runs without gradients."""
    model.eval()

    @torch.no_grad()
    def fn(x_t: Tensor, t: Tensor, y: Tensor) -> Tensor:
        out, _ = model(x_t, t, y, project=False)
        return out[:, : x_t.shape[1]]

    return fn


def model_joint_velocity_fn(model: nn.Module) -> JointVelocityFn:
    """`fn(x_t, cls_t, t, y) -> (v, v_cls)` for a REG `DiffusionTransformer` (class_token_dim > 0): eval mode, no
    projectors, the first C output channels and the class token's prediction, no gradients."""
    model.eval()

    @torch.no_grad()
    def fn(x_t: Tensor, cls_t: Tensor, t: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        out, _, extras = model(x_t, t, y, project=False, cls_t=cls_t)
        return out[:, : x_t.shape[1]], extras["class_token"]

    return fn


def _use_cfg(t_cur: Tensor, cfg_scale: float, guidance_low: float, guidance_high: float) -> bool:
    return cfg_scale > 1.0 and guidance_low <= float(t_cur) <= guidance_high


def _evaluate(
    fn: Callable, xs: list[Tensor], t_cur: Tensor, y: Tensor, use_cfg: bool, null_label: int | None,
    model_dtype: torch.dtype,
) -> tuple[list[Tensor], list[Tensor], Tensor]:  # fmt: skip
    """Model velocities at (xs, t_cur) in float64, on [x, x] with labels [y, null] under CFG.

    `xs` is [x] (fn(x, t, y) -> v) or [x, cls] for REG (fn(x, cls, t, y) -> (v, v_cls)).

    Returns:
        (vs, xs_in, t_in): vs (B or 2B, ...) float64 per state, the (possibly doubled) float64 inputs and times.
    """
    if use_cfg:
        xs_in = [torch.cat([x, x]) for x in xs]
        y_in = torch.cat([y, torch.full_like(y, null_label)])
    else:
        xs_in, y_in = xs, y
    t_in = torch.ones(xs_in[0].shape[0], device=xs[0].device, dtype=torch.float64) * t_cur
    v = fn(*[x.to(model_dtype) for x in xs_in], t_in.to(model_dtype), y_in)
    vs = [v] if len(xs) == 1 else list(v)
    return [v.to(torch.float64) for v in vs], xs_in, t_in


def _guide(d: Tensor, use_cfg: bool, cfg_scale: float) -> Tensor:
    if not use_cfg:
        return d
    d_cond, d_uncond = d.chunk(2)
    if cfg_scale <= 0:  # REG's class token: a non-positive scale means the conditional half only
        return d_cond
    return d_uncond + cfg_scale * (d_cond - d_uncond)  # Ho & Salimans 2022, on all channels


def _setup(
    noise: Tensor, cls_noise: Tensor | None, cfg_scale: float, cls_cfg_scale: float | None, null_label: int | None,
    model_dtype: torch.dtype | None,
) -> tuple[list[Tensor], list[float], torch.dtype]:  # fmt: skip
    """What every sampler starts from: the float64 states [x] (or [x, cls] for REG), the guidance scale of each, and
    the dtype of the model's inputs (default float32 for float64 noise, else noise.dtype)."""
    if cfg_scale > 1.0 and null_label is None:
        raise ValueError("cfg_scale > 1 needs null_label (the model's unconditional class, = num_classes)")
    if cls_noise is not None and (cls_noise.ndim != 2 or cls_noise.shape[0] != noise.shape[0]):
        raise ValueError(f"cls_noise must have shape ({noise.shape[0]}, D_enc), got {tuple(cls_noise.shape)}")
    xs = [noise.to(torch.float64)] + ([] if cls_noise is None else [cls_noise.to(noise.device, torch.float64)])
    if model_dtype is None:
        model_dtype = torch.float32 if noise.dtype == torch.float64 else noise.dtype
    return xs, [cfg_scale, cfg_scale if cls_cfg_scale is None else cls_cfg_scale], model_dtype


def _finish(xs: list[Tensor], return_class_token: bool) -> Tensor | tuple[Tensor, Tensor]:
    if return_class_token:
        if len(xs) == 1:
            raise ValueError("return_class_token needs cls_noise (a REG model)")
        return xs[0], xs[1]
    return xs[0]


@torch.no_grad()
def euler_sampler(
    fn: VelocityFn,
    noise: Tensor,
    y: Tensor,
    num_steps: int = 50,
    heun: bool = False,
    cfg_scale: float = 1.0,
    guidance_low: float = 0.0,
    guidance_high: float = 1.0,
    null_label: int | None = None,
    *,
    t_steps: Sequence[float] | Tensor | None = None,
    model_dtype: torch.dtype | None = None,
    progress: bool = False,
    cls_noise: Tensor | None = None,
    cls_cfg_scale: float | None = None,
    return_class_token: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Probability-flow ODE dx = v(x, t) dt from t = 1 to 0 with Euler or Heun (2nd order) steps.

    x_next = x + (t_next - t_cur) v(x, t_cur); Heun adds the corrector v' = v(x_next, t_next) on every step
    but the last (where t_next = 0): x_next = x + dt (v + v') / 2. CFG (scale > 1) applies where
    guidance_low <= t_cur <= guidance_high; the Heun corrector reuses that decision.

    Args:
        fn: velocity function `fn(x_t, t (B,), y) -> v`.
        noise: (B, C, H, W) initial latents at t = 1.
        y: (B,) labels.
        num_steps: steps on the uniform grid linspace(1, 0, num_steps + 1).
        heun: use Heun's method.
        cfg_scale: classifier-free guidance scale (1 = off).
        guidance_low, guidance_high: guidance interval in t (Kynkaanniemi et al. 2024).
        null_label: unconditional label (required when cfg_scale > 1).
        t_steps: optional custom decreasing time grid from 1 to 0 (overrides num_steps).
        model_dtype: dtype of the model's inputs (default float32 for float64 noise, else noise.dtype).
        progress: show a tqdm bar.
        cls_noise: REG: (B, D_enc) initial class tokens at t = 1; `fn` is then `fn(x_t, cls_t, t, y) -> (v, v_cls)`.
        cls_cfg_scale: REG: guidance scale of the class token (None = cfg_scale; <= 0 = conditional only).
        return_class_token: also return the generated class token.

    Returns:
        (B, C, H, W) float64 samples at t = 0 (and the (B, D_enc) class tokens with `return_class_token`).
    """
    xs_next, scales, dtype = _setup(noise, cls_noise, cfg_scale, cls_cfg_scale, null_label, model_dtype)
    if t_steps is None:
        t_steps = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64, device=noise.device)
    else:
        t_steps = torch.as_tensor(t_steps, dtype=torch.float64).to(noise.device)
        if t_steps.ndim != 1 or len(t_steps) < 2 or not bool((t_steps[1:] < t_steps[:-1]).all()):
            raise ValueError("t_steps must be a strictly decreasing 1-D grid")
    num = len(t_steps) - 1
    for i in tqdm(range(num), disable=not progress, desc="ode"):
        t_cur, t_next = t_steps[i], t_steps[i + 1]
        xs_cur = xs_next
        use_cfg = _use_cfg(t_cur, cfg_scale, guidance_low, guidance_high)
        vs = _evaluate(fn, xs_cur, t_cur, y, use_cfg, null_label, dtype)[0]
        ds_cur = [_guide(v, use_cfg, scale) for v, scale in zip(vs, scales)]
        xs_next = [x_cur + (t_next - t_cur) * d_cur for x_cur, d_cur in zip(xs_cur, ds_cur)]
        if heun and i < num - 1:
            vs = _evaluate(fn, xs_next, t_next, y, use_cfg, null_label, dtype)[0]
            ds_prime = [_guide(v, use_cfg, scale) for v, scale in zip(vs, scales)]
            xs_next = [
                x_cur + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_prime)
                for x_cur, d_cur, d_prime in zip(xs_cur, ds_cur, ds_prime)
            ]
    return _finish(xs_next, return_class_token)


@torch.no_grad()
def euler_maruyama_sampler(
    fn: VelocityFn,
    noise: Tensor,
    y: Tensor,
    num_steps: int = 250,
    path: str | InterpolationPath = "linear",
    cfg_scale: float = 1.0,
    guidance_low: float = 0.0,
    guidance_high: float = 1.0,
    null_label: int | None = None,
    last_step: float = 0.04,
    generator: torch.Generator | None = None,
    eps: Sequence[Tensor] | Tensor | None = None,
    *,
    model_dtype: torch.dtype | None = None,
    progress: bool = False,
    cls_noise: Tensor | None = None,
    cls_cfg_scale: float | None = None,
    cls_eps: Sequence[Tensor] | Tensor | None = None,
    return_class_token: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Reverse SDE dx = [v - (w_t / 2) s] dt + sqrt(w_t) dW_bar with w_t = 2 t (REPA Sec. 2 / SiT;
    any w_t > 0 keeps the marginals of the probability-flow ODE, REPA's sampler uses 2 t).

    Grid linspace(1, last_step, num_steps) then 0. Each of the first num_steps - 1 steps draws
    eps ~ N(0, I) (float64, before the model call), computes the score s from the velocity on `path`, the
    drift d = v - t s (guided under CFG) and x_next = x + d dt + sqrt(w) sqrt(|dt|) eps. The last step
    (last_step -> 0) is the deterministic x + d dt, no noise.

    Args:
        fn: velocity function `fn(x_t, t (B,), y) -> v`.
        noise: (B, C, H, W) initial latents at t = 1.
        y: (B,) labels.
        num_steps: number of steps (model evaluations), >= 2.
        path: interpolation path the model was trained on (for the velocity -> score conversion).
        cfg_scale, guidance_low, guidance_high, null_label: as in `euler_sampler`.
        last_step: time of the last stochastic state.
        generator: RNG for eps; None uses the global RNG (`torch.randn_like`, replays official runs).
        eps: injected noises, num_steps - 1 tensors (B, C, H, W) in order (overrides `generator`).
        model_dtype: dtype of the model's inputs.
        progress: show a tqdm bar.
        cls_noise: REG: (B, D_enc) initial class tokens at t = 1; `fn` is then `fn(x_t, cls_t, t, y) -> (v, v_cls)`.
            Each stochastic step draws the class token's noise right after the image's (REG's order).
        cls_cfg_scale: REG: guidance scale of the class token (None = cfg_scale; <= 0 = conditional only).
        cls_eps: REG: injected class-token noises, num_steps - 1 tensors (B, D_enc) (with `eps`).
        return_class_token: also return the generated class token.

    Returns:
        (B, C, H, W) float64 samples at t = 0 (and the (B, D_enc) class tokens with `return_class_token`).
    """
    xs, scales, dtype = _setup(noise, cls_noise, cfg_scale, cls_cfg_scale, null_label, model_dtype)
    if num_steps < 2:
        raise ValueError("euler_maruyama_sampler needs num_steps >= 2")
    if eps is not None and len(eps) < num_steps - 1:
        raise ValueError(f"eps holds {len(eps)} noises, {num_steps - 1} are needed")
    if cls_noise is not None and eps is not None and (cls_eps is None or len(cls_eps) < num_steps - 1):
        raise ValueError(f"with eps and cls_noise, cls_eps must hold {num_steps - 1} class-token noises")
    p = get_path(path)
    t_steps = torch.linspace(1, last_step, num_steps, dtype=torch.float64, device=noise.device)
    t_steps = torch.cat([t_steps, torch.zeros(1, dtype=torch.float64, device=noise.device)])
    injected = [eps, cls_eps]
    for i in tqdm(range(num_steps), disable=not progress, desc="sde"):
        t_cur, t_next = t_steps[i], t_steps[i + 1]
        dt = t_next - t_cur
        last = i == num_steps - 1
        use_cfg = _use_cfg(t_cur, cfg_scale, guidance_low, guidance_high)
        w = 2 * t_cur  # diffusion coefficient
        zs = [] if last else [_draw(x, injected[k], i, generator) for k, x in enumerate(xs)]
        vs, xs_in, t_in = _evaluate(fn, xs, t_cur, y, use_cfg, null_label, dtype)
        for k, (x, v, x_in) in enumerate(zip(xs, vs, xs_in)):
            s = p.velocity_to_score(v, x_in, t_in)
            d = _guide(v - 0.5 * w * s, use_cfg, scales[k])
            xs[k] = x + dt * d if last else x + d * dt + torch.sqrt(w) * (zs[k] * torch.sqrt(torch.abs(dt)))
    return _finish(xs, return_class_token)


def _draw(x: Tensor, eps: Sequence[Tensor] | Tensor | None, i: int, generator: torch.Generator | None) -> Tensor:
    """Step i's standard normal noise like x (float64): injected, from `generator`, or the global RNG."""
    if eps is not None:
        return eps[i].to(device=x.device, dtype=torch.float64)
    if generator is None:
        return torch.randn_like(x)
    return torch.randn(x.shape, generator=generator, device=generator.device, dtype=torch.float64).to(x.device)


@torch.no_grad()
def dopri5_sampler(
    fn: VelocityFn,
    noise: Tensor,
    y: Tensor,
    cfg_scale: float = 1.0,
    guidance_low: float = 0.0,
    guidance_high: float = 1.0,
    null_label: int | None = None,
    *,
    atol: float = DOPRI5_ATOL,
    rtol: float = DOPRI5_RTOL,
    method: str = "dopri5",
    model_dtype: torch.dtype | None = None,
    cls_noise: Tensor | None = None,
    cls_cfg_scale: float | None = None,
    return_class_token: bool = False,
    stats: dict | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Probability-flow ODE dx = v(x, t) dt from t = 1 to 0 with an adaptive Runge-Kutta solver (torchdiffeq's
    dopri5, Dormand-Prince 5(4)), as SiT's ODE sampler: `torchdiffeq.odeint` over the whole batch as one state with
    the given tolerances (SiT's defaults atol 1e-6, rtol 1e-3), from noise to data over the full interval (SiT's
    linear-path velocity model integrates t in [0, 1] of its reversed time, no end clipping).

    The state is float64 and the model sees `model_dtype` inputs (as `euler_sampler`). CFG (scale > 1) applies
    where guidance_low <= t <= guidance_high; the guidance interval's ends inside (0, 1) are passed to the solver
    as `jump_t` (discontinuities of the vector field: it steps to them exactly and restarts there instead of
    shrinking its steps around them), and t = 0 as a step end (`step_t`), so the model is never evaluated outside
    [0, 1] (unlike a plain `odeint`, which overshoots the end and interpolates back). The error norm, hence the step
    sizes, is shared by the batch (SiT's behaviour): a sample depends on its batch mates within the tolerance. The
    number of model evaluations is adaptive; `stats["nfe"]` receives it.

    Args:
        fn: velocity function `fn(x_t, t (B,), y) -> v`.
        noise: (B, C, H, W) initial latents at t = 1.
        y: (B,) labels.
        cfg_scale, guidance_low, guidance_high, null_label: as in `euler_sampler`.
        atol, rtol: absolute and relative error tolerances of the adaptive solver.
        method: a torchdiffeq adaptive method ("dopri5", "dopri8", "bosh3", "adaptive_heun").
        model_dtype: dtype of the model's inputs (default float32 for float64 noise, else noise.dtype).
        cls_noise, cls_cfg_scale, return_class_token: REG's joint sampling, as in `euler_sampler`.
        stats: optional dict that receives `nfe`, the number of velocity evaluations (CFG batches count once).

    Returns:
        (B, C, H, W) float64 samples at t = 0 (and the (B, D_enc) class tokens with `return_class_token`).

    Raises:
        ImportError: torchdiffeq is not installed (`pip install torchdiffeq`, or the `samplers` extra).
    """
    try:
        from torchdiffeq import odeint  # optional: only this sampler needs it
    except ImportError as e:
        raise ImportError(
            "the dopri5 sampler needs torchdiffeq, which is not installed: run `pip install torchdiffeq` "
            "(or install repa with the `samplers` extra: pip install 'repa[samplers]')"
        ) from e
    xs, scales, dtype = _setup(noise, cls_noise, cfg_scale, cls_cfg_scale, null_label, model_dtype)
    if not (atol > 0 and rtol > 0):
        raise ValueError(f"dopri5 tolerances must be > 0, got atol={atol}, rtol={rtol}")
    nfe = 0

    def rhs(t: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        nonlocal nfe
        nfe += 1
        t_cur = t.to(torch.float64)
        use_cfg = _use_cfg(t_cur, cfg_scale, guidance_low, guidance_high)
        vs = _evaluate(fn, list(state), t_cur, y, use_cfg, null_label, dtype)[0]
        return tuple(_guide(v, use_cfg, scale) for v, scale in zip(vs, scales))

    # step_t = the end: the last step is cut to end exactly at t = 0, so no stage evaluates the model below t = 0
    # (outside its training range; torchdiffeq otherwise overshoots the end and interpolates back)
    options: dict = {"step_t": torch.zeros(1, dtype=torch.float64, device=noise.device)}
    if cfg_scale > 1.0:
        jumps = sorted({float(g) for g in (guidance_low, guidance_high) if 0.0 < g < 1.0})
        if jumps:
            options["jump_t"] = torch.tensor(jumps, dtype=torch.float64, device=noise.device)
    t_span = torch.tensor([1.0, 0.0], dtype=torch.float64, device=noise.device)
    out = odeint(rhs, tuple(xs), t_span, method=method, atol=atol, rtol=rtol, options=options)
    if stats is not None:
        stats["nfe"] = nfe
    return _finish([o[-1] for o in out], return_class_token)
