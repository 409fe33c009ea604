"""Hidden states of a diffusion transformer on noised inputs, for linear probing and CKNNA (REPA Sec. 3.2).

The model contract (`repa.models.DiffusionTransformer`): `forward_hidden(x_t, t, y, layers) -> {layer: (B, N, D)}`
with 1-indexed blocks and `model.num_classes` as the null (unconditional) label. Inputs are noised with
`repa.transport.get_path(path).interpolate(x, noise, t)` (t = 0 data, t = 1 noise), the single home of x_t.
Following the REPA authors, probing uses the null label so class information cannot leak in through y.

A REG model (one extra class token) also needs that token's input. Its clean value (the encoder's global token) is
not known when a model is probed on its own, so by default it gets no information either: a zero clean token put on
the same path and time with its own noise (drawn after the image's), i.e. pure noise scaled to the level at t.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from repa.transport import get_path

Pool = Literal["mean"] | None


def _null_labels(model: nn.Module, batch: int, device: torch.device) -> Tensor:
    num_classes = getattr(model, "num_classes", None)
    if num_classes is None:
        raise ValueError("pass y explicitly: the model has no `num_classes` attribute for the null label")
    table = getattr(getattr(model, "y_embedder", None), "embedding_table", None)
    if table is not None and table.num_embeddings <= num_classes:  # trained without label dropout: no null row
        raise ValueError("the model has no null-label embedding (class_dropout_prob=0); pass y explicitly")
    return torch.full((batch,), int(num_classes), dtype=torch.long, device=device)


@torch.no_grad()
def hidden_states(
    model: nn.Module,
    x: Tensor,
    t: float | Tensor,
    layers: Sequence[int],
    y: Tensor | None = None,
    pool: Pool = "mean",
    path: str = "linear",
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    class_token: Tensor | None = None,
    class_noise: Tensor | None = None,
) -> dict[int, Tensor]:
    """Hidden tokens after the given blocks for clean inputs noised to time t.

    Args:
        model: a DiffusionTransformer (anything with `forward_hidden(x_t, t, y, layers)` and `num_classes`). It is
            run in eval mode (no label dropout) and its mode is restored afterwards.
        x: clean inputs (B, C, H, W) (latents or pixels, as the model was trained on).
        t: time in [0, 1], a float or (B,) tensor; 0 = clean.
        layers: 1-indexed block numbers.
        y: (B,) labels; None = the null label `model.num_classes` (unconditional, as REPA probes).
        pool: "mean" averages over tokens -> (B, D); None keeps (B, N, D).
        path: interpolation path name for `repa.transport.get_path`.
        noise: the noise to use (default: standard normal drawn with `generator`).
        generator: RNG for the noise, for reproducible features.
        class_token: a REG model's clean class tokens (B, class_token_dim); None = zeros (see the module doc).
        class_noise: the class token's noise (default: standard normal drawn with `generator` after the image's).

    Returns:
        {layer: (B, D) or (B, N, D)} float32 tensors on x's device.
    """
    if pool not in ("mean", None):
        raise ValueError(f"pool must be 'mean' or None, got {pool!r}")
    batch = x.shape[0]
    gen_device = x.device if generator is None else generator.device
    if noise is None:
        noise = torch.randn(x.shape, generator=generator, device=gen_device).to(x)
    t_B = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    if t_B.ndim == 0:
        t_B = t_B.expand(batch)
    x_t = get_path(path).interpolate(x, noise, t_B)
    extra = {}
    if getattr(model, "class_token_dim", 0):  # REG: the class token on the image's path and time
        dim = model.class_token_dim
        clean = torch.zeros(batch, dim, dtype=x.dtype, device=x.device) if class_token is None else class_token.to(x)
        if class_noise is None:
            class_noise = torch.randn((batch, dim), generator=generator, device=gen_device)
        extra["cls_t"] = get_path(path).interpolate(clean, class_noise.to(x), t_B)
    y = _null_labels(model, batch, x.device) if y is None else y.to(x.device)
    was_training = model.training
    model.eval()
    try:
        hidden = model.forward_hidden(x_t, t_B, y, list(layers), **extra)
    finally:
        model.train(was_training)
    return {int(k): (v.float().mean(dim=1) if pool == "mean" else v.float()) for k, v in hidden.items()}


@torch.no_grad()
def collect_hidden_states(
    model: nn.Module,
    batches: Iterable[Tensor | tuple[Tensor, ...]],
    layers: Sequence[int],
    times: Sequence[float],
    pool: Pool = "mean",
    path: str = "linear",
    seed: int = 0,
    device: str | torch.device | None = None,
    on_tokens: Callable[[int, float, Tensor], None] | None = None,
) -> dict[tuple[int, float], Tensor]:
    """Pooled hidden states over a dataset for every (layer, t): the input of `probe_layers` and alignment tables.

    The noise for batch b is drawn from a CPU generator seeded with (seed, b) and shared by all times, so the
    features are reproducible and different t see the same noise sample.

    Args:
        model: the diffusion transformer.
        batches: clean inputs x (B, C, H, W), or tuples whose first element is x (labels are ignored here).
        layers: 1-indexed blocks.
        times: noise levels t.
        pool: "mean" or None (see `hidden_states`).
        path: interpolation path name.
        seed: noise seed.
        device: where to run (default: the model's device).
        on_tokens: called as `on_tokens(layer, t, tokens (B, N, D) float32)` with each batch's unpooled tokens
            before pooling (e.g. the spatial-structure scores of `repa align --spatial`).

    Returns:
        {(layer, t): (N, D) float32 CPU tensor}.
    """
    if device is None:
        device = next(model.parameters()).device
    out: dict[tuple[int, float], list[Tensor]] = {(layer, float(t)): [] for layer in layers for t in times}
    for b, batch in enumerate(batches):
        x = (batch[0] if isinstance(batch, (tuple, list)) else batch).to(device)
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + b)
        noise = torch.randn(x.shape, generator=g).to(x)
        dim = getattr(model, "class_token_dim", 0)  # REG: the class token's noise, drawn after the image's
        cls_noise = torch.randn((x.shape[0], dim), generator=g).to(x) if dim else None
        for t in times:
            unpooled = on_tokens is not None and pool == "mean"
            hidden = hidden_states(model, x, float(t), layers, pool=None if unpooled else pool, path=path, noise=noise,
                                   class_noise=cls_noise)  # fmt: skip
            for layer in layers:
                tokens = hidden[layer]
                if on_tokens is not None:
                    on_tokens(layer, float(t), tokens)
                out[(layer, float(t))].append((tokens.mean(dim=1) if unpooled else tokens).cpu())
    return {key: torch.cat(chunks) for key, chunks in out.items()}
