"""REPA-E (Leng et al., ICCV 2025): the VAE trains jointly with the diffusion transformer, through the alignment loss.

Each micro-batch (`EndToEnd.vae_pass`, then the loop's usual loss call):

1. VAE pass: images -> encoder -> posterior (mean, std), z = mean + std * eps (eps: the step's posterior draw, so
   resume is exact); L_VAE = vae_recon_coeff * recon(decode(z), image) + vae_kl_coeff * KL + vae_perceptual_coeff *
   LPIPS + vae_align_coeff * L_align(model hidden states of bn_running(z)), backpropagated into the VAE only
   (`backward(..., inputs=VAE parameters)`: the model's parameters get nothing from it). bn_running normalises with
   the latent BatchNorm's running statistics, differentiably in z, and updates nothing; the model sees the step's
   time and noise and no label dropout (REPA-E runs this pass with the SiT frozen and in eval mode).
2. Model pass: x = bn(z.detach()) (batch statistics; the running ones are updated) and the usual
   L_denoise + lambda L_align for the model only: the stop-gradient keeps the denoising loss out of the VAE (REPA-E's
   finding: backpropagating it collapses the latent space).

One AdamW holds two param groups: the model's (optim.lr) and the VAE's (train.vae_lr), both following optim's
schedule; each group's gradient is clipped on its own at optim.grad_clip (REPA-E clips both at 1.0).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from repa import distributed
from repa.config import Config
from repa.data.shards import LatentShards
from repa.data.tuned_vae import TunedVAE
from repa.data.vae import from_uint8
from repa.data.vae_spec import load_vae
from repa.errors import brief
from repa.losses import RepaLoss
from repa.models import MODELS
from repa.training.data import InMemoryImages, TrainingData


@dataclass
class EncodedImages(InMemoryImages):
    """In-memory images that a trainable VAE encodes every step: the batch holds `pixels` (float [-1, 1], the VAE's
    channels; grayscale repeated) instead of x, which `EndToEnd.vae_pass` makes; `sample_shape` is the latents'."""

    latent_shape: tuple[int, int, int] = (0, 0, 0)
    vae: str = ""  # type: ignore[assignment]  # the trainable VAE's spec
    vae_channels: int = 3
    needs_posterior: ClassVar[bool] = True  # the loop draws the posterior sample's eps (latent-shaped)

    @property
    def sample_shape(self) -> tuple[int, int, int]:  # type: ignore[override]
        return self.latent_shape

    def batch(
        self, idx: torch.Tensor, flips: torch.Tensor, device: torch.device, *, eps: torch.Tensor | None = None
    ) -> dict[str, Any]:
        out = super().batch(idx, flips, device)
        pixels = out.pop("x")
        out["pixels"] = pixels.expand(-1, self.vae_channels, -1, -1) if pixels.shape[1] == 1 else pixels
        return out


class EncodedShards:
    """Latent shards written with `repa prepare --images` (ImageNet scale: memory-mapped, not in memory): REPA-E
    encodes their stored uint8 crops every step with its trainable VAE; labels and stored encoder targets as the
    shards give them (the stored latents are not read)."""

    needs_posterior: ClassVar[bool] = True
    stores_targets: ClassVar[bool] = True
    has_images: ClassVar[bool] = True
    latent_norm: ClassVar[None] = None

    def __init__(self, shards: LatentShards, latent_shape: tuple[int, int, int], vae_spec: str) -> None:
        self.shards, self.latent_shape, self.vae = shards, latent_shape, vae_spec

    def __getattr__(self, name: str) -> Any:  # name, num_classes, num_items, target_specs, check_encoders, ...
        return getattr(self.shards, name)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return self.latent_shape

    def batch(
        self, idx: torch.Tensor, flips: torch.Tensor, device: torch.device, *, eps: torch.Tensor | None = None
    ) -> dict[str, Any]:
        out = self.shards.items(idx, flips, device)
        out["pixels"] = from_uint8(out["images"])
        return out


class EndToEnd:
    """The REPA-E pieces of a run: the trainable VAE with its latent BatchNorm (`tuned`) and the VAE's loss.

    Args:
        cfg: the run's config (`train.end_to_end` and the `train.vae_*` keys; `data.vae` is the VAE to start from).
        device: where the VAE runs.
    """

    def __init__(self, cfg: Config, device: torch.device | str) -> None:
        self.cfg = cfg
        start = load_vae(cfg.data.vae, device)  # a frozen wrapper; its AutoencoderKL is made trainable here
        self.tuned = TunedVAE(start.vae, momentum=cfg.train.latent_bn_momentum).to(device).train()
        self.tuned.bn.init_from(start.norm)  # REPA-E's init_bn (a resume then restores the saved statistics)
        self.params = list(self.tuned.parameters())
        self.perceptual = _perceptual(cfg.train.vae_perceptual_coeff, device)
        self._bn_state: dict[str, Tensor] = {}

    def wrap(self, data: TrainingData) -> EncodedImages | EncodedShards:
        """In-memory images, or latent shards with stored images, as latent-space training data of this VAE."""
        if isinstance(data, LatentShards):
            if not data.has_images:
                raise ValueError(f"train.end_to_end=true encodes images every step, but {data.root} holds none: rerun "
                                 "`repa prepare --images` (data.kind=latents), or train on images (fashion-mnist, "
                                 "folder)")  # fmt: skip
            r, f = data.manifest["config"]["resolution"], self.tuned.downsample
            if r % f:
                raise ValueError(f"the VAE {self.cfg.data.vae} downsamples by {f}: {r} px crops do not divide")
            patch = MODELS[self.cfg.model.name]["patch_size"]
            if (r // f) % patch:
                raise ValueError(f"the VAE's {r // f}x{r // f} latents are not divisible by the patch size {patch} of "
                                 f"model.name={self.cfg.model.name}")  # fmt: skip
            return EncodedShards(data, (self.tuned.latent_channels, r // f, r // f), self.cfg.data.vae)
        if not isinstance(data, InMemoryImages):
            raise ValueError("train.end_to_end=true needs images (data.kind=fashion-mnist, folder, or latents "
                             "prepared with --images)")  # fmt: skip
        c, h, w = data.sample_shape
        f, vae_c = self.tuned.downsample, self.tuned.in_channels
        if c not in (1, vae_c) or h % f or w % f:
            raise ValueError(f"the VAE {self.cfg.data.vae} encodes {vae_c}-channel images with sides divisible by {f}; "
                             f"the training images are {c}x{h}x{w}")  # fmt: skip
        patch = MODELS[self.cfg.model.name]["patch_size"]
        if (h // f) % patch:
            raise ValueError(f"the VAE's {h // f}x{w // f} latents are not divisible by the patch size {patch} of "
                             f"model.name={self.cfg.model.name}")  # fmt: skip
        return EncodedImages(data.images, data.labels, data.num_classes, data.name, targets=data.targets,
                             class_tokens=data.class_tokens, latent_shape=(self.tuned.latent_channels, h // f, w // f),
                             vae=self.cfg.data.vae, vae_channels=vae_c)  # fmt: skip

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """AdamW's groups: the model's (optim.lr), then the VAE's (train.vae_lr)."""
        return [{"params": list(model.parameters())}, {"params": self.params, "lr": self.cfg.train.vae_lr}]

    def vae_pass(
        self,
        model: nn.Module,
        loss_fn: RepaLoss,
        batch: Mapping[str, Any],
        targets: Sequence[Tensor] | None,
        t: Tensor,
        noise: Tensor,
        eps: Tensor,
        extra: Mapping[str, Any],
        backward: Callable[[Tensor], None],
        autocast: Callable[[], AbstractContextManager[object]] = contextlib.nullcontext,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The VAE's loss on one micro-batch, backpropagated with `backward` (into the VAE's parameters only).

        Args:
            model, loss_fn: the run's model and loss (only the alignment term is used here).
            batch: `EncodedImages.batch` output (`pixels`, `y`).
            targets: the encoders' targets of the batch.
            t, noise, eps: the step's time, noise and posterior draw (the model pass uses the same t and noise).
            extra: the family's extra loss arguments (`setup.family_step`).
            backward: e.g. `lambda loss: acc.backward(loss / accum, inputs=e2e.params)`.

        Returns:
            (x, terms): x = bn(z.detach()) for the model pass (running statistics updated), and the logged terms
            `vae/recon`, `vae/kl`, [`vae/perceptual`], `vae/align`, `vae/total` (detached).
        """
        tc = self.cfg.train
        pixels, y = batch["pixels"], batch["y"]
        with autocast():
            dist = self.tuned.vae.encode(pixels).latent_dist
            z = dist.mean + dist.std * eps.to(device=dist.mean.device, dtype=dist.mean.dtype)  # (B, C, h, w)
            recon = self.tuned.decode_latents(z).float()
            loss = F.l1_loss if tc.vae_recon == "l1" else F.mse_loss
            terms = {"vae/recon": loss(recon, pixels.float()), "vae/kl": dist.kl().float().mean()}
            total = tc.vae_recon_coeff * terms["vae/recon"] + tc.vae_kl_coeff * terms["vae/kl"]
            if self.perceptual is not None:
                terms["vae/perceptual"] = self.perceptual(recon, pixels.float()).mean()
                total = total + tc.vae_perceptual_coeff * terms["vae/perceptual"]
            no_drop = torch.zeros_like(y)  # REPA-E's VAE pass runs the SiT in eval mode: no label dropout
            # the raw alignment term, whatever a schedule's weight of the model's term (a weight 0 would skip it)
            terms["vae/align"] = loss_fn(model, self.tuned.bn.normalize_running(z), y, targets, t=t, noise=noise,
                                         model_kwargs={"force_drop_ids": no_drop},
                                         **{**extra, "align_weight": 1.0})["align"]  # fmt: skip
            terms["vae/total"] = total + tc.vae_align_coeff * terms["vae/align"]
        backward(terms["vae/total"])
        with torch.no_grad():
            x = self._batch_norm(z.detach())  # the stop-gradient: the model pass cannot reach the VAE
        return x, {k: v.detach() for k, v in terms.items()}

    def _batch_norm(self, z: Tensor) -> Tensor:
        """The latent BatchNorm in train mode over the global micro-batch: on one process `bn(z)`; on several the
        batch statistics are summed over the processes (SyncBatchNorm's semantics, as the official code's SyncBN)
        and the running statistics updated alike on every rank. No gradient (z is detached)."""
        bn = self.tuned.bn
        if distributed.world_size() == 1:
            return bn(z)
        c = z.shape[1]
        local = torch.cat([z.double().sum((0, 2, 3)), z.double().pow(2).sum((0, 2, 3)),
                           torch.tensor([z.numel() / c], dtype=torch.float64, device=z.device)])  # fmt: skip
        total = distributed.all_reduce_sum(local)
        n = float(total[-1])
        mean = total[:c] / n
        var = (total[c : 2 * c] / n - mean * mean).clamp_min(0.0)
        m = bn.momentum
        bn.running_mean.mul_(1 - m).add_(m * mean.to(bn.running_mean.dtype))
        bn.running_var.mul_(1 - m).add_(m * (var * n / max(n - 1, 1)).to(bn.running_var.dtype))
        bn.num_batches_tracked.add_(1)
        shape = (1, c, 1, 1)
        return ((z - mean.view(shape).to(z.dtype)) / torch.sqrt(var.view(shape).to(z.dtype) + bn.eps)).to(z.dtype)

    def grad_norm(self, max_norm: float) -> Tensor:
        """Average the VAE's gradient over the processes (the model's is DDP's), clip it to `max_norm` (> 0) on its
        own; its norm before clipping."""
        if distributed.world_size() > 1:
            for p in self.params:
                if p.grad is not None:
                    p.grad.copy_(distributed.all_reduce_mean(p.grad))
        grads = [p for p in self.params if p.grad is not None]
        if not grads:
            return torch.zeros((), dtype=torch.float32)
        if max_norm > 0:
            return torch.nn.utils.clip_grad_norm_(grads, max_norm).detach().float()
        return torch.linalg.vector_norm(torch.stack([p.grad.detach().float().norm() for p in grads]))

    def snapshot(self) -> None:
        """Keep the BatchNorm's statistics before a step, to put back if the step is skipped (`undo`)."""
        self._bn_state = {k: v.clone() for k, v in self.tuned.bn.state_dict().items()}

    def undo(self) -> None:
        """A skipped (non-finite) step: the optimizer undid the weights; the statistics it updated go back too."""
        if self._bn_state:
            self.tuned.bn.load_state_dict(self._bn_state)


def _perceptual(coeff: float, device: torch.device | str) -> nn.Module | None:
    """LPIPS-VGG (REPA-E's perceptual term) when `coeff` > 0; its package and weights are not bundled."""
    if coeff <= 0:
        return None
    try:
        import lpips  # type: ignore[import-not-found]

        net = lpips.LPIPS(net="vgg", verbose=False)
    except Exception as err:  # noqa: BLE001 - ImportError, a failed download of the VGG weights
        raise ValueError(f"train.vae_perceptual_coeff={coeff} needs LPIPS-VGG (`pip install lpips`; torchvision "
                         f"fetches its VGG-16 weights once): {brief(err)}; "
                         "or set train.vae_perceptual_coeff=0 (the default)") from err  # fmt: skip
    return net.eval().requires_grad_(False).to(device)
