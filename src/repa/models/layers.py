"""Building blocks of the SiT/DiT backbone: embeddings, attention, adaLN-Zero blocks, final layer, projector.

Parameter names follow the DiT/SiT/REPA lineage (timm's `Attention`/`Mlp` naming inside the blocks) so the
official state dicts load with `strict=True`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "Attention",
    "ClassTokenEmbedder",
    "ConvProjector",
    "FinalLayer",
    "LabelEmbedder",
    "Mlp",
    "PatchEmbed",
    "TimestepEmbedder",
    "TransformerBlock",
    "build_projector",
    "build_self_align_head",
    "modulate",
    "sincos_pos_embed_2d",
    "timestep_features",
]


def modulate(x_BND: Tensor, shift_BD: Tensor, scale_BD: Tensor) -> Tensor:
    """adaLN modulation x * (1 + scale) + shift, broadcast over tokens (DiT, Sec. 3.2)."""
    return x_BND * (1 + scale_BD.unsqueeze(1)) + shift_BD.unsqueeze(1)


def sincos_pos_embed_2d(embed_dim: int, grid_size: int) -> Tensor:
    """Fixed 2-D sine-cosine position embedding of a square token grid (MAE/DiT `get_2d_sincos_pos_embed`).

    Token n = i * grid_size + j (row i, column j, row-major). The first half of the channels encodes the
    column j, the second half the row i (the reference builds its grid with `meshgrid(w, h)`, so its "h"
    half actually holds the column); each half is [sin(pos * omega), cos(pos * omega)] with
    omega_k = 1 / 10000^(k / (embed_dim / 4)), k = 0 .. embed_dim/4 - 1. Computed in float64 on the CPU,
    as the reference does in numpy, then the caller casts.

    Args:
        embed_dim: channels D, a multiple of 4.
        grid_size: tokens per side.

    Returns:
        (grid_size * grid_size, embed_dim) float64 tensor.
    """
    if embed_dim % 4 != 0:
        raise ValueError(f"the 2-D sin-cos position embedding needs hidden_size divisible by 4, got {embed_dim}")
    quarter = embed_dim // 4
    omega_K = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64, device="cpu") / quarter)
    coords = torch.arange(grid_size, dtype=torch.float64, device="cpu")
    rows_N = coords.repeat_interleave(grid_size)  # i for token n = i * grid + j
    cols_N = coords.repeat(grid_size)  # j

    def one_axis(pos_N: Tensor) -> Tensor:
        angles_NK = pos_N[:, None] * omega_K[None]
        return torch.cat([angles_NK.sin(), angles_NK.cos()], dim=1)

    return torch.cat([one_axis(cols_N), one_axis(rows_N)], dim=1)


def timestep_features(t_B: Tensor, dim: int = 256, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal features of raw (unscaled) t: [cos(t f_k), sin(t f_k)], f_k = exp(-ln(max_period) k / half).

    Computed in float32 whatever t's dtype (as the reference), cos half first (GLIDE/DiT order).

    Args:
        t_B: (B,) times; any real values (SiT: t in [0, 1]; DiT/DDPM: step index 0 .. 999).
        dim: feature size (256 in every official model).
        max_period: lowest frequency's period.

    Returns:
        (B, dim) float32 features.
    """
    half = dim // 2
    freqs_K = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t_B.device) / half)
    args_BK = t_B.float()[:, None] * freqs_K[None]
    feats = torch.cat([torch.cos(args_BK), torch.sin(args_BK)], dim=-1)
    if dim % 2:  # odd sizes get one zero column, so the output is always `dim` wide
        feats = torch.cat([feats, torch.zeros_like(feats[:, :1])], dim=-1)
    return feats


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> tokens with one strided convolution (key `x_embedder.proj`)."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x_BCHW: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, N, D) tokens, row-major over the (H/p, W/p) grid."""
        return self.proj(x_BCHW).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of t followed by Linear-SiLU-Linear (keys `t_embedder.mlp.{0,2}`)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256) -> None:
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    def forward(self, t_B: Tensor) -> Tensor:
        """(B,) times -> (B, D) embedding."""
        feats = timestep_features(t_B, self.frequency_embedding_size)
        # Cast to the weights' dtype (the reference casts to t's dtype, which breaks for float64 t).
        return self.mlp(feats.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class embedding table with label dropout for classifier-free guidance (key `y_embedder.embedding_table`).

    With `dropout_prob > 0` the table has `num_classes + 1` rows; row `num_classes` is the null
    (unconditional) class. Dropping draws `torch.rand(B, device=y.device) < dropout_prob`, one draw from
    the global RNG of y's device per call, exactly as the reference (so seeded runs replay it).
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)

    def token_drop(self, y_B: Tensor, force_drop_ids: Tensor | None = None) -> Tensor:
        """Labels with dropped entries replaced by the null class.

        Args:
            y_B: (B,) integer labels.
            force_drop_ids: (B,) entries equal to 1 (or True) are dropped; None draws the mask at random.
        """
        if force_drop_ids is None:
            drop_B = torch.rand(y_B.shape[0], device=y_B.device) < self.dropout_prob
        else:
            drop_B = force_drop_ids.to(y_B.device) == 1
        return torch.where(drop_B, torch.full_like(y_B, self.num_classes), y_B)

    def forward(self, y_B: Tensor, train: bool, force_drop_ids: Tensor | None = None) -> Tensor:
        """(B,) labels -> (B, D); drops labels at random in training, or as forced (any mode)."""
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            if self.embedding_table.num_embeddings == self.num_classes:
                raise ValueError("label dropout needs a null class: build the model with class_dropout_prob > 0")
            y_B = self.token_drop(y_B, force_drop_ids)
        return self.embedding_table(y_B)


class Attention(nn.Module):
    """Multi-head self-attention via `F.scaled_dot_product_attention`, timm key names (`qkv`, `proj`).

    `qk_norm=True` adds a per-head LayerNorm (affine, eps 1e-5) on queries and keys as timm's
    `q_norm`/`k_norm`; it is not a parameter-free RMS norm, so official QK-norm weights load.
    """

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"hidden_size={dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x_BND: Tensor, return_attn: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """(B, N, D) -> (B, N, D); with `return_attn` also the attention logits (B, H, N, N).

        The default path is the fused SDPA kernel. `return_attn=True` (HASTE's attention alignment, only at the
        blocks it reads) computes the same attention explicitly: logits = Q K^T / sqrt(d), out = softmax(logits) V,
        so the returned map is the one the block used and gradients flow through it.
        """
        B, N, D = x_BND.shape
        qkv = self.qkv(x_BND).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q_BHNd, k_BHNd, v_BHNd = qkv.unbind(0)
        q_BHNd, k_BHNd = self.q_norm(q_BHNd), self.k_norm(k_BHNd)
        if not return_attn:
            out_BHNd = F.scaled_dot_product_attention(q_BHNd, k_BHNd, v_BHNd)  # scale 1/sqrt(head_dim)
            return self.proj(out_BHNd.transpose(1, 2).reshape(B, N, D))
        logits_BHNN = (q_BHNd * self.head_dim**-0.5) @ k_BHNd.transpose(-2, -1)
        out_BHNd = logits_BHNN.softmax(dim=-1) @ v_BHNd
        return self.proj(out_BHNd.transpose(1, 2).reshape(B, N, D)), logits_BHNN


class Mlp(nn.Module):
    """Token MLP Linear-GELU(tanh)-Linear (keys `mlp.fc1`, `mlp.fc2`)."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TransformerBlock(nn.Module):
    """DiT/SiT block with adaLN-Zero conditioning (DiT, Sec. 3.2): gated residual attention and MLP.

    `adaLN_modulation` = SiLU then Linear(D, 6D), split as (shift, scale, gate) for attention then MLP.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: bool = False) -> None:
        super().__init__()
        # No affine: scale and shift come from the conditioning instead.
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, qk_norm=qk_norm)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x_BND: Tensor, c_BD: Tensor, return_attn: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Tokens (B, N, D) and conditioning (B, D) -> tokens (B, N, D) (and the attention logits (B, H, N, N)
        with `return_attn`, see `Attention.forward`)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c_BD).chunk(6, dim=-1)
        h_BND = modulate(self.norm1(x_BND), shift_msa, scale_msa)
        if return_attn:
            attn_BND, logits_BHNN = self.attn(h_BND, return_attn=True)
        else:
            attn_BND = self.attn(h_BND)
        x_BND = x_BND + gate_msa.unsqueeze(1) * attn_BND
        x_BND = x_BND + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x_BND), shift_mlp, scale_mlp))
        return (x_BND, logits_BHNN) if return_attn else x_BND


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm then a linear map of each token to a p x p x C_out patch.

    The reference REPA code sizes this layer with a separate `decoder_hidden_size` (and crashes for SiT-S,
    where it defaults to 768); here it is always the model width.
    """

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x_BND: Tensor, c_BD: Tensor) -> Tensor:
        """(B, N, D), (B, D) -> (B, N, p * p * C_out)."""
        return self.linear(self.modulated(x_BND, c_BD))

    def modulated(self, x_BND: Tensor, c_BD: Tensor) -> Tensor:
        """The adaLN-modulated final norm (B, N, D) before the linear map (REG's class-token head reads it too)."""
        shift, scale = self.adaLN_modulation(c_BD).chunk(2, dim=-1)
        return modulate(self.norm_final(x_BND), shift, scale)


class ConvProjector(nn.Module):
    """iREPA's projector (Singh et al. 2025, arXiv 2512.10794, Sec. 4): one 2-D convolution over the token grid.

    Conv2d(D, D_enc, kernel k, stride 1, padding k // 2) maps the (h, w) grid of hidden tokens to target tokens,
    so each prediction sees its k x k neighbourhood (the MLP sees one token). No hidden layer and no activation,
    as the official `ProjectionLayer(conv)`. PyTorch's default Conv2d init (the official init only re-initialises
    `nn.Linear`). Keys `conv.weight`, `conv.bias` (distinct from the MLP's `0/2/4`).
    """

    def __init__(self, hidden_size: int, encoder_dim: int, kernel_size: int = 3) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(
                f"projector_kernel must be a positive odd number (the grid keeps its size), got {kernel_size}"
            )
        self.kernel_size = kernel_size
        self.conv = nn.Conv2d(hidden_size, encoder_dim, kernel_size, stride=1, padding=kernel_size // 2)

    def forward(self, tokens_BND: Tensor, grid_hw: tuple[int, int] | None = None) -> Tensor:
        """(B, N, D) row-major tokens of a (h, w) grid (square when None) -> (B, N, D_enc)."""
        B, N, D = tokens_BND.shape
        h, w = grid_hw if grid_hw is not None else (math.isqrt(N), math.isqrt(N))
        if h * w != N:
            raise ValueError(f"the conv projector needs a token grid: {N} tokens are not a {h}x{w} grid")
        grid_BDhw = tokens_BND.transpose(1, 2).reshape(B, D, h, w)
        return self.conv(grid_BDhw).flatten(2).transpose(1, 2)  # (B, N, D_enc)


def build_projector(
    hidden_size: int, projector_dim: int, encoder_dim: int, kind: str = "mlp", kernel_size: int = 3
) -> nn.Module:
    """REPA projector h_phi, applied per token (kind "mlp") or over the token grid (kind "conv", iREPA).

    "mlp": Linear(D, P)-SiLU-Linear(P, P)-SiLU-Linear(P, D_enc), no normalisation before or after it (the
    alignment loss normalises); keys `{0, 2, 4}` (the official REPA layout). "conv": `ConvProjector(D, D_enc,
    kernel_size)`; `projector_dim` is unused.
    """
    if kind == "conv":
        return ConvProjector(hidden_size, encoder_dim, kernel_size)
    if kind != "mlp":
        raise ValueError(f"unknown projector {kind!r}; choose 'mlp' or 'conv'")
    return nn.Sequential(
        nn.Linear(hidden_size, projector_dim),
        nn.SiLU(),
        nn.Linear(projector_dim, projector_dim),
        nn.SiLU(),
        nn.Linear(projector_dim, encoder_dim),
    )


class ClassTokenEmbedder(nn.Module):
    """REG's input embedding of the noisy class token (Wu et al. 2025, arXiv 2507.01467): Linear(D_enc, D) then an
    affine LayerNorm (eps 1e-6), as the official `cls_projectors2` + `wg_norm`. Keys `proj.*`, `norm.*`."""

    def __init__(self, class_token_dim: int, hidden_size: int) -> None:
        super().__init__()
        self.proj = nn.Linear(class_token_dim, hidden_size)
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=True, eps=1e-6)

    def forward(self, cls_BC: Tensor) -> Tensor:
        """(B, D_enc) noisy class token -> (B, 1, D) model token."""
        return self.norm(self.proj(cls_BC)).unsqueeze(1)


def build_self_align_head(hidden_size: int) -> nn.Sequential:
    """SRA's student head (Jiang et al. 2025, arXiv 2505.02831; official `SimpleHead(D, D)`):
    Linear(D, 2D)-SiLU-Linear(2D, D) per token. Keys `{0, 2}`."""
    return nn.Sequential(nn.Linear(hidden_size, 2 * hidden_size), nn.SiLU(), nn.Linear(2 * hidden_size, hidden_size))
