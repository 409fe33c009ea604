"""Architecture inference: the `DiffusionTransformer` arguments a checkpoint's tensors state (checked for consistency on
the meta device before anything is built), completed by its own config/args and the registry sizes."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from repa.models import MODELS, SIZES
from repa.models.layers import (
    ClassTokenEmbedder,
    FinalLayer,
    PatchEmbed,
    TimestepEmbedder,
    TransformerBlock,
    build_projector,
    build_self_align_head,
)


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
    conv = num_projectors > 0 and "projectors.0.conv.weight" in state  # iREPA's convolution projector
    dims = [_shape(state, f"projectors.{k}.conv.weight", 4)[0] if conv else _shape(state, f"projectors.{k}.4.weight", 2)[0]
            for k in range(num_projectors)]  # fmt: skip
    facts: dict[str, Any] = dict(
        input_size=grid * patch, patch_size=patch, in_channels=c, hidden_size=hidden, depth=depth, mlp_ratio=mlp_ratio,
        num_classes=_shape(state, "y_embedder.embedding_table.weight", 2)[0] - 1, learn_sigma=c_out == 2 * c,
        encoder_dims=dims, qk_norm="blocks.0.attn.q_norm.weight" in state,
    )  # fmt: skip
    if conv:
        facts.update(projector="conv", projector_kernel=_shape(state, "projectors.0.conv.weight", 4)[-1])
    elif num_projectors:
        facts["projector_dim"] = _shape(state, "projectors.0.0.weight", 2)[0]
    if "class_token_embedder.proj.weight" in state:  # REG: one more token, the encoder's global token
        facts["class_token_dim"] = _shape(state, "class_token_embedder.proj.weight", 2)[1]
    if "self_align_head.0.weight" in state:  # SRA's student head
        facts["self_align"] = True
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
                 **{f"projectors.{k}": build_projector(d, kw.get("projector_dim", 2048), e, kw.get("projector", "mlp"),
                                                       kw.get("projector_kernel", 3))
                    for k, e in enumerate(kw["encoder_dims"])},
                 "final_layer": FinalLayer(d, kw["patch_size"], kw["in_channels"] * (1 + kw["learn_sigma"]))}  # fmt: skip
        if kw.get("class_token_dim"):
            parts["class_token_embedder"] = ClassTokenEmbedder(kw["class_token_dim"], d)
            parts["class_token_head"] = nn.Linear(d, kw["class_token_dim"])
        if kw.get("self_align"):
            parts["self_align_head"] = build_self_align_head(d)
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


def _declared(info: Mapping[str, Any] | None, hidden: int) -> tuple[dict[str, Any], str]:
    """What the checkpoint's own record says beyond the tensors, and where: a repa config (the registry entry
    `model.name` with its overrides, as training built it) or official REPA `args` ("SiT-XL/2", `encoder_depth`;
    the name's head count only when its width is the tensors' width: otherwise the name does not describe them)."""
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
        heads = reg.get("num_heads") if reg.get("hidden_size") == hidden else None
        return {"num_heads": heads, "align_depth": args.get("encoder_depth")}, "the checkpoint's args"
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
    declared, where = _declared(info, kw["hidden_size"])
    if declared.get("class_dropout_prob") == 0:  # trained without label dropout: no null-class row
        kw.update(num_classes=kw["num_classes"] + 1, class_dropout_prob=0.0)
    stated = kw.pop("num_heads", None)
    _check_fits(state, {**kw, "num_heads": stated or 1})  # no shape depends on the head count without qk-norm
    hidden, depth = kw["hidden_size"], kw["depth"]
    if num_heads is not None and stated is not None and num_heads != stated:
        raise ValueError(f"num_heads={num_heads} (--num-heads / model.num_heads) contradicts the checkpoint: its "
                         f"qk-norm weights have head dimension {hidden // stated}, i.e. {stated} heads at width "
                         f"{hidden}")  # fmt: skip
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
