"""Training loop contracts: vanilla runs no encoder, resume equals an uninterrupted run bit for bit, cached
targets equal online targets, 2 processes equal 1 process, `repa sample` works on the result."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from repa.checkpoint import latest_checkpoint, load_checkpoint
from repa.cli.main import main as cli_main
from repa.config import load_config
from repa.training import train
from tests.helpers.tiny import launch_training, tiny_overrides

ROOT = Path(__file__).parents[1]


pytestmark = pytest.mark.usefixtures("isolated_cache")


def _final(run_dir: Path):
    return load_checkpoint(latest_checkpoint(run_dir / "checkpoints"))


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_vanilla_runs_no_encoder(tmp_path, fmnist_root, monkeypatch, capsys):
    def boom(*a, **k):
        raise AssertionError("vanilla training must not load an encoder")

    monkeypatch.setattr("repa.training.setup.build_encoders", boom)
    cfg = load_config(ROOT / "configs/tiny-vanilla.yaml", tiny_overrides(tmp_path / "run", fmnist_root))
    out = train(cfg)
    m = _metrics(tmp_path / "run")
    assert len(m) == 6 and all(r["align"] == 0 for r in m)
    assert out["step"] == 6 and np.isfinite(m[-1]["denoise"])
    ck = _final(tmp_path / "run")
    assert not any(k.startswith("projectors") for k in ck["model"])  # no projector without an encoder
    assert (tmp_path / "run" / "samples" / "step_00000006.png").exists()
    assert (tmp_path / "run" / "config.yaml").exists()
    from repa.hardware import precision_line

    assert f"[repa] {precision_line('no', 'cpu')}" in capsys.readouterr().out  # the start-up line says the precision


def test_repa_step_reduces_both_losses(tmp_path, fmnist_root, test_encoder):
    cfg = load_config(ROOT / "configs/tiny.yaml",
                      tiny_overrides(tmp_path / "run", fmnist_root, "train.max_steps=30", "optim.lr=1e-3"))  # fmt: skip
    train(cfg)
    m = _metrics(tmp_path / "run")
    first, last = np.mean([r["align"] for r in m[:3]]), np.mean([r["align"] for r in m[-3:]])
    assert -1 <= last < first <= 1, (first, last)  # the projector learns to align with the targets
    assert np.mean([r["denoise"] for r in m[-3:]]) < np.mean([r["denoise"] for r in m[:3]])
    assert {"grad_norm", "lr", "images_per_s", "peak_memory_gb", "align/0", "total"} <= set(m[-1])


def test_resume_equals_uninterrupted(tmp_path, fmnist_root, test_encoder):
    full = tmp_path / "full"
    train(load_config(ROOT / "configs/tiny.yaml", tiny_overrides(full, fmnist_root)))
    part = tmp_path / "part"
    train(load_config(ROOT / "configs/tiny.yaml", tiny_overrides(part, fmnist_root, "train.max_steps=3")))
    assert latest_checkpoint(part / "checkpoints").name == "step_00000003"
    train(load_config(ROOT / "configs/tiny.yaml", tiny_overrides(part, fmnist_root)))  # the same command resumes
    a, b = _final(full), _final(part)
    assert a["state"]["step"] == b["state"]["step"] == 6
    for key in ("model", "ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs after resume"
    sa, sb = a["optimizer"]["optimizer"]["state"], b["optimizer"]["optimizer"]["state"]
    for pid in sa:
        for k in sa[pid]:
            assert torch.equal(torch.as_tensor(sa[pid][k]), torch.as_tensor(sb[pid][k]))
    assert _metrics(full)[3:] == [{**r, "images_per_s": _metrics(full)[3 + i]["images_per_s"],
                                   "peak_memory_gb": _metrics(full)[3 + i]["peak_memory_gb"]}
                                  for i, r in enumerate(_metrics(part)[3:])]  # fmt: skip


def test_cached_targets_equal_online(tmp_path, fmnist_root, test_encoder):
    cached = tmp_path / "cached"
    online = tmp_path / "online"
    train(load_config(ROOT / "configs/tiny.yaml", tiny_overrides(cached, fmnist_root, "train.max_steps=3")))
    train(load_config(ROOT / "configs/tiny.yaml",
                      tiny_overrides(online, fmnist_root, "train.max_steps=3", "repa.cache_targets=false")))  # fmt: skip
    for ra, rb in zip(_metrics(cached), _metrics(online)):
        assert ra["align"] == pytest.approx(rb["align"], abs=1e-4)
        assert ra["denoise"] == pytest.approx(rb["denoise"], abs=1e-5)


def test_sample_cli_writes_grid_and_npz(tmp_path, fmnist_root, test_encoder):
    run = tmp_path / "run"
    train(load_config(ROOT / "configs/tiny.yaml", tiny_overrides(run, fmnist_root, "train.max_steps=2")))
    out = tmp_path / "samples"
    assert cli_main(["sample", str(run), "--num", "12", "--steps", "3", "--out", str(out)]) == 0
    npz = list(out.glob("*.npz"))
    assert len(npz) == 1 and len(list(out.glob("*.png"))) == 1
    data = np.load(npz[0], allow_pickle=False)
    assert data["arr_0"].shape == (12, 28, 28, 3) and data["arr_0"].dtype == np.uint8
    assert data["arr_1"].tolist() == [i % 10 for i in range(12)]


@pytest.mark.multiproc
def test_two_processes_equal_one(tmp_path, fmnist_root):
    runs = {}
    for nproc in (1, 2):
        run = tmp_path / f"run{nproc}"
        launch_training(tmp_path, nproc, tiny_overrides(run, fmnist_root, "train.max_steps=4"))
        runs[nproc] = _metrics(run)
    assert len(runs[1]) == len(runs[2]) == 4
    for a, b in zip(runs[1], runs[2]):
        for k in ("denoise", "align", "total"):
            assert abs(a[k] - b[k]) <= 1e-5, (k, a[k], b[k])


@pytest.mark.parametrize("model, channels", [("DiT-T/4", 2), ("SiT-T/4", 1)])
def test_ddpm_with_repa_trains_and_samples(tmp_path, fmnist_root, test_encoder, model, channels):
    """DiT learns Sigma (2C outputs, eps MSE + L_vlb); a SiT backbone under `transport.diffusion=ddpm` has C outputs,
    trains on the eps MSE alone (vb = 0) and samples with the fixed posterior variance."""
    run = tmp_path / "run"
    over = tiny_overrides(run, fmnist_root, f"model.name={model}", "transport.diffusion=ddpm", "train.max_steps=3",
                          "sample.num_steps=4")  # fmt: skip
    train(load_config(ROOT / "configs/tiny.yaml", over))
    m = _metrics(run)
    assert len(m) == 3 and all(np.isfinite(r["denoise"]) and np.isfinite(r["vb"]) for r in m)
    assert all((r["vb"] == 0.0) == (channels == 1) for r in m)
    ck = _final(run)
    assert ck["model"]["final_layer.linear.weight"].shape[0] == 4 * 4 * channels
    assert (run / "samples" / "step_00000003.png").exists()


def test_trains_on_prepared_latent_shards(tmp_path):
    """`repa prepare` output (random small VAE + encoder, stored targets) is read by the loop: no encoder runs,
    latents are resampled from the stored posterior each step, and the grid is decoded with the same VAE."""
    from tests.test_prepare import CLI_ARGS, make_folder

    shards = tmp_path / "shards"
    assert cli_main(["prepare", str(make_folder(tmp_path / "images")), str(shards), *CLI_ARGS]) == 0
    run = tmp_path / "run"
    over = [
        f"train.run_dir={run}", f"data.root={shards}", "data.resolution=32", "repa.encoders=[random-dinov2-vit-s]",
        "repa.encoder_resolution=28", "model.name=SiT-T/2", "model.hidden_size=32", "model.depth=2",
        "model.num_heads=2", "model.align_depth=1", "model.projector_dim=32", "train.global_batch_size=4",
        "train.max_steps=2", "train.log_every=1", "train.progress=false", "train.mixed_precision=no",
        "sample.num_images=2", "sample.num_steps=2", "sample.sampler=ode",
    ]  # fmt: skip

    def no_encoder(*a, **k):
        raise AssertionError("stored targets: no encoder may be loaded")

    import repa.training.setup as S

    orig = S.build_encoders
    S.build_encoders = no_encoder
    try:
        train(load_config(ROOT / "configs/sit-b2-repa.yaml", over))
    finally:
        S.build_encoders = orig
    m = _metrics(run)
    assert len(m) == 2 and all(np.isfinite(r["align"]) and r["align"] != 0 for r in m)
    assert (run / "samples" / "step_00000002.png").exists()
    with pytest.raises(ValueError, match="holds targets of"):
        train(load_config(ROOT / "configs/sit-b2-repa.yaml", [*over, f"train.run_dir={tmp_path / 'r2'}",
                                                                "repa.encoders=[dinov2-vit-b]"]))  # fmt: skip
