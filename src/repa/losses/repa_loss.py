"""`RepaLoss`: L = L_velocity + lambda L_REPA (REPA Sec. 3.3) for SiT (flow) or DiT (DDPM), with the REPA family's
terms as options (off = plain REPA, bit for bit)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from repa.losses.family import SelfAlignKind, attention_alignment_per_sample, self_alignment_per_sample, teacher_time
from repa.losses.terms import AlignKind, _fp32, alignment_per_sample, denoising_loss, spatial_norm
from repa.transport import TimeSampling, create_diffusion, get_path, sample_time

# HASTE (arXiv 2505.16792, official train.py/loss.py): SiT blocks 5..8 distil DINOv2-B blocks 9..12 (1-indexed).
HASTE_ATTN_PAIRS: tuple[tuple[int, int], ...] = ((5, 9), (6, 10), (7, 11), (8, 12))


class RepaLoss:
    """L = L_denoise + align_coeff * L_align (REPA Sec. 3.3) for SiT (flow, v-prediction) or DiT (DDPM), with the
    REPA family's terms as options. Each family term is on only when its input is given, so plain REPA is
    unchanged bit for bit:

    - iREPA: `spatial_norm_gamma` (constructor) normalises every target with `spatial_norm` before alignment.
    - HASTE: `align_weight` (call) multiplies align_coeff and attn_coeff (a schedule value, see `align_weight`);
      `attn_targets` (call) adds attn_coeff * L_attn over `attn_pairs` (model block, encoder layer).
    - REG: `class_tokens` (call) noises the encoder's global token on the image's path and time (its own noise),
      feeds it to the model (`cls_t`) and adds class_token_coeff * MSE(class-token prediction, its target); with
      `class_token_align` the projected class token also joins encoder 0's alignment as one more token ("cos").
    - SRA: `teacher` (call, the EMA model) adds self_align_coeff * L_self: the student's `self_align_head` on block
      `self_align_blocks[0]` at t against the teacher's block `self_align_blocks[1]` at `teacher_time`, no grad.

    Args:
        path: "linear" or "cosine" interpolant (flow only; DDPM uses its discrete schedule).
        prediction: "v" (velocity; SiT/REPA).
        time_sampling: "uniform" or "lognormal" (see `repa.transport.sample_time`; flow only).
        align_coeff: lambda (0.5 in the paper).
        align_kind: "cos" or "ntxent".
        resample: resample encoder token grids (and attention maps) to the model grid when they differ.
        temperature: NT-Xent temperature.
        time_mean, time_std: log-normal parameters.
        diffusion: "flow" (interpolant, default) or "ddpm" (DiT: integer timesteps, eps target + L_vlb with
            learned Sigma; the model must output 2C channels).
        num_timesteps: DDPM steps.
        learn_sigma: with "ddpm", whether the model learns Sigma (DiT: 2C outputs, eps MSE + L_vlb) or not (SiT
            backbones: C outputs, eps MSE alone, sampled with the fixed posterior variance).
        spatial_norm_gamma: iREPA's coefficient on the spatial mean (0.6 official); None = off.
        attn_coeff: HASTE's attention-alignment weight (0.5 official).
        attn_pairs: (model block, encoder layer) pairs, 1-indexed (HASTE: (5, 9) .. (8, 12)).
        class_token_coeff: REG's class-token denoising weight (0.03 official).
        class_token_align: REG also aligns the projected class token with the global token (official: yes).
        self_align_coeff: SRA's weight (0.5 official with the cosine loss).
        self_align_blocks: (student block, teacher block), 1-indexed (SiT-XL/2: (8, 20); DiT-XL/2: (8, 16)).
        self_align_gap: SRA's largest time gap t_max (0.2).
        self_align_kind: "cos" or "smooth_l1" (see `self_alignment_per_sample`).
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
        spatial_norm_gamma: float | None = None,
        attn_coeff: float = 0.5,
        attn_pairs: Sequence[tuple[int, int]] = HASTE_ATTN_PAIRS,
        class_token_coeff: float = 0.03,
        class_token_align: bool = True,
        self_align_coeff: float = 0.5,
        self_align_blocks: tuple[int, int] = (8, 20),
        self_align_gap: float = 0.2,
        self_align_kind: SelfAlignKind = "cos",
        learn_sigma: bool = True,
    ) -> None:
        if prediction != "v":
            raise ValueError(
                f"prediction {prediction!r} is not supported; use 'v' (DDPM uses eps via diffusion='ddpm')"
            )
        choices = {"time sampling": (time_sampling, TimeSampling), "alignment kind": (align_kind, AlignKind),
                   "diffusion": (diffusion, Literal["flow", "ddpm"]),
                   "self-alignment kind": (self_align_kind, SelfAlignKind)}  # fmt: skip
        for what, (value, kind) in choices.items():
            if value not in get_args(kind):
                raise ValueError(f"unknown {what} {value!r}; choose {' or '.join(map(repr, get_args(kind)))}")
        if not 0.0 <= self_align_gap <= 1.0:
            raise ValueError(f"self_align_gap must be in [0, 1], got {self_align_gap}")
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
            create_diffusion(None, num_timesteps=num_timesteps, learn_sigma=learn_sigma)
            if diffusion == "ddpm"
            else None
        )
        self.spatial_norm_gamma = spatial_norm_gamma
        self.attn_coeff, self.attn_pairs = attn_coeff, tuple((int(m), int(e)) for m, e in attn_pairs)
        self.class_token_coeff, self.class_token_align = class_token_coeff, class_token_align
        self.self_align_coeff, self.self_align_blocks = self_align_coeff, tuple(self_align_blocks)
        self.self_align_gap, self.self_align_kind = self_align_gap, self_align_kind

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
        align_weight: float = 1.0,
        attn_targets: Mapping[int, Tensor] | None = None,
        class_tokens: Tensor | None = None,
        noise_cls: Tensor | None = None,
        teacher: nn.Module | None = None,
        teacher_u: Tensor | None = None,
        class_tokens_in_targets: bool = False,
    ) -> dict[str, Tensor]:
        """Compute the loss terms for one batch.

        Random draws when not given, in this order (the official SILoss order, so `torch.manual_seed(s)`
        replays it): `t` (one `torch.rand(B)` on the CPU, or `torch.randint(0, T, (B,))` for DDPM), then
        `noise = torch.randn_like(x)`. With `generator`, both come from it (noise on the generator's device).
        The model's own label dropout (train mode) draws after these, inside the model call. The family options
        add draws only when on, at their official places: SRA's `teacher_u` (torch.rand(B) on the CPU) right
        after t, REG's `noise_cls` (randn_like(class_tokens)) right after noise.

        Args:
            model: `model(x_t, t, y, **model_kwargs) -> (out, zs)` (or just `out`; `(out, zs, extras)` with the
                family options, see `DiffusionTransformer.forward`).
            x: (B, C, H, W) clean inputs.
            y: (B,) labels.
            targets: per encoder (B, M, D_k) tokens, or None (vanilla: align = 0, projectors skipped).
            t: (B,) times in [0, 1]. DDPM: long timesteps 0..T-1, or floats in [0, 1) mapped to floor(t T).
            noise: (B, C, H, W) standard normal noise.
            generator: RNG for the draws.
            model_kwargs: extra model arguments, e.g. {"force_drop_ids": drop_mask.long()} (SRA's teacher gets the
                same `force_drop_ids`, so it sees the student's effective labels).
            per_sample: also return (B,) tensors `<term>/per_sample` for denoise, align and the family terms.
            align_weight: schedule multiplier of align_coeff and attn_coeff (HASTE; 1 = plain). At 0 the alignment
                terms are not computed (no targets or attention maps needed; they log 0) and the projectors get a
                zero gradient, bit for bit what the computed terms times 0 give.
            attn_targets: HASTE: {encoder layer: (B, H, M, M) patch attention probabilities}.
            class_tokens: REG: (B, D_enc) clean global tokens of encoder 0.
            noise_cls: REG: (B, D_enc) the class token's noise.
            teacher: SRA: the EMA model (`forward_hidden`), run without gradient.
            teacher_u: SRA: (B,) uniform draws of the time gap.
            class_tokens_in_targets: REG with cached or stored targets: encoder 0's targets are (B, 1 + M, D) with
                the global token first (REG's own target layout, cat([cls, patches])); it is split off as
                `class_tokens`, the rest are the patch targets.

        Returns:
            dict of scalars: denoise, align, align/<k> per encoder, [align_attn], [class_token], [self_align],
            total (+ mse, vb for DDPM).
        """
        if class_tokens_in_targets:
            if not targets or class_tokens is not None:
                raise ValueError("class_tokens_in_targets needs targets (encoder 0's first token) and no class_tokens")
            class_tokens, targets = targets[0][:, 0], [targets[0][:, 1:], *targets[1:]]
        if t is None:
            t = self.draw_time(x, generator)
        if teacher is not None and teacher_u is None:
            teacher_u = torch.rand(x.shape[0], generator=generator, device=_rng_device(generator))
        if noise is None:
            noise = _normal_like(x, generator)
        if class_tokens is not None and noise_cls is None:
            noise_cls = _normal_like(class_tokens, generator)
        idle = align_weight == 0.0  # a schedule's zero (HASTE after its stop): the scheduled terms are not computed
        kwargs = dict(model_kwargs or {})
        if targets is None and not idle:
            kwargs.setdefault("project", False)
        if attn_targets is not None and not idle:
            kwargs["attn_blocks"] = tuple(m for m, _ in self.attn_pairs)
        if teacher is not None:
            kwargs["self_align_block"] = self.self_align_blocks[0]
        terms: dict[str, Tensor] = {}
        t, denoise, zs, extras, cls_target = self._denoise(
            model, x, y, t, noise, kwargs, class_tokens, noise_cls, terms
        )

        class_zs = extras.get("class_token_zs") if class_tokens is not None and self.class_token_align else None
        align_ps = _idle_align(zs, class_zs, x) if idle else self._align(zs, targets, x, class_tokens, class_zs)
        family: dict[str, Tensor] = {}
        if attn_targets is not None:
            family["align_attn"] = x.new_zeros(x.shape[0], dtype=torch.float32) if idle else self._attention(
                extras, attn_targets)  # fmt: skip
        if class_tokens is not None:
            family["class_token"] = denoising_loss(extras["class_token"], cls_target)
        if teacher is not None:
            family["self_align"] = self._self_align(teacher, extras, x, y, noise, t, teacher_u, kwargs, class_tokens,
                                                    noise_cls)  # fmt: skip
        terms["denoise"] = denoise.mean()
        terms["align"] = align_ps["all"].mean()
        for k, v in align_ps.items():
            if k != "all":
                terms[f"align/{k}"] = v.mean()
        lam = self.align_coeff if align_weight == 1.0 else self.align_coeff * align_weight
        terms["total"] = terms["denoise"] + lam * terms["align"]
        coeffs = {"align_attn": self.attn_coeff * align_weight, "class_token": self.class_token_coeff,
                  "self_align": self.self_align_coeff}  # fmt: skip
        for name, value in family.items():
            terms[name] = value.mean()
            terms["total"] = terms["total"] + coeffs[name] * terms[name]
        if per_sample:
            terms["denoise/per_sample"], terms["align/per_sample"] = denoise, align_ps["all"]
            terms.update({f"{name}/per_sample": value for name, value in family.items()})
        return terms

    def _denoise(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        t: Tensor,
        noise: Tensor,
        kwargs: dict[str, Any],
        class_tokens: Tensor | None,
        noise_cls: Tensor | None,
        terms: dict[str, Tensor],
    ) -> tuple[Tensor, Tensor, list[Tensor], dict[str, Any], Tensor | None]:
        """Noise the batch, run the model, per-sample denoising loss (DDPM adds mse/vb to `terms`).

        Returns:
            (t, denoise (B,), zs, extras, class-token target): t as used (DDPM: the integer steps).
        """
        cls_target = None
        if self.ddpm is None:
            t = t.to(x.device)
            x_t = self.path.interpolate(x, noise, t)  # x_t = alpha_t x + sigma_t noise (REPA Sec. 2)
            target = self.path.velocity_target(x, noise, t)
            if class_tokens is not None:  # REG: the class token on the same path and time, its own noise
                kwargs["cls_t"] = self.path.interpolate(class_tokens, noise_cls, t.flatten())
                cls_target = self.path.velocity_target(class_tokens, noise_cls, t.flatten())
            out, zs, extras = _split(model(x_t, t.flatten(), y, **kwargs))
            return t, denoising_loss(out, target), zs, extras, cls_target  # L_velocity (REPA Sec. 2), per sample
        timestep = t.to(x.device)
        timestep = timestep.long() if not timestep.is_floating_point() else self.ddpm.timesteps_from_uniform(timestep)
        x_t = self.ddpm.q_sample(x, timestep, noise).to(x.dtype)
        if class_tokens is not None:  # REG under DDPM (our choice): q_sample the class token, eps target
            kwargs["cls_t"] = self.ddpm.q_sample(class_tokens, timestep, noise_cls).to(class_tokens.dtype)
            cls_target = noise_cls
        out, zs, extras = _split(model(x_t, self.ddpm.model_time(timestep), y, **kwargs))
        ddpm_terms = self.ddpm.training_losses(out, x, x_t, timestep, noise)  # iDDPM Eq. 16 (DiT)
        terms["mse"], terms["vb"] = ddpm_terms["mse"].mean(), ddpm_terms["vb"].mean()
        return timestep, ddpm_terms["loss"], zs, extras, cls_target

    def _align(
        self,
        zs: Sequence[Tensor],
        targets: Sequence[Tensor] | None,
        x: Tensor,
        class_tokens: Tensor | None = None,
        class_zs: Sequence[Tensor] | None = None,
    ) -> dict[Any, Tensor]:
        """Per-sample alignment terms per encoder k and their mean over encoders ("all")."""
        if targets is None or len(targets) == 0:
            return {"all": torch.zeros(x.shape[0], device=x.device, dtype=torch.float32)}
        if len(zs) != len(targets):
            raise ValueError(f"the model returned {len(zs)} projector outputs for {len(targets)} encoder targets")
        if self.spatial_norm_gamma is not None:  # iREPA: normalise each target over its own grid, then resample
            targets = [spatial_norm(tgt, self.spatial_norm_gamma) for tgt in targets]
        per = {
            k: alignment_per_sample(z, tgt, self.align_kind, self.temperature, resample=self.resample)
            for k, (z, tgt) in enumerate(zip(zs, targets))
        }
        if class_zs and class_tokens is not None and self.align_kind == "cos":
            # REG's projection loss averages -cos over the N patch tokens and the class token alike.
            n = zs[0].shape[1]
            cos = -(F.normalize(_fp32(class_zs[0]), dim=-1) * F.normalize(_fp32(class_tokens), dim=-1)).sum(dim=-1)
            per[0] = (n * per[0] + cos) / (n + 1)
        per["all"] = torch.stack(list(per.values())).mean(dim=0)
        return per

    def _attention(self, extras: Mapping[str, Any], attn_targets: Mapping[int, Tensor]) -> Tensor:
        """HASTE: mean over the (model block, encoder layer) pairs of the per-sample attention alignment."""
        maps = extras.get("attn", {})
        missing = [e for _, e in self.attn_pairs if e not in attn_targets] + [
            m for m, _ in self.attn_pairs if m not in maps
        ]
        if missing:
            raise ValueError(f"attention alignment pairs {self.attn_pairs}: no maps for {missing} "
                             "(encoder layers come from attn_targets, model blocks from the model's extras['attn'])")  # fmt: skip
        terms = [attention_alignment_per_sample(maps[m], attn_targets[e], resample=self.resample)
                 for m, e in self.attn_pairs]  # fmt: skip
        return torch.stack(terms).mean(dim=0)

    def _self_align(self, teacher: nn.Module, extras: Mapping[str, Any], x: Tensor, y: Tensor, noise: Tensor,
                    t: Tensor, teacher_u: Tensor, kwargs: Mapping[str, Any], class_tokens: Tensor | None,
                    noise_cls: Tensor | None) -> Tensor:  # fmt: skip
        """SRA: the teacher (EMA) sees the same x and noise at the smaller time `teacher_time`, without gradient."""
        block = self.self_align_blocks[1]
        with torch.no_grad():
            if self.ddpm is None:
                t_tea = teacher_time(t.flatten(), teacher_u, self.self_align_gap)
                x_tea, model_t = self.path.interpolate(x, noise, t_tea), t_tea
                cls_tea = None if class_tokens is None else self.path.interpolate(class_tokens, noise_cls, t_tea)
            else:
                t_tea = teacher_time(t, teacher_u, self.self_align_gap, self.ddpm.num_timesteps)
                x_tea, model_t = self.ddpm.q_sample(x, t_tea, noise).to(x.dtype), self.ddpm.model_time(t_tea)
                cls_tea = None if class_tokens is None else self.ddpm.q_sample(class_tokens, t_tea, noise_cls)
            extra = {} if cls_tea is None else {"cls_t": cls_tea.to(class_tokens.dtype)}
            hidden = teacher.forward_hidden(x_tea, model_t, y, [block], force_drop_ids=kwargs.get("force_drop_ids"),
                                            **extra)[block]  # fmt: skip
        return self_alignment_per_sample(extras["self_align"], hidden, self.self_align_kind)


def _idle_align(zs: Sequence[Tensor], class_zs: Sequence[Tensor] | None, x: Tensor) -> dict[Any, Tensor]:
    """The alignment terms at weight 0, not computed: zeros per encoder that still depend on the projector outputs
    (a zero gradient, as the computed terms times 0 give, so DDP finds every parameter used and the optimizer state
    evolves as it would); no encoder targets are needed."""
    per: dict[Any, Tensor] = {k: _fp32(z).mean(dim=(1, 2)) * 0.0 for k, z in enumerate(zs)}
    if class_zs and per:
        per[0] = per[0] + _fp32(class_zs[0]).mean(dim=-1) * 0.0
    per["all"] = torch.stack(list(per.values())).mean(dim=0) if per else x.new_zeros(x.shape[0], dtype=torch.float32)
    return per


def _rng_device(generator: torch.Generator | None) -> torch.device | str:
    return "cpu" if generator is None else generator.device


def _normal_like(like: Tensor, generator: torch.Generator | None) -> Tensor:
    """randn_like(like) on the global RNG, or a draw from `generator` on its device moved to like's device."""
    if generator is None:
        return torch.randn_like(like)
    return torch.randn(like.shape, generator=generator, device=generator.device, dtype=like.dtype).to(like.device)


def _split(output: Any) -> tuple[Tensor, list[Tensor], dict[str, Any]]:
    if isinstance(output, (tuple, list)):
        return output[0], list(output[1]), (dict(output[2]) if len(output) > 2 else {})
    return output, [], {}
