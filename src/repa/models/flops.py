"""Parameter counts and analytic forward-pass compute of a `DiffusionTransformer` (no tensors are run)."""

from __future__ import annotations

from torch import nn

__all__ = ["count_params", "forward_flops", "forward_macs"]


def count_params(model: nn.Module, include_projectors: bool = False) -> int:
    """Number of parameters (works on `meta`-device models).

    Counts `model.parameters()`: every weight and bias, the null-class row of the label table included;
    not the fixed sin-cos `pos_embed` (a buffer, not a parameter). The official code stores `pos_embed` as a
    frozen Parameter, so its `sum(p.numel())` is larger by N * D (0.29M for XL/2 at 256 px, ~0.04%).

    Args:
        model: the model.
        include_projectors: add the training-only heads: the REPA projectors and SRA's `self_align_head` (both
            are dropped after training; REG's class-token embedder and head are part of the generator).

    Returns:
        the parameter count.
    """
    total = sum(p.numel() for p in model.parameters())
    if not include_projectors:
        for name in ("projectors", "self_align_head"):
            if hasattr(model, name):
                total -= sum(p.numel() for p in getattr(model, name).parameters())
    return total


def forward_macs(model: nn.Module, batch: int = 1, include_projectors: bool = False) -> int:
    """Multiply-accumulates of one forward pass, counted analytically from the model's shape.

    Counted: every linear map (patch-embedding convolution, timestep MLP, adaLN modulations, qkv, attention
    output, MLP, final layer, and the projectors if asked) and the two attention matmuls (Q K^T and A V).
    Not counted: softmax, LayerNorms, QK-norm, activations, modulation and residual element-wise ops, the
    sinusoid, the embedding lookup, unpatchify. This is the convention of the DiT paper's "Gflops" (fvcore
    counts one fused multiply-add as one flop): DiT-XL/2 on 32x32x4 latents gives 118.6e9 here.

    Args:
        model: a `DiffusionTransformer` (only its configuration is read).
        batch: number of images.
        include_projectors: add the REPA projectors (used in training only, at `align_depth`; an MLP per token or
            iREPA's k x k convolution) and SRA's head.

    Returns:
        multiply-accumulates for `batch` images.

    A REG class token (`class_token_dim` > 0) adds one token to every block, its input embedding and its output
    head (and, with projectors, one projected token).
    """
    c = model.config
    D, p, C = c["hidden_size"], c["patch_size"], c["in_channels"]
    c_out = 2 * C if c["learn_sigma"] else C
    N = (c["input_size"] // p) ** 2
    E = c.get("class_token_dim", 0)
    T = N + int(E > 0)  # tokens inside the blocks
    mlp_hidden = int(D * c["mlp_ratio"])
    freq = model.t_embedder.frequency_embedding_size
    conditioning = freq * D + D * D + c["depth"] * D * 6 * D + D * 2 * D  # per image, not per token
    per_block = T * (3 * D * D + D * D + 2 * D * mlp_hidden) + 2 * T * T * D  # linears + QK^T + AV
    macs = N * C * p * p * D + conditioning + c["depth"] * per_block + N * D * p * p * c_out + 2 * E * D
    if include_projectors:
        P, k = c["projector_dim"], c.get("projector_kernel", 3)
        if c.get("projector", "mlp") == "conv":  # zero padding is counted as multiplied, as the flop counter does
            macs += sum(T * D * d * k * k for d in c["encoder_dims"])
        else:
            macs += sum(T * (D * P + P * P + P * d) for d in c["encoder_dims"])
        macs += N * 4 * D * D if c.get("self_align") else 0
    return batch * macs


def forward_flops(model: nn.Module, batch: int = 1, include_projectors: bool = False) -> int:
    """Floating-point operations of one forward pass: 2 per multiply-accumulate of `forward_macs`.

    Note the DiT/SiT papers' "Gflops" are multiply-accumulates (`forward_macs`): DiT-XL/2 = 118.6 G MACs =
    237.2 G FLOPs in this function's convention. The same terms as `forward_macs` are counted.

    Args:
        model: a `DiffusionTransformer`.
        batch: number of images.
        include_projectors: add the REPA projectors.

    Returns:
        FLOPs for `batch` images.
    """
    return 2 * forward_macs(model, batch, include_projectors)
