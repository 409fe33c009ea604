"""The ImageNet 512 preset (`configs/sit-xl2-repa-512.yaml`): `repa prepare` at 512 px with DINOv2-B at 448 px gives
the 32x32 latent-token grid the model's 32x32 patch grid expects, and the preset trains one step at tiny width."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from repa.cli.main import main as cli_main
from repa.config import load_config
from repa.data.shards import LatentShards
from repa.training import train

ROOT = Path(__file__).parents[1]
TINY_ENCODER = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}


def test_preset_512_prepares_and_trains_one_step(tmp_path, monkeypatch):
    monkeypatch.setenv("REPA_CACHE", str(tmp_path / "cache"))
    cfg = load_config(ROOT / "configs" / "sit-xl2-repa-512.yaml")
    assert (cfg.model.name, cfg.data.resolution, cfg.repa.encoder_resolution) == ("SiT-XL/2", 512, 448)
    assert cfg.repa.encoders == ["dinov2-vit-b"] and cfg.model.align_depth == 8 and cfg.repa.align_coeff == 0.5

    src = tmp_path / "images"
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (src / c).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (540, 600, 3), dtype=np.uint8)).save(src / c / "0.png")
    out = tmp_path / "latents512"
    args = ["prepare", str(src), str(out), "--resolution", "512", "--vae", "random:small", "--encoders", "dinov2-vit-b",
            "--encoder-resolution", "448", "--encoder-random-init", "--encoder-config", json.dumps(TINY_ENCODER),
            "--workers", "0", "--no-progress"]  # fmt: skip
    assert cli_main(args) == 0
    shards = LatentShards(out)
    assert shards.sample_shape == (4, 64, 64)  # 512 / 8
    assert shards.target_specs == [("dinov2-vit-b", 32, (32, 32))]  # 448 / 14 = 32 = 64 / 2

    run = tmp_path / "run"
    over = [f"data.root={out}", "data.vae=random:small", "data.hflip=false", f"train.run_dir={run}",
            "model.hidden_size=32", "model.depth=2", "model.num_heads=2", "model.align_depth=1",
            "model.projector_dim=32", "train.global_batch_size=2", "train.max_steps=1", "train.sample_every=1000",
            "train.mixed_precision=no", "train.progress=false"]  # fmt: skip
    summary = train(load_config(ROOT / "configs" / "sit-xl2-repa-512.yaml", over))
    assert summary["step"] == 1
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert np.isfinite(record["denoise"]) and -1.0 <= record["align"] <= 1.0  # a negative cosine
