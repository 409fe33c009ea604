"""`repa align --spatial`: iREPA's spatial-structure scores (LDS, CDS, RMSC) beside CKNNA for model layers and
encoders, and the ranking of target encoders without a model (`repa.analysis.structure`)."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import repa.analysis.run as run_mod
from repa.analysis.hooks import collect_hidden_states
from repa.analysis.spatial import spatial_metrics
from repa.analysis.structure import SPATIAL, SpatialMean, grid_scores, ranked
from repa.cli.main import main as cli_main
from repa.data.npz import save_samples
from repa.models import build_model
from tests.helpers.tiny import PatchEncoder

torch.set_num_threads(2)


class ShuffledPatchEncoder(PatchEncoder):
    """The patch encoder with its tokens in a fixed random order: the same tokens, no spatial structure."""

    def _tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        tokens = super()._tokens(pixels)
        return tokens[:, torch.randperm(tokens.shape[1], generator=torch.Generator().manual_seed(0))]


def _encoder(name, resolution=224, *, weights=None, layer=None, device="cpu", **kwargs):
    cls = ShuffledPatchEncoder if name.startswith("shuffled") else PatchEncoder
    return cls(resolution, seed=1 + (layer or 0), layer=layer)


def _smooth_images(n: int, side: int = 28, seed: int = 0) -> torch.Tensor:
    """uint8 (n, 3, side, side) low-frequency images: neighbouring patches look alike."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, side), torch.linspace(0, 1, side), indexing="ij")
    freq, phase = torch.rand(n, 3, 2, generator=g) * 3, torch.rand(n, 3, generator=g) * 6.28
    img = torch.sin(freq[..., 0, None, None] * 3 * xx + freq[..., 1, None, None] * 3 * yy + phase[..., None, None])
    return ((img + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def _encoder_tokens(name, images, resolution=98):
    return _encoder(name, resolution)(images)


# ----------------------------------------------------------------------------------------- the scores


def test_grid_scores_known_values_small_grids_and_batch_weighting():
    e1, e2 = [1.0, 0.0], [0.0, 1.0]
    tokens = torch.tensor([[e1, e1, e1, e1, e2, e2, e2]])  # a 1x7 grid: 6 neighbour pairs, one of them e1-e2
    scores = grid_scores(tokens, (1, 7))
    # local: 5 of 6 neighbour pairs have cos 1 -> 5/6; far (distance >= 6): the pair (0, 6), cos 0
    assert scores["lds"] == pytest.approx(5 / 6)
    assert scores == pytest.approx(spatial_metrics(tokens, (1, 7)))
    # a grid too small for LDS (largest distance 2 < 6) or for CDS (one distance) gives NaN, not an error
    small = grid_scores(torch.randn(2, 4, 3))
    assert math.isnan(small["lds"]) and math.isfinite(small["cds"]) and math.isfinite(small["rmsc"])
    tiny = grid_scores(torch.randn(2, 2, 3), (1, 2))
    assert math.isnan(tiny["lds"]) and math.isnan(tiny["cds"]) and math.isfinite(tiny["rmsc"])
    with pytest.raises(ValueError, match="grid"):
        grid_scores(torch.randn(1, 6, 3))
    # the image-weighted mean of per-batch scores is the score of all images
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 64, 8, generator=g).cumsum(dim=1)  # some spatial structure along the rows
    acc = SpatialMean()
    for part in x.split(2):
        acc.add(part, (8, 8))
    assert acc.result() == pytest.approx(spatial_metrics(x, (8, 8)), rel=1e-9)
    assert all(math.isnan(v) for v in SpatialMean().result().values())
    rows = ranked([{"lds": 0.1}, {"lds": math.nan}, {"lds": 0.5}])
    assert [r["lds"] for r in rows[:2]] == [0.5, 0.1] and math.isnan(rows[2]["lds"])


# ----------------------------------------------------------------------------------------- repa align --spatial


@pytest.fixture
def fake_run(monkeypatch, tmp_path):
    """A real tiny SiT (8x8 token grid) behind `run_align`'s loader, 12 smooth images, the patch encoder."""
    torch.manual_seed(0)
    model = build_model("SiT-T/2", input_size=16, hidden_size=32, depth=2, num_heads=2, num_classes=5).eval()
    repa_cfg = SimpleNamespace(encoders=[], encoder_layer=None, encoder_weights=None, encoder_resolution=98)
    loaded = SimpleNamespace(model=model, cfg=SimpleNamespace(repa=repa_cfg, transport=SimpleNamespace(path="linear")),
                             is_repa=False, run_dir=None, path=tmp_path / "ckpt",
                             info={"model_kwargs": {"depth": 2}, "step": 3, "ema": True})  # fmt: skip
    n = 12
    inputs = SimpleNamespace(images=_smooth_images(n), x=torch.randn(n, 4, 16, 16, generator=torch.Generator().manual_seed(1)),
                             labels=torch.arange(n) % 5)  # fmt: skip
    monkeypatch.setattr(run_mod, "_as_loaded", lambda *a, **k: loaded)
    monkeypatch.setattr(run_mod, "load_inputs", lambda *a, **k: inputs)
    monkeypatch.setattr("repa.encoders.load_encoder", _encoder)
    return SimpleNamespace(model=model, inputs=inputs)


def _align(tmp_path, **kw):
    return run_mod.run_align("ckpt", "enc", encoder_resolution=98, layers="1,2", times="0,0.5", num=12, k=3,
                             batch_size=5, seed=3, out_dir=tmp_path / "a", device=torch.device("cpu"), progress=False,
                             **kw)  # fmt: skip


def test_run_align_spatial_rows_equal_the_scores_of_the_same_features(fake_run, tmp_path):
    plain = _align(tmp_path, write=False)
    result = _align(tmp_path, spatial=True)
    cknna = [r for r in result["rows"] if r["metric"] == "cknna"]
    assert cknna == plain["rows"]  # the CKNNA table is unchanged
    spatial = [r for r in result["rows"] if r["metric"] in SPATIAL]
    assert {(r["layer"], r["t"], r["metric"]) for r in spatial} == {
        (layer, t, m) for layer in (1, 2) for t in (0.0, 0.5) for m in SPATIAL
    }
    assert all(r["target"] == "self" and math.isfinite(r["value"]) for r in spatial)
    # the same unpooled hidden states (same batches, same per-batch noise), scored directly
    hidden = collect_hidden_states(fake_run.model, fake_run.inputs.x.split(5), [1, 2], [0.0, 0.5], pool=None,
                                   seed=3)  # fmt: skip
    for r in spatial:
        assert r["value"] == pytest.approx(spatial_metrics(hidden[(r["layer"], r["t"])], (8, 8))[r["metric"]],
                                           rel=1e-6, abs=1e-9)  # fmt: skip
    # the encoder's own scores, on its 7x7 grid
    direct = spatial_metrics(_encoder_tokens("enc", fake_run.inputs.images), (7, 7))
    assert result["meta"]["target_spatial"] == pytest.approx(direct, rel=1e-6)
    saved = json.loads((tmp_path / "a" / "align.json").read_text())
    assert saved["meta"]["target_spatial"] == pytest.approx(direct, rel=1e-6)
    assert {r["metric"] for r in saved["rows"]} == {"cknna", *SPATIAL}
    assert (tmp_path / "a" / "align.csv").read_text().count("\n") == 1 + len(result["rows"])
    assert all((tmp_path / "a" / f"align-{m}.png").exists() for m in ("cknna", *SPATIAL))


def test_align_cli_prints_the_spatial_scores(fake_run, tmp_path, capsys):
    argv = ["align", "ckpt", "--encoder", "enc", "--encoder-resolution", "98", "--layers", "1", "--times", "0",
            "--num", "12", "--k", "3", "--spatial", "--out", str(tmp_path / "c"), "--no-progress"]  # fmt: skip
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    assert "[repa] cknna vs enc@98/final: max" in out
    assert "[repa] lds of the layers: max" in out and "(enc@98/final: " in out


def test_rank_encoders_without_a_model(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr("repa.encoders.load_encoder", _encoder)
    images = _smooth_images(10, side=98, seed=1)
    source = tmp_path / "images.npz"
    save_samples(source, images.permute(0, 2, 3, 1).numpy())
    argv = ["align", "--encoder", "shuffled,patch", "--encoder-layer", "final", "--encoder-resolution", "98",
            "--spatial", "--source", str(source), "--num", "10", "--out", str(tmp_path / "r"), "--no-progress"]  # fmt: skip
    assert cli_main(argv) == 0
    saved = json.loads((tmp_path / "r" / "spatial.json").read_text())
    rows = saved["rows"]
    assert [r["encoder"] for r in rows] == ["patch", "shuffled"]  # the structured tokens rank first by LDS
    assert rows[0]["lds"] > rows[1]["lds"] + 0.05
    assert rows[0]["rmsc"] == pytest.approx(rows[1]["rmsc"])  # a permutation keeps the contrast
    for r in rows:
        direct = spatial_metrics(_encoder_tokens(r["encoder"], images), (7, 7))
        assert {k: r[k] for k in SPATIAL} == pytest.approx(direct, rel=1e-6)
        assert all(np.isfinite(r[k]) for k in SPATIAL)
    assert saved["meta"]["num"] == 10 and (tmp_path / "r" / "spatial.csv").read_text().startswith("encoder,")
    assert "[repa] 1. patch@98:final  lds " in capsys.readouterr().out


def test_align_encoders_with_spatial_scores(monkeypatch, tmp_path):
    monkeypatch.setattr("repa.encoders.load_encoder", _encoder)
    images = _smooth_images(10, side=98, seed=2)
    source = tmp_path / "images.npz"
    save_samples(source, images.permute(0, 2, 3, 1).numpy())
    common = dict(resolution_a=98, resolution_b=98, source=source, num=10, k=3, device=torch.device("cpu"),
                  progress=False)  # fmt: skip
    plain = run_mod.run_align_encoders("patch", "shuffled", write=False, **common)
    result = run_mod.run_align_encoders("patch", "shuffled", out_dir=tmp_path / "e", spatial=True, **common)
    assert result["rows"] == plain["rows"] and "spatial" not in plain
    assert [(r["encoder"], r["layer"]) for r in result["spatial"]] == [("patch", "final"), ("shuffled", "final")]
    for r in result["spatial"]:
        direct = spatial_metrics(_encoder_tokens(r["encoder"], images), (7, 7))
        assert {k: r[k] for k in SPATIAL} == pytest.approx(direct, rel=1e-6)
    saved = json.loads((tmp_path / "e" / "align.json").read_text())
    assert saved["spatial"] == result["spatial"] and (tmp_path / "e" / "spatial.csv").exists()
