"""The SiT/DiT diffusion transformer with REPA projectors on the tokens after block `align_depth`, and the REPA-family
options (iREPA conv projector, HASTE attention maps, REG class token, SRA self-alignment head)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from repa.models.layers import (
    ClassTokenEmbedder,
    ConvProjector,
    FinalLayer,
    LabelEmbedder,
    PatchEmbed,
    TimestepEmbedder,
    TransformerBlock,
    build_projector,
    build_self_align_head,
    sincos_pos_embed_2d,
)

__all__ = ["DiffusionTransformer"]


class DiffusionTransformer(nn.Module):
    """Class-conditional latent diffusion transformer (DiT, Peebles & Xie 2023; SiT, Ma et al. 2024) + REPA.

    One backbone for both: SiT predicts the velocity (`learn_sigma=False`, C_out = C), DiT predicts the
    noise and the variance interpolation (`learn_sigma=True`, C_out = 2C). REPA (Yu et al. 2025, Eq. 8)
    adds one projector MLP per target encoder on the hidden tokens after block `align_depth` (1-indexed);
    projectors exist iff `encoder_dims` is non-empty.

    The model embeds `t` as given, unscaled: SiT/REPA feed t in [0, 1] (t = 0 data), DiT's DDPM feeds the
    step index (0 .. 999) as a float.

    Args:
        input_size: side of the (square) input, in pixels or latent cells.
        patch_size: side of a patch; `input_size` must be a multiple of it.
        in_channels: input channels C.
        hidden_size: model width D (a multiple of `num_heads` and of 4).
        depth: number of transformer blocks.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width / D.
        num_classes: number of classes; with `class_dropout_prob > 0` label `num_classes` is the null class.
        class_dropout_prob: probability of replacing a label by the null class in training (CFG).
        learn_sigma: output 2C channels (DiT's eps and variance) instead of C.
        align_depth: 1-indexed block whose output feeds the projectors (only checked when projectors exist).
        encoder_dims: output width of each projector (one per target encoder); empty = vanilla model.
        projector_dim: hidden width of the projector MLPs.
        qk_norm: per-head LayerNorm on queries and keys.
        projector: "mlp" (REPA, keys `projectors.{k}.{0,2,4}`) or "conv" (iREPA: one k x k convolution over the
            token grid, keys `projectors.{k}.conv.*`).
        projector_kernel: kernel size of the conv projector (odd; iREPA's default 3).
        class_token_dim: REG (arXiv 2507.01467): width D_enc of the encoder's global token that becomes one extra
            input/output token (embedding `class_token_embedder.*`, head `class_token_head.*`); 0 = off.
        self_align: SRA (arXiv 2505.02831): build the student head `self_align_head.{0,2}` (D -> 2D -> D).

    With every family option off the module, its state-dict keys, its init (RNG draws included) and its outputs
    are exactly those of plain REPA.
    """

    def __init__(
        self,
        input_size: int,
        patch_size: int,
        in_channels: int,
        hidden_size: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        class_dropout_prob: float = 0.1,
        learn_sigma: bool = False,
        align_depth: int = 8,
        encoder_dims: Sequence[int] = (),
        projector_dim: int = 2048,
        qk_norm: bool = False,
        projector: Literal["mlp", "conv"] = "mlp",
        projector_kernel: int = 3,
        class_token_dim: int = 0,
        self_align: bool = False,
    ) -> None:
        super().__init__()
        self.config: dict[str, Any] = _checked_config(dict(
            input_size=input_size, patch_size=patch_size, in_channels=in_channels, hidden_size=hidden_size,
            depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, num_classes=num_classes,
            class_dropout_prob=class_dropout_prob, learn_sigma=learn_sigma, align_depth=align_depth,
            encoder_dims=encoder_dims, projector_dim=projector_dim, qk_norm=qk_norm, projector=projector,
            projector_kernel=projector_kernel, class_token_dim=class_token_dim, self_align=self_align,
        ))  # fmt: skip
        encoder_dims = tuple(self.config["encoder_dims"])
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.hidden_size = hidden_size
        self.depth = depth
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.learn_sigma = learn_sigma
        self.align_depth = align_depth
        self.encoder_dims = encoder_dims
        self.class_token_dim = int(class_token_dim)
        self.num_prefix = int(class_token_dim > 0)  # tokens before the patches inside the blocks
        self.grid_size = input_size // patch_size
        self.num_patches = self.grid_size**2
        self.grad_checkpointing = False  # recompute block activations in backward (set by the trainer)

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        # Fixed sin-cos table: a persistent buffer (in the state dict under the official key, never trained).
        self.register_buffer("pos_embed", torch.zeros(1, self.num_patches, hidden_size), persistent=True)
        self.blocks = nn.ModuleList(
            TransformerBlock(hidden_size, num_heads, mlp_ratio, qk_norm=qk_norm) for _ in range(depth)
        )
        self.projectors = nn.ModuleList(
            build_projector(hidden_size, projector_dim, d, projector, projector_kernel) for d in encoder_dims
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        # Optional modules are created only when enabled, after the plain ones: a plain model draws the same init.
        if self.class_token_dim:
            self.class_token_embedder = ClassTokenEmbedder(self.class_token_dim, hidden_size)
            self.class_token_head = nn.Linear(hidden_size, self.class_token_dim)
        if self_align:
            self.self_align_head = build_self_align_head(hidden_size)
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """The official init: xavier-uniform linears (and patch conv, as a linear) with zero biases, N(0, 0.02)
        label table and timestep MLP, zero adaLN modulations and final layer (so each block starts as the
        identity and the output as 0: adaLN-Zero), fixed sin-cos `pos_embed`."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        self.pos_embed.copy_(sincos_pos_embed_2d(self.hidden_size, self.grid_size).float()[None])
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        if self.class_token_dim:  # REG zero-initialises its class-token output layer like the image's
            nn.init.zeros_(self.class_token_head.weight)
            nn.init.zeros_(self.class_token_head.bias)

    def forward(
        self,
        x_t: Tensor,
        t: Tensor,
        y: Tensor,
        *,
        force_drop_ids: Tensor | None = None,
        project: bool = True,
        cls_t: Tensor | None = None,
        attn_blocks: Iterable[int] = (),
        self_align_block: int | None = None,
    ) -> tuple[Tensor, list[Tensor]] | tuple[Tensor, list[Tensor], dict[str, Any]]:
        """Predict the denoising target and, for REPA, the projected hidden tokens.

        Args:
            x_t: (B, C, H, W) noisy input.
            t: (B,) float times (or a 0-d tensor, broadcast to the batch).
            y: (B,) integer labels; `num_classes` is the null class.
            force_drop_ids: (B,) entries equal to 1 are replaced by the null class (any mode, no RNG draw).
                Without it, training mode drops each label with probability `class_dropout_prob` using one
                `torch.rand(B)` draw on y's device; eval mode drops nothing.
            project: compute the projector outputs (False skips them, e.g. for sampling).
            cls_t: (B, class_token_dim) noisy class token (REG); required iff the model has one.
            attn_blocks: 1-indexed blocks whose attention logits to return (HASTE); those blocks compute the
                attention explicitly, the others keep the fused kernel.
            self_align_block: 1-indexed block whose tokens go through `self_align_head` (SRA's student).

        Returns:
            (out, zs): out (B, C_out, H, W); zs one (B, N, D_enc_k) tensor per projector, or [] when
            `project=False` or the model has no projectors. With any of cls_t / attn_blocks / self_align_block,
            a third element `extras` (dict): "class_token" (B, class_token_dim) the class token's prediction and
            "class_token_zs" (per projector (B, D_enc_k), the projected class token; [] without projection);
            "attn" {block: (B, heads, N, N) logits over the patch tokens (the class token's row and column
            removed)}; "self_align" (B, N, D) the head's output on the patch tokens.
        """
        t = self._check_inputs(x_t, t, y, force_drop_ids, cls_t)
        attn_set = self._check_blocks(attn_blocks, self_align_block)
        tokens_BND, c_BD = self._embed(x_t, t, y, force_drop_ids)
        if self.num_prefix:  # REG: the class token goes first, without a position embedding (REG's zero row)
            tokens_BND = torch.cat([self.class_token_embedder(cls_t), tokens_BND], dim=1)
        zs: list[Tensor] = []
        extras: dict[str, Any] = {}
        for i, block in enumerate(self.blocks):
            if i + 1 in attn_set:
                tokens_BND, logits = self._run_block(block, tokens_BND, c_BD, return_attn=True)
                extras.setdefault("attn", {})[i + 1] = self._patches(logits, both=True)
            else:
                tokens_BND = self._run_block(block, tokens_BND, c_BD)
            if project and i + 1 == self.align_depth:
                zs = [self._project(projector, self._patches(tokens_BND)) for projector in self.projectors]
                if self.num_prefix:
                    extras["class_token_zs"] = [p(tokens_BND[:, :1], (1, 1))[:, 0] if isinstance(p, ConvProjector)
                                                else p(tokens_BND[:, 0]) for p in self.projectors]  # fmt: skip
            if i + 1 == self_align_block:
                extras["self_align"] = self.self_align_head(self._patches(tokens_BND))
        if not self.num_prefix:
            out_BNP = self.final_layer(tokens_BND, c_BD)  # (B, N, p * p * C_out)
        else:
            h_BND = self.final_layer.modulated(tokens_BND, c_BD)
            out_BNP = self.final_layer.linear(h_BND[:, 1:])
            extras["class_token"] = self.class_token_head(h_BND[:, 0])  # (B, class_token_dim)
            extras.setdefault("class_token_zs", [])
        if cls_t is None and not attn_set and self_align_block is None:
            return self.unpatchify(out_BNP), zs
        return self.unpatchify(out_BNP), zs, extras

    def velocity(self, x_t: Tensor, t: Tensor, y: Tensor) -> Tensor:
        """The first `in_channels` output channels without projectors: the velocity for SiT, eps for DiT.

        This is the `fn(x, t, y)` the samplers take; label dropout follows the module's mode (use eval). A model
        with a class token (REG) needs `velocity_joint`.
        """
        out, _ = self.forward(x_t, t, y, project=False)
        return out[:, : self.in_channels]

    def velocity_joint(self, x_t: Tensor, cls_t: Tensor, t: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """REG: the image prediction (first `in_channels` channels) and the class token's, without projectors."""
        out, _, extras = self.forward(x_t, t, y, project=False, cls_t=cls_t)
        return out[:, : self.in_channels], extras["class_token"]

    def forward_hidden(
        self,
        x_t: Tensor,
        t: Tensor,
        y: Tensor,
        layers: Iterable[int],
        *,
        force_drop_ids: Tensor | None = None,
        cls_t: Tensor | None = None,
    ) -> dict[int, Tensor]:
        """Hidden tokens after the given blocks (for probing, CKNNA, SRA's teacher); stops after the deepest one.

        Args:
            x_t, t, y, force_drop_ids, cls_t: as in `forward` (label dropout also follows the module's mode).
            layers: 1-indexed block numbers in [0, depth]; 0 = patch embedding + position embedding.

        Returns:
            {layer: (B, N, D) patch tokens} (a REG model's class token is left out).
        """
        wanted = sorted(set(int(layer) for layer in layers))
        bad = [layer for layer in wanted if not 0 <= layer <= self.depth]
        if bad:
            raise ValueError(f"layers must be in [0, {self.depth}] (0 = embeddings), got {bad}")
        t = self._check_inputs(x_t, t, y, force_drop_ids, cls_t)
        tokens_BND, c_BD = self._embed(x_t, t, y, force_drop_ids)
        hidden = {0: tokens_BND} if 0 in wanted else {}
        if self.num_prefix:
            tokens_BND = torch.cat([self.class_token_embedder(cls_t), tokens_BND], dim=1)
        for i, block in enumerate(self.blocks[: max(wanted, default=0)]):
            tokens_BND = self._run_block(block, tokens_BND, c_BD)
            if i + 1 in wanted:
                hidden[i + 1] = self._patches(tokens_BND)
        return hidden

    def unpatchify(self, x_BNP: Tensor) -> Tensor:
        """(B, N, p * p * C_out) patch tokens -> (B, C_out, H, W) (token n = row * grid + column)."""
        B, p, g, c = x_BNP.shape[0], self.patch_size, self.grid_size, self.out_channels
        x = x_BNP.reshape(B, g, g, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(B, c, g * p, g * p)

    def _embed(self, x_t: Tensor, t: Tensor, y: Tensor, force_drop_ids: Tensor | None) -> tuple[Tensor, Tensor]:
        """Patch tokens + position embedding (B, N, D) and the conditioning t_emb + y_emb (B, D)."""
        tokens_BND = self.x_embedder(x_t) + self.pos_embed
        c_BD = self.t_embedder(t) + self.y_embedder(y, self.training, force_drop_ids)
        return tokens_BND, c_BD

    def _run_block(self, block: nn.Module, tokens_BND: Tensor, c_BD: Tensor, return_attn: bool = False) -> Any:
        args = (tokens_BND, c_BD, True) if return_attn else (tokens_BND, c_BD)
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def _patches(self, x: Tensor, both: bool = False) -> Tensor:
        """Drop the class token (REG) from tokens (B, 1 + N, D), or from both token axes of (B, H, 1 + N, 1 + N)."""
        if not self.num_prefix:
            return x
        return x[..., 1:, 1:] if both else x[:, 1:]

    def _project(self, projector: nn.Module, tokens_BND: Tensor) -> Tensor:
        if isinstance(projector, ConvProjector):
            return projector(tokens_BND, (self.grid_size, self.grid_size))
        return projector(tokens_BND)

    def _check_blocks(self, attn_blocks: Iterable[int], self_align_block: int | None) -> set[int]:
        """The attention blocks as a set; ValueError for a block outside [1, depth] or a missing SRA head."""
        blocks = {int(b) for b in attn_blocks}
        bad = sorted(b for b in blocks if not 1 <= b <= self.depth)
        if bad:
            raise ValueError(f"attn_blocks must be 1-indexed blocks in [1, {self.depth}], got {bad}")
        if self_align_block is not None:
            if not hasattr(self, "self_align_head"):
                raise ValueError("self_align_block needs the SRA head: build the model with self_align=True")
            if not 1 <= self_align_block <= self.depth:
                raise ValueError(f"self_align_block must be in [1, {self.depth}], got {self_align_block}")
        return blocks

    def _check_inputs(
        self, x_t: Tensor, t: Tensor, y: Tensor, force_drop_ids: Tensor | None, cls_t: Tensor | None = None
    ) -> Tensor:
        """Raise a ValueError naming the mismatch; returns t broadcast to (B,)."""
        expected = (self.in_channels, self.input_size, self.input_size)
        if x_t.ndim != 4 or tuple(x_t.shape[1:]) != expected:
            raise ValueError(f"x_t must have shape (B, {', '.join(map(str, expected))}), got {tuple(x_t.shape)}")
        B = x_t.shape[0]
        if not torch.is_tensor(t):
            t = torch.as_tensor(t, dtype=torch.float32, device=x_t.device)
        if t.ndim == 0:
            t = t.expand(B)
        if t.shape != (B,):
            raise ValueError(f"t must have shape ({B},) to match x_t's batch, got {tuple(t.shape)}")
        if y.shape != (B,):
            raise ValueError(f"y must have shape ({B},) to match x_t's batch, got {tuple(y.shape)}")
        if y.is_floating_point() or y.is_complex():
            raise ValueError(f"y must hold integer class labels, got dtype {y.dtype}")
        if force_drop_ids is not None and force_drop_ids.shape != (B,):
            raise ValueError(f"force_drop_ids must have shape ({B},), got {tuple(force_drop_ids.shape)}")
        if self.class_token_dim and (cls_t is None or cls_t.shape != (B, self.class_token_dim)):
            got = None if cls_t is None else tuple(cls_t.shape)
            raise ValueError(f"this model has a class token (REG): cls_t must have shape ({B}, "
                             f"{self.class_token_dim}), got {got}")  # fmt: skip
        if not self.class_token_dim and cls_t is not None:
            raise ValueError("cls_t given but the model has no class token: build it with class_token_dim=D_enc")
        return t

    def extra_repr(self) -> str:
        c = self.config
        return (f"input_size={c['input_size']}, patch_size={c['patch_size']}, hidden_size={c['hidden_size']}, "
                f"depth={c['depth']}, num_heads={c['num_heads']}, learn_sigma={c['learn_sigma']}, "
                f"align_depth={c['align_depth']}, encoder_dims={c['encoder_dims']}"
                + (f", projector={c['projector']!r}, projector_kernel={c['projector_kernel']}"
                   if c["projector"] != "mlp" else "")
                + (f", class_token_dim={c['class_token_dim']}" if c["class_token_dim"] else "")
                + (", self_align=True" if c["self_align"] else ""))  # fmt: skip


def _checked_config(config: dict[str, Any]) -> dict[str, Any]:
    """The constructor's arguments, checked with messages that say what to change, with `encoder_dims` as a list of
    ints, `class_token_dim` as an int and `self_align` as a bool."""
    encoder_dims = tuple(int(d) for d in config["encoder_dims"])
    for name in ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "num_classes"):
        value = config[name]
        if int(value) != value or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    input_size, patch_size, hidden_size = config["input_size"], config["patch_size"], config["hidden_size"]
    num_heads, depth, align_depth = config["num_heads"], config["depth"], config["align_depth"]
    if input_size % patch_size != 0:
        raise ValueError(f"input_size={input_size} is not divisible by patch_size={patch_size}")
    if hidden_size % num_heads != 0:
        raise ValueError(f"hidden_size={hidden_size} is not divisible by num_heads={num_heads}")
    if hidden_size % 4 != 0:
        raise ValueError(f"hidden_size={hidden_size} must be divisible by 4 (2-D sin-cos position embedding)")
    if not config["mlp_ratio"] > 0:
        raise ValueError(f"mlp_ratio must be positive, got {config['mlp_ratio']}")
    if not 0.0 <= config["class_dropout_prob"] < 1.0:
        raise ValueError(f"class_dropout_prob must be in [0, 1), got {config['class_dropout_prob']}")
    if any(d < 1 for d in encoder_dims):
        raise ValueError(f"encoder_dims must be positive, got {list(encoder_dims)}")
    if encoder_dims and not 1 <= align_depth <= depth:
        raise ValueError(
            f"align_depth={align_depth} must be in [1, depth={depth}] (1-indexed block feeding the projectors)"
        )
    if config["projector"] not in ("mlp", "conv"):
        raise ValueError(f"unknown projector {config['projector']!r}; choose 'mlp' or 'conv'")
    class_token_dim = config["class_token_dim"]
    if class_token_dim and encoder_dims and class_token_dim != encoder_dims[0]:
        raise ValueError(
            f"class_token_dim={class_token_dim} must equal the first encoder's width {encoder_dims[0]}: REG's class "
            "token is that encoder's global token (its projection is aligned with it)"
        )
    if int(class_token_dim) != class_token_dim or class_token_dim < 0:
        raise ValueError(f"class_token_dim must be a non-negative integer (0 = no class token), got {class_token_dim}")
    return {**config, "encoder_dims": list(encoder_dims), "class_token_dim": int(class_token_dim),
            "self_align": bool(config["self_align"])}  # fmt: skip
