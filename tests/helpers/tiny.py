"""Small stand-ins for real assets: an IDX dataset writer and a patch-conv encoder with the real protocol."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import repa.checkpoint
from repa.encoders.base import Encoder


def write_idx_dataset(root: Path, num: int = 64, seed: int = 0, split: str = "train") -> Path:
    """Fashion-MNIST-format files (IDX, gzip) with `num` 28x28 images whose content depends on the class."""
    root.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(num) % 10
    yy, xx = torch.meshgrid(torch.arange(28), torch.arange(28), indexing="ij")
    images = torch.zeros(num, 28, 28)
    for i, c in enumerate(labels.tolist()):
        stripe = ((xx + yy * (c % 3)) // (2 + c)) % 2  # a class-specific stripe pattern
        images[i] = 200 * stripe + 30 * torch.rand(28, 28, generator=g)
    images = images.clamp(0, 255).to(torch.uint8)
    prefix = "train" if split == "train" else "t10k"
    with gzip.open(root / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">IIII", 2051, num, 28, 28) + images.numpy().tobytes())
    with gzip.open(root / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
        f.write(struct.pack(">II", 2049, num) + labels.to(torch.uint8).numpy().tobytes())
    return root


class PatchEncoder(Encoder):
    """A deterministic random patch-conv encoder (patch 14) following the Encoder protocol."""

    def __init__(self, resolution: int = 98, embed_dim: int = 16, seed: int = 0, layer=None) -> None:
        super().__init__("test-patch-encoder", embed_dim, 14, resolution, layer=layer, source="random-init")
        g = torch.Generator().manual_seed(seed)
        self.proj = torch.nn.Conv2d(3, embed_dim, 14, 14)
        with torch.no_grad():
            self.proj.weight.copy_(torch.randn(self.proj.weight.shape, generator=g) * 0.05)
            self.proj.bias.zero_()
        self.freeze()

    def _tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.proj(pixels).flatten(2).transpose(1, 2)  # (B, N, D)


def tiny_overrides(run_dir: Path, data_root: Path, *extra: str) -> list[str]:
    """Overrides of configs/tiny.yaml for a seconds-long run: width 32, 2 blocks, 6 steps of batch 8 at lr 3e-4
    (fixed here: the tests' numbers do not follow the embedded default's lr), checkpoints at steps 3 and 6, a log
    line every step, fp32 (the preset's `auto` would pick bf16 on some CPUs: the tests' numbers must not depend on it)."""
    return [
        f"train.run_dir={run_dir}", f"data.root={data_root}", "data.num_train=null", "model.hidden_size=32",
        "model.depth=2", "model.num_heads=2", "model.align_depth=1", "model.projector_dim=32",
        "train.global_batch_size=8", "train.max_steps=6", "train.log_every=1", "train.sample_every=1000",
        "train.checkpoint_every=3", "train.progress=false", "sample.num_images=4", "sample.num_steps=2",
        "optim.lr=3e-4", "train.mixed_precision=no", *extra,
    ]  # fmt: skip


def metrics(run_dir: Path) -> list[dict]:
    """The records of a run's metrics.jsonl."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


class Killed(BaseException):
    """What a `kill -9` at a checkpoint fault point becomes in a test (`killed_at`)."""


@contextlib.contextmanager
def killed_at(fault: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The body (a training run) must die at checkpoint fault point `fault` (`REPA_FAULT_AFTER_FILE` syntax, e.g.
    "model.safetensors@6"): the process's self-kill is turned into `Killed`, which the block must raise."""

    def die(pid: int, sig: int) -> None:
        raise Killed

    with monkeypatch.context() as m:
        m.setattr(repa.checkpoint.os, "kill", die)
        m.setenv("REPA_FAULT_AFTER_FILE", fault)
        with pytest.raises(Killed):
            yield


_LAUNCHED_TRAIN = """
import sys, json
sys.path.insert(0, {root!r})
import repa.training.setup as S
from tests.helpers.tiny import PatchEncoder
S.build_encoders = lambda cfg, device: [PatchEncoder(98)]
from repa.config import load_config
from repa.training import train
train(load_config({cfg!r}, json.loads(sys.argv[1])))
"""


def launch_training(tmp_path: Path, nproc: int, overrides: list[str], config: str = "configs/tiny.yaml") -> str:
    """`repa train` of `config` with `overrides` on `nproc` CPU processes (torchrun, gloo, one thread each, the
    stand-in encoder, a repa cache under tmp_path); returns stdout + stderr, failing the test if it fails."""
    import subprocess
    import sys

    root = Path(__file__).parents[2]
    script = tmp_path / "launched_train.py"
    script.write_text(_LAUNCHED_TRAIN.format(root=str(root), cfg=str(root / config)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "REPA_CACHE": str(tmp_path / "cache")}
    env.pop("REPA_FAULT_AFTER_FILE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(script),
           json.dumps(overrides)]  # fmt: skip
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout + res.stderr
