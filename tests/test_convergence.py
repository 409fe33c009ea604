"""Convergence benchmark: steps-to-reach and verdicts on constructed curves; a tiny end-to-end run (fake data,
stand-in encoder and detector) writes the CSV, markdown table, figure and summary."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import pytest
import torch
from benchmarks import convergence as C

from tests.helpers.tiny import PatchEncoder, write_idx_dataset

ROOT = Path(__file__).parents[1]


def test_steps_to_reach_grid_and_interpolated():
    steps = [100, 200, 300, 400]
    assert C.steps_to_reach(steps, [10, 6, 4, 3], 5.0) == (300, 250.0)  # 6 -> 4 crosses 5 halfway
    assert C.steps_to_reach(steps, [10, 6, 5, 3], 5.0) == (300, 300.0)  # equal counts as reached
    assert C.steps_to_reach(steps, [4, 3, 2, 1], 5.0) == (100, 100.0)  # nothing known before the first eval
    assert C.steps_to_reach(steps, [10, 9, 8, 7], 5.0) == (None, None)
    assert C.steps_to_reach(steps, [0.1, 0.5, 0.7, 0.8], 0.6, lower_is_better=False) == (300, 250.0)


def test_verdict_needs_difference_beyond_seed_spread():
    assert C.verdict([10.0, 12.0], [9.0, 9.5], lower_is_better=True).startswith("no result")  # diff 1.75 <= 2
    assert C.verdict([10.0, 11.0], [7.0, 7.5], lower_is_better=True).startswith("better")
    assert C.verdict([0.5, 0.52], [0.3, 0.31], lower_is_better=False).startswith("worse")
    assert C.verdict([10.0], [5.0], lower_is_better=True).startswith("no result (one seed")


def _rows(arm, seed, fids):
    return [{"arm": arm, "seed": seed, "step": 100 * (i + 1), "fid": f} for i, f in enumerate(fids)]


def test_speedup_on_constructed_curves():
    rows = (_rows("vanilla", 0, [40, 30, 22, 20]) + _rows("vanilla", 1, [41, 31, 23, 21])
            + _rows("repa", 0, [30, 19, 15, 12]) + _rows("repa", 1, [31, 20, 16, 13]))  # fmt: skip
    sp = C.speedup(rows, "repa")
    assert sp["target_fid"] == pytest.approx(20.5)
    assert sp["grid_step"] == 200 and sp["ratio_grid"] == pytest.approx(2.0)  # mean curve 30.5, 19.5 -> 200
    assert sp["interp_step"] == pytest.approx(100 + 100 * (30.5 - 20.5) / (30.5 - 19.5))
    assert sp["ratio_per_seed"] == {0: pytest.approx(2.0), 1: pytest.approx(2.0)}
    assert sp["verdict"] == "result"
    noisy = (
        _rows("vanilla", 0, [40, 30, 22, 20])
        + _rows("vanilla", 1, [41, 31, 23, 28])
        + _rows("repa", 0, [30, 19, 15, 19])
        + _rows("repa", 1, [31, 20, 16, 26])
    )
    assert C.speedup(noisy, "repa")["verdict"] == "no result"  # final difference 1.5 < seed spread 8


def test_iso_fid_speedups_at_every_vanilla_checkpoint():
    rows = _rows("vanilla", 0, [40, 30, 22, 20]) + _rows("repa", 0, [30, 19, 15, 25])
    curve = C.iso_fid_speedups(rows, "repa")
    assert [c["base_step"] for c in curve] == [100, 200, 300, 400]
    assert [c["target_fid"] for c in curve] == [40, 30, 22, 20]
    assert curve[0]["arm_step"] == 100 and curve[0]["ratio"] == 1.0  # reached at the first evaluation: a bound
    assert curve[1]["arm_step"] == 100 and curve[1]["ratio"] == 2.0
    assert [c["lower_bound"] for c in curve] == [True, True, False, False]
    assert curve[2]["arm_step"] == pytest.approx(100 + 100 * (30 - 22) / (30 - 19))
    assert curve[3]["arm_step"] == pytest.approx(100 + 100 * (30 - 20) / (30 - 19))  # first crossing, not the last
    assert curve[3]["ratio"] == pytest.approx(400 / curve[3]["arm_step"])
    assert C.iso_fid_speedups(_rows("vanilla", 0, [40, 30]) + _rows("repa", 0, [45, 41]), "repa")[1]["ratio"] is None


def test_parse_ablations():
    arms = C.parse_ablations(["depth=1,4", "kind=ntxent", "encoder=random-dinov2-vit-s"])
    assert [a.name for a in arms] == ["repa-depth1", "repa-depth4", "repa-ntxent", "repa-random-dinov2-vit-s"]
    assert arms[-1].overrides == ("repa.encoders=[random-dinov2-vit-s]",)
    assert len(C.parse_ablations(["all"])) == 6
    with pytest.raises(ValueError):
        C.parse_ablations(["width=3"])


class StandInDetector:
    """8 pooled pixel statistics instead of Inception features."""

    name = "test-stand-in-detector"

    def features(self, images):
        x = images.float().mean(1, keepdim=True)  # (B, 1, H, W)
        pooled = torch.nn.functional.adaptive_avg_pool2d(x, (2, 2)).flatten(1)
        return {"pool": torch.cat([pooled, pooled.sqrt()], dim=1)}


def test_tiny_benchmark_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("REPA_CACHE", str(tmp_path / "cache"))
    root = write_idx_dataset(tmp_path / "fmnist", num=40)
    write_idx_dataset(root, num=40, seed=1, split="test")
    monkeypatch.setattr("repa.training.setup.build_encoders", lambda cfg, device: [PatchEncoder(98)])
    monkeypatch.setattr("repa.encoders.load_encoder", lambda *a, **k: PatchEncoder(98))  # the CKNNA targets' encoder
    monkeypatch.setattr(C.evaluate, "make_detector", lambda device: StandInDetector())
    preset = C.Preset(steps=4, eval_every=2, batch_size=8, num_train=None, fid_samples=20, fid_reference=20,
                      sample_steps=2, probe_train=20, probe_test=20, probe_epochs=2, seeds=(0, 1), workers=1,
                      threads=1, device="cpu", eval_batch=10)  # fmt: skip
    overrides = ["model.hidden_size=32", "model.depth=2", "model.num_heads=2", "model.align_depth=1",
                 "model.projector_dim=32", "sample.num_steps=2", "train.log_every=1"]  # fmt: skip
    out = tmp_path / "bench"
    threads = torch.get_num_threads()
    kwargs = dict(out=out, config=str(ROOT / "configs/tiny.yaml"), overrides=overrides, data_root=str(root),
                  ablations=[C.Arm("repa-depth2", ("model.align_depth=2",))])  # fmt: skip
    summary = C.run_benchmark(preset, **kwargs)
    assert torch.get_num_threads() == threads  # the caller's thread count is restored

    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 * 2 * 2  # arms x seeds x evaluated steps
    assert {(r["arm"], r["seed"], r["step"]) for r in rows} == {
        (a, str(s), str(t)) for a in ("vanilla", "repa", "repa-depth2") for s in (0, 1) for t in (2, 4)
    }
    for col in ("fid", "probe_acc", "cknna", "probe_acc_l1", "cknna_l2", "denoise", "eval_s"):
        assert all(r[col] != "" for r in rows), col
    assert all(float(r["fid"]) >= 0 and 0 <= float(r["probe_acc"]) <= 1 for r in rows)
    md = (out / "results.md").read_text()
    assert "## Steps to reach vanilla's final FID" in md and "| repa | " in md and "| repa-depth2 | " in md
    assert md.count("verdict (FID)") == 3 and "At its own alignment block 2" in md  # vs vanilla x2, vs repa
    assert "## repa-depth2 vs repa" in md and "**Speed-up at every vanilla checkpoint**" in md
    assert summary["arms"]["repa-depth2"]["fid_vs_repa"]["final_verdict"]
    assert [c["base_step"] for c in summary["arms"]["repa"]["iso_fid_speedups"]] == [2, 4]
    assert (out / "convergence.png").stat().st_size > 0
    assert set(summary["arms"]) == {"repa", "repa-depth2"}
    assert {"ratio_grid", "ratio_per_seed", "verdict"} <= set(summary["arms"]["repa"]["speedup"])

    # rerunning reuses the finished runs and evaluations; a different budget in the same folder is refused
    before = (out / "results.csv").read_text()
    C.run_benchmark(preset, **kwargs)
    assert (out / "results.csv").read_text() == before
    with pytest.raises(ValueError, match="other settings"):
        C.run_benchmark(dataclasses.replace(preset, fid_samples=30), **kwargs)
