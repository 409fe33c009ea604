"""Official checkpoints in REPA's conventions: REPA `last.pt`, the public SiT-XL/2 and DiT-XL/2 state dicts.

All three use the DiT/SiT parameter names that `repa.models.DiffusionTransformer` keeps, so the weights load
strictly; what differs is the meaning of the model's inputs and outputs:

- "repa": official REPA / this project. Flow models: t = 0 data, t = 1 noise, v = d x_t / dt (C outputs).
  DiT-style models trained by repa with `transport.diffusion=ddpm` share DiT's convention below.
- "sit": the public SiT checkpoints (github.com/willisma/SiT). t_sit = 1 - t and v_sit = -v
  (`repa.transport.conventions`); learn_sigma=True gives 2C outputs of which SiT uses the first C only
  (the other C were never trained: their final-layer rows stay at their zero init).
- "dit": the public DiT checkpoints. eps-prediction + learned Sigma (2C outputs), integer DDPM timesteps fed
  as floats 0 .. 999, which is exactly `repa.transport.ddpm`'s convention: no conversion is needed.

A SiT checkpoint is converted either by a wrapper that maps time and sign at every call (`SiTWrapper`, exact),
or once in weight space (`sit_to_repa_state_dict`): the sign is folded into the final layer, and since the
timestep features are [cos(t f_k), sin(t f_k)], those of 1 - t are a fixed linear map (a reflection per
frequency) of those of t, which folds into `t_embedder.mlp.0`. The result is an ordinary REPA-convention SiT
(C outputs) that every sampler, analysis and the training loop take as it is, e.g. for fine-tuning with REPA.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from repa.models import MODELS, SIZES
from repa.models.layers import FinalLayer, PatchEmbed, TimestepEmbedder, TransformerBlock, build_projector
from repa.transport.conventions import repa_time_to_sit, sit_velocity_to_repa
from repa.transport.ddpm import create_diffusion

__all__ = [
    "DDPMAnalysisView",
    "Format",
    "SiTWrapper",
    "detect_format",
    "infer_model_kwargs",
    "linear_to_ddpm",
    "repa_to_sit_state_dict",
    "sit_to_repa_state_dict",
    "timestep_reflection",
]

Format = Literal["repa", "sit", "dit"]
FORMATS: tuple[str, ...] = ("repa", "sit", "dit")


def _shape(state: Mapping[str, Any], key: str, ndim: int) -> tuple[int, ...]:
    """The shape of `state[key]`, which must be an `ndim`-d tensor (a ValueError naming the key otherwise)."""
    if key not in state:
        raise ValueError(f"not a SiT/DiT/REPA state dict with official key names: missing {key!r}")
    if not isinstance(state[key], Tensor) or state[key].ndim != ndim or 0 in state[key].shape:
        raise ValueError(f"{key} must be a non-empty {ndim}-d tensor, got {tuple(getattr(state[key], 'shape', ()))}")
    return tuple(state[key].shape)


def _channels(state: Mapping[str, Tensor]) -> tuple[int, int, int]:
    """(in_channels, out_channels, patch_size) of a state dict with official key names."""
    _, c, patch, patch_w = _shape(state, "x_embedder.proj.weight", 4)  # (D, C, p, p)
    c_out, rest = divmod(_shape(state, "final_layer.linear.weight", 2)[0], patch * patch)  # (p * p * C_out, D)
    if patch != patch_w or rest:
        raise ValueError(f"x_embedder.proj.weight and final_layer.linear.weight disagree on {patch}x{patch} patches")
    return c, c_out, patch


def _sigma_rows_zero(state: Mapping[str, Tensor]) -> bool:
    c, c_out, patch = _channels(state)
    w = state["final_layer.linear.weight"].reshape(patch * patch, c_out, -1)[:, c:]
    b = state["final_layer.linear.bias"].reshape(patch * patch, c_out)[:, c:]
    return not bool(w.any()) and not bool(b.any())


def detect_format(state_dict: Mapping[str, Tensor], hints: Mapping[str, Any] | None = None) -> Format:
    """Which convention a state dict follows: "repa", "sit" or "dit".

    In order: `hints["format"]` if given; "repa" when the weights have REPA projectors, come from a repa
    checkpoint (`hints["source"] == "repa"`) or from an official REPA `last.pt` (REPA's `args`: proj_coeff,
    enc_type, encoder_depth), or predict C channels (a velocity without learned Sigma); for 2C outputs, "sit" or
    "dit" in `args["model"]` (official training checkpoints, "SiT-XL/2") or in the file name (`hints["filename"]`,
    e.g. SiT-XL-2-256x256.pt); finally the weights themselves: SiT never trains its Sigma
    rows of the final layer, so all-zero Sigma rows mean "sit", anything else "dit".

    Args:
        state_dict: model weights with official key names.
        hints: optional `format`, `filename`, `source` (the `format` of `load_model_weights`' info), `args`.

    Returns:
        "repa", "sit" or "dit".
    """
    hints = dict(hints or {})
    if hints.get("format"):
        if hints["format"] not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {hints['format']!r}")
        return hints["format"]
    c, c_out, _ = _channels(state_dict)
    args = dict(hints.get("args") or {})
    repa_args = any(k in args for k in ("proj_coeff", "enc_type", "encoder_depth"))  # official REPA train.py
    if any(k.startswith("projectors.") for k in state_dict) or hints.get("source") == "repa" or repa_args:
        return "repa"
    if c_out == c:
        return "repa"
    if c_out != 2 * c:
        raise ValueError(f"final layer predicts {c_out} channels for {c} input channels: neither C nor 2C")
    for name in (str(args.get("model") or ""), Path(str(hints.get("filename") or "")).name):  # "SiT-XL/2", files
        tagged = [f for f in ("sit", "dit") if re.search(rf"(?<![a-z]){f}(?![a-z])", name.lower())]
        if len(tagged) == 1:
            return tagged[0]  # type: ignore[return-value]
    return "sit" if _sigma_rows_zero(state_dict) else "dit"


def timestep_reflection(dim: int = 256, max_period: float = 10000.0) -> Tensor:
    """R (dim, dim) float64 with timestep_features(1 - t) = R @ timestep_features(t), and R @ R = I.

    With features [cos(t f_k), sin(t f_k)] (the float32 frequencies of `repa.models.layers.timestep_features`):
    cos((1 - t) f) = cos f cos tf + sin f sin tf and sin((1 - t) f) = sin f cos tf - cos f sin tf.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half).double()
    cos, sin, k = torch.cos(freqs), torch.sin(freqs), torch.arange(half)
    r = torch.zeros(dim, dim, dtype=torch.float64)
    r[k, k], r[k, half + k], r[half + k, k], r[half + k, half + k] = cos, sin, sin, -cos
    if dim % 2:
        r[-1, -1] = 1.0  # the zero padding column
    return r


def _reflect_time(state: dict[str, Tensor]) -> None:
    _shape(state, "t_embedder.mlp.0.weight", 2)  # (D, 256): h = W feats(1 - t) = (W R) feats(t)
    w = state["t_embedder.mlp.0.weight"]
    state["t_embedder.mlp.0.weight"] = (w.double() @ timestep_reflection(w.shape[1])).to(w.dtype)


def sit_to_repa_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Official SiT weights -> a REPA-convention SiT (C outputs): model(x, t, y) = -sit(x, 1 - t, y)[:, :C].

    Exact up to float rounding (about 1e-6 relative): the Sigma rows are dropped, the velocity rows negated,
    and time reversal is folded into `t_embedder.mlp.0.weight` (see `timestep_reflection`).

    Args:
        state_dict: SiT weights (2C outputs as published, or C).

    Returns:
        a new state dict for `DiffusionTransformer(learn_sigma=False)`.
    """
    state = dict(state_dict)
    c, c_out, patch = _channels(state)
    w, b = state["final_layer.linear.weight"], state["final_layer.linear.bias"]
    # rows are ordered (p, q, channel), channel fastest (see DiffusionTransformer.unpatchify)
    state["final_layer.linear.weight"] = -w.reshape(patch * patch, c_out, -1)[:, :c].reshape(patch * patch * c, -1)
    state["final_layer.linear.bias"] = -b.reshape(patch * patch, c_out)[:, :c].reshape(-1)
    _reflect_time(state)
    return state


def repa_to_sit_state_dict(state_dict: Mapping[str, Tensor], learn_sigma: bool = True) -> dict[str, Tensor]:
    """The inverse of `sit_to_repa_state_dict` (export, tests): SiT layout with zero Sigma rows if `learn_sigma`."""
    state = dict(state_dict)
    c, c_out, patch = _channels(state)
    if c_out != c:
        raise ValueError("expected a REPA-convention velocity model (C outputs)")
    w = -state["final_layer.linear.weight"].reshape(patch * patch, c, -1)
    b = -state["final_layer.linear.bias"].reshape(patch * patch, c)
    if learn_sigma:
        w, b = torch.cat([w, torch.zeros_like(w)], 1), torch.cat([b, torch.zeros_like(b)], 1)
    state["final_layer.linear.weight"], state["final_layer.linear.bias"] = w.reshape(-1, w.shape[-1]), b.reshape(-1)
    _reflect_time(state)  # R is its own inverse
    return state


class SiTWrapper(nn.Module):
    """An official SiT (a DiffusionTransformer holding its weights) seen in REPA's convention, converting per call.

    `forward(x_t, t, y)` returns (v, zs) with t = 0 data and v = -v_sit(x_t, 1 - t)[:, :C], so `repa.samplers`
    (`model_velocity_fn(wrapper)`), `repa.training.setup.generate` and `repa.analysis` take it like a repa model.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.in_channels, self.num_classes = model.in_channels, model.num_classes
        self.input_size, self.patch_size, self.depth = model.input_size, model.patch_size, model.depth
        self.learn_sigma = False  # the wrapper outputs the C velocity channels only

    def forward(
        self, x_t: Tensor, t: Tensor, y: Tensor, *, force_drop_ids: Tensor | None = None, project: bool = True
    ) -> tuple[Tensor, list[Tensor]]:
        """(v (B, C, H, W), zs) in REPA's convention; arguments as `DiffusionTransformer.forward`."""
        out, zs = self.model(x_t, repa_time_to_sit(torch.as_tensor(t)), y, force_drop_ids=force_drop_ids,
                             project=project)  # fmt: skip
        return sit_velocity_to_repa(out[:, : self.in_channels]), zs

    def velocity(self, x_t: Tensor, t: Tensor, y: Tensor) -> Tensor:
        """The REPA-convention velocity `fn(x_t, t, y)` for `repa.samplers`."""
        return self.forward(x_t, t, y, project=False)[0]

    def forward_hidden(
        self, x_t: Tensor, t: Tensor, y: Tensor, layers: Iterable[int], *, force_drop_ids: Tensor | None = None
    ) -> dict[int, Tensor]:
        """Hidden tokens after `layers` at REPA time t (SiT sees 1 - t)."""
        return self.model.forward_hidden(x_t, repa_time_to_sit(torch.as_tensor(t)), y, layers,
                                         force_drop_ids=force_drop_ids)  # fmt: skip


def linear_to_ddpm(x_t: Tensor, t: Tensor | float, diffusion: Any = None) -> tuple[Tensor, Tensor]:
    """Map a linear-path input x_t = (1 - t) x + t noise to DDPM's variance-preserving one at the same noise ratio.

    x_vp = x_t / sqrt((1 - t)^2 + t^2) = sqrt(abar) x + sqrt(1 - abar) noise with abar = (1 - t)^2 / ((1 - t)^2
    + t^2); the model time is the (fractional) step whose log-SNR matches, interpolated between the 1000 steps
    and clamped to [0, T - 1] (so t near 0 or 1 is clamped to DDPM's range).

    Args:
        x_t: (B, ...) linear-path inputs.
        t: (B,) or scalar REPA time.
        diffusion: a `GaussianDiffusion` (default: DiT's 1000 linear-beta steps).

    Returns:
        (x_vp, t_model (B,) float32).
    """
    diffusion = diffusion or create_diffusion(None)
    t_B = torch.as_tensor(t, dtype=torch.float64, device="cpu").expand(x_t.shape[0]).clamp(1e-6, 1 - 1e-6)
    log_snr = 2 * (torch.log1p(-t_B) - torch.log(t_B))
    ac = diffusion.alphas_cumprod
    steps_log_snr = torch.log(ac) - torch.log1p(-ac)  # decreasing in the step index
    xs, ys = steps_log_snr.flip(0).numpy(), diffusion.timestep_map.double().flip(0).numpy()
    t_model = torch.from_numpy(np.interp(log_snr.numpy(), xs, ys)).float().to(x_t.device)
    scale = torch.sqrt((1 - t_B) ** 2 + t_B**2).to(device=x_t.device, dtype=x_t.dtype)
    return x_t / scale.reshape(-1, *([1] * (x_t.ndim - 1))), t_model


class DDPMAnalysisView(nn.Module):
    """A DDPM model (official DiT, or repa with `transport.diffusion=ddpm`) for `repa.analysis`, which noises inputs
    on the linear path with REPA times: `forward_hidden(x_t, t, y, layers)` maps them with `linear_to_ddpm`.
    Sampling a DiT needs no view: `repa.transport.ddpm` (`ddpm_model_fn(model)`) takes the model itself."""

    def __init__(self, model: nn.Module, diffusion: Any = None) -> None:
        super().__init__()
        self.model, self.diffusion = model, diffusion or create_diffusion(None)
        self.num_classes, self.depth = model.num_classes, model.depth

    def forward_hidden(
        self, x_t: Tensor, t: Tensor, y: Tensor, layers: Iterable[int], *, force_drop_ids: Tensor | None = None
    ) -> dict[int, Tensor]:
        """Hidden tokens after `layers` for a linear-path input x_t at REPA time t (see `linear_to_ddpm`)."""
        x_vp, t_model = linear_to_ddpm(x_t, t, self.diffusion)
        return self.model.forward_hidden(x_vp, t_model, y, layers, force_drop_ids=force_drop_ids)


# ------------------------------------------------------------------------------------------ architecture inference
# Registry sizes: width -> heads, (width, depth) -> align depth. Only qk-norm weights state a head count; a wrong
# one still loads (no shape depends on it) but computes another function, so it is never guessed.
_HEADS_BY_WIDTH = {hidden: heads for hidden, _, heads, _ in SIZES.values()}
_ALIGN_BY_SIZE = {(hidden, depth): align for hidden, depth, _, align in SIZES.values()}


def _count(state: Mapping[str, Any], prefix: str) -> int:
    """How many `prefix.<i>` modules the keys name, checked to be numbered 0..n-1: an index in a key name never
    sizes the model by itself (`blocks.99999999.x` alone would ask for 10^8 blocks)."""
    found = sorted({int(m.group(1)) for k in state if (m := re.match(rf"{prefix}\.(\d+)\.", k))})
    gap = next((i for i, index in enumerate(found) if index != i), None)
    if gap is not None:
        raise ValueError(f"{prefix} are not numbered 0..{len(found) - 1}: {prefix}.{gap} is missing but "
                         f"{prefix}.{found[gap]} is present")  # fmt: skip
    return len(found)


def _tensor_facts(state: Mapping[str, Any]) -> dict[str, Any]:
    """The constructor arguments the tensors state; `num_heads` only for qk-norm models (width / head dimension)."""
    c, c_out, patch = _channels(state)
    if c_out not in (c, 2 * c):
        raise ValueError(f"final layer predicts {c_out} channels for {c} input channels: neither C nor 2C")
    hidden = _shape(state, "x_embedder.proj.weight", 4)[0]
    tokens = _shape(state, "pos_embed", 3)[1]
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise ValueError(f"pos_embed has {tokens} tokens, not a square grid")
    depth = _count(state, "blocks")
    fc1 = _shape(state, "blocks.0.mlp.fc1.weight", 2)[0]  # also: there is a block
    mlp_ratio = fc1 / hidden
    if int(hidden * mlp_ratio) != fc1:  # the block sizes its MLP as int(hidden * mlp_ratio): undo float rounding
        mlp_ratio = math.nextafter(mlp_ratio, math.inf)
    num_projectors = _count(state, "projectors")
    facts: dict[str, Any] = dict(
        input_size=grid * patch, patch_size=patch, in_channels=c, hidden_size=hidden, depth=depth, mlp_ratio=mlp_ratio,
        num_classes=_shape(state, "y_embedder.embedding_table.weight", 2)[0] - 1, learn_sigma=c_out == 2 * c,
        encoder_dims=[_shape(state, f"projectors.{k}.4.weight", 2)[0] for k in range(num_projectors)],
        qk_norm="blocks.0.attn.q_norm.weight" in state,
    )  # fmt: skip
    if num_projectors:
        facts["projector_dim"] = _shape(state, "projectors.0.0.weight", 2)[0]
    if facts["qk_norm"]:  # timm's q_norm: LayerNorm(head_dim)
        head_dim = _shape(state, "blocks.0.attn.q_norm.weight", 1)[0]
        if hidden % head_dim:
            raise ValueError(f"blocks.0.attn.q_norm.weight: head dimension {head_dim} does not divide width {hidden}")
        facts["num_heads"] = hidden // head_dim
    return facts


def _check_fits(state: Mapping[str, Any], kw: Mapping[str, Any]) -> None:
    """Keys and shapes of `state` against `DiffusionTransformer(**kw)`, before anything is built: a state dict that
    contradicts itself (a stray or missing key, a tensor of another size) fails in one line. The model's parts are
    built on the meta device: nothing is allocated, and none draws `normal_` (its meta kernel imports torch._dynamo)."""
    d, grid = kw["hidden_size"], kw["input_size"] // kw["patch_size"]
    rows = kw["num_classes"] + int(kw.get("class_dropout_prob", 0.1) > 0)  # + the null class
    want = {"pos_embed": (1, grid * grid, d), "y_embedder.embedding_table.weight": (rows, d)}
    with torch.device("meta"):
        block = TransformerBlock(d, kw["num_heads"], kw["mlp_ratio"], qk_norm=kw["qk_norm"])  # all blocks alike
        parts = {"x_embedder": PatchEmbed(kw["patch_size"], kw["in_channels"], d), "t_embedder": TimestepEmbedder(d),
                 **{f"blocks.{i}": block for i in range(kw["depth"])},
                 **{f"projectors.{k}": build_projector(d, kw.get("projector_dim", 2048), e)
                    for k, e in enumerate(kw["encoder_dims"])},
                 "final_layer": FinalLayer(d, kw["patch_size"], kw["in_channels"] * (1 + kw["learn_sigma"]))}  # fmt: skip
    for prefix, module in parts.items():
        want.update({f"{prefix}.{k}": tuple(v.shape) for k, v in module.state_dict().items()})
    have = {k: tuple(getattr(v, "shape", ())) for k, v in state.items()}
    missing, unexpected = sorted(want.keys() - have.keys()), sorted(have.keys() - want.keys())
    if missing or unexpected:
        raise ValueError(f"the keys do not fit the architecture the tensors describe: missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]}")  # fmt: skip
    bad = [f"{k} is {have[k]}, not {s}" for k, s in want.items() if have[k] != s]
    if bad:
        raise ValueError(f"tensor shapes contradict the architecture the other tensors describe: {'; '.join(bad[:4])}")


def _declared(info: Mapping[str, Any] | None) -> tuple[dict[str, Any], str]:
    """What the checkpoint's own record says beyond the tensors, and where: a repa config (the registry entry
    `model.name` with its overrides, as training built it) or official REPA `args` ("SiT-XL/2", `encoder_depth`)."""
    info = info or {}
    cfg, args = info.get("config"), info.get("args")
    if isinstance(cfg, Mapping) and isinstance(cfg.get("model"), Mapping):
        m = cfg["model"]
        reg = MODELS.get(str(m.get("name")), {})
        return {"num_heads": m.get("num_heads") or reg.get("num_heads"),
                "align_depth": m.get("align_depth") or reg.get("align_depth"),
                "class_dropout_prob": m.get("class_dropout_prob")}, "the checkpoint's config"  # fmt: skip
    if isinstance(args, Mapping):
        reg = MODELS.get(str(args.get("model")), {})
        return {"num_heads": reg.get("num_heads"), "align_depth": args.get("encoder_depth")}, "the checkpoint's args"
    return {}, ""


def infer_model_kwargs(
    state: Mapping[str, Tensor],
    num_heads: int | None = None,
    *,
    align_depth: int | None = None,
    info: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Constructor arguments of `DiffusionTransformer` for a state dict with official key names.

    Read from the tensors: widths, input size, patch, channels, learned Sigma, classes, depth (blocks numbered
    0..n-1), MLP ratio, qk-norm and its head count (width / head dimension of `q_norm`), projectors; keys and shapes
    must fit that architecture exactly. The rest, in order: the arguments, the checkpoint's config or official args,
    the registry sizes; what is still unknown is a one-line ValueError naming `--num-heads` / `--align-depth`.

    Args:
        state: the state dict.
        num_heads: attention heads (`--num-heads`); must agree with qk-norm weights.
        align_depth: the 1-indexed block feeding the projectors (`--align-depth`); unused without projectors.
        info: `load_model_weights`' info: its `config` (repa checkpoints) or `args` (official REPA `last.pt`).

    Returns:
        the kwargs (`align_depth` only when there are projectors).
    """
    kw = _tensor_facts(state)
    declared, where = _declared(info)
    if declared.get("class_dropout_prob") == 0:  # trained without label dropout: no null-class row
        kw.update(num_classes=kw["num_classes"] + 1, class_dropout_prob=0.0)
    stated = kw.pop("num_heads", None)
    _check_fits(state, {**kw, "num_heads": stated or 1})  # no shape depends on the head count without qk-norm
    hidden, depth = kw["hidden_size"], kw["depth"]
    if num_heads is not None and stated is not None and num_heads != stated:
        raise ValueError(f"num_heads={num_heads} contradicts the checkpoint: its qk-norm weights have head dimension "
                         f"{hidden // stated}, i.e. {stated} heads at width {hidden}")  # fmt: skip
    candidates = (num_heads, stated, declared.get("num_heads"), _HEADS_BY_WIDTH.get(hidden))
    heads = next((int(v) for v in candidates if v is not None), None)
    unknown = []
    if heads is None:
        widths = "/".join(map(str, sorted(_HEADS_BY_WIDTH)))
        unknown.append((f"the number of attention heads (width {hidden} is no registry width {widths}, no qk-norm "
                        "weights state the head dimension, no config/args say it)", f"--num-heads (a divisor of {hidden})"))  # fmt: skip
    elif heads < 1 or hidden % heads:
        raise ValueError(f"{heads} attention heads ({where if num_heads is None else '--num-heads'}) do not divide "
                         f"the width {hidden}")  # fmt: skip
    if kw["encoder_dims"]:
        candidates = (align_depth, declared.get("align_depth"), _ALIGN_BY_SIZE.get((hidden, depth)))
        kw["align_depth"] = next((int(v) for v in candidates if v is not None), None)
        if kw["align_depth"] is None:
            unknown.append((f"which block feeds the projectors (no config/args say it, width {hidden} x {depth} blocks "
                            "is no registry size)", f"--align-depth (1..{depth})"))  # fmt: skip
    if unknown:
        what, flags = zip(*unknown, strict=True)
        raise ValueError(f"cannot tell {' nor '.join(what)}: pass {' and '.join(flags)}")
    return {**kw, "num_heads": heads}
