"""Convergence benchmark: steps-to-reach and verdicts on constructed curves; a tiny end-to-end run (fake data,
stand-in encoder and detector) writes the CSV, markdown table, figure and summary."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from benchmarks import convergence
from safetensors.torch import load_file

from tests.helpers.tiny import PatchEncoder, write_idx_dataset

ROOT = Path(__file__).parents[1]


def test_steps_to_reach_grid_and_interpolated():
    steps = [100, 200, 300, 400]
    assert convergence.steps_to_reach(steps, [10, 6, 4, 3], 5.0) == (300, 250.0)  # 6 -> 4 crosses 5 halfway
    assert convergence.steps_to_reach(steps, [10, 6, 5, 3], 5.0) == (300, 300.0)  # equal counts as reached
    assert convergence.steps_to_reach(steps, [4, 3, 2, 1], 5.0) == (100, 100.0)  # nothing known before the first eval
    assert convergence.steps_to_reach(steps, [10, 9, 8, 7], 5.0) == (None, None)
    assert convergence.steps_to_reach(steps, [0.1, 0.5, 0.7, 0.8], 0.6, lower_is_better=False) == (300, 250.0)


def test_verdict_needs_difference_beyond_seed_spread():
    assert convergence.verdict([10.0, 12.0], [9.0, 9.5], lower_is_better=True).startswith("no result")  # diff 1.75 <= 2
    assert convergence.verdict([10.0, 11.0], [7.0, 7.5], lower_is_better=True).startswith("better")
    assert convergence.verdict([0.5, 0.52], [0.3, 0.31], lower_is_better=False).startswith("worse")
    assert convergence.verdict([10.0], [5.0], lower_is_better=True).startswith("no result (one seed")


def _rows(arm, seed, fids):
    return [{"arm": arm, "seed": seed, "step": 100 * (i + 1), "fid": f} for i, f in enumerate(fids)]


def test_speedup_on_constructed_curves():
    rows = (_rows("vanilla", 0, [40, 30, 22, 20]) + _rows("vanilla", 1, [41, 31, 23, 21])
            + _rows("repa", 0, [30, 19, 15, 12]) + _rows("repa", 1, [31, 20, 16, 13]))  # fmt: skip
    sp = convergence.speedup(rows, "repa")
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
    assert convergence.speedup(noisy, "repa")["verdict"] == "no result"  # final difference 1.5 < seed spread 8


def test_iso_fid_speedups_at_every_vanilla_checkpoint():
    rows = _rows("vanilla", 0, [40, 30, 22, 20]) + _rows("repa", 0, [30, 19, 15, 25])
    curve = convergence.iso_fid_speedups(rows, "repa")
    assert [c["base_step"] for c in curve] == [100, 200, 300, 400]
    assert [c["target_fid"] for c in curve] == [40, 30, 22, 20]
    assert curve[0]["arm_step"] == 100 and curve[0]["ratio"] == 1.0  # reached at the first evaluation: a bound
    assert curve[1]["arm_step"] == 100 and curve[1]["ratio"] == 2.0
    assert [c["lower_bound"] for c in curve] == [True, True, False, False]
    assert curve[2]["arm_step"] == pytest.approx(100 + 100 * (30 - 22) / (30 - 19))
    assert curve[3]["arm_step"] == pytest.approx(100 + 100 * (30 - 20) / (30 - 19))  # first crossing, not the last
    assert curve[3]["ratio"] == pytest.approx(400 / curve[3]["arm_step"])
    never = _rows("vanilla", 0, [40, 30]) + _rows("repa", 0, [45, 41])
    assert convergence.iso_fid_speedups(never, "repa")[1]["ratio"] is None


def test_parse_ablations():
    arms = convergence.parse_ablations(["depth=1,4", "kind=ntxent", "encoder=random-dinov2-vit-s"])
    assert [a.name for a in arms] == ["repa-depth1", "repa-depth4", "repa-ntxent", "repa-random-dinov2-vit-s"]
    assert arms[-1].overrides == ("repa.encoders=[random-dinov2-vit-s]",)
    assert len(convergence.parse_ablations(["all"])) == 6
    with pytest.raises(ValueError):
        convergence.parse_ablations(["width=3"])
    with pytest.raises(ValueError, match="unknown method"):
        convergence.parse_ablations(["method=repa-x"])
    board = convergence.parse_ablations(["leaderboard"])
    assert [a.name for a in board] == [
        "irepa",
        "haste",
        "reg",
        "sra",
        "repa-ntxent",
        "repa-depth4",
        "ntxent-depth4",
        "irepa-ntxent",
    ]


def test_method_arms_resolve_to_valid_configs(tmp_path):
    """Every REPA-family arm gives a config that loads and validates; HASTE stops at half the preset's budget."""
    from benchmarks.convergence.jobs import Job

    preset = convergence.PRESETS["cpu"]
    for arm in convergence.parse_ablations(["method=irepa,haste,reg,sra,ntxent-depth4,irepa-ntxent"]):
        job = Job(arm, 0, preset, str(ROOT / "configs/tiny.yaml"), (), str(tmp_path), None, (2,))
        cfg = job.train_config()
        if arm.name == "haste":
            assert cfg.repa.schedule == "stop" and cfg.repa.schedule_stop == preset.steps // 2
            assert cfg.repa.attention_align and cfg.repa.attention_pairs == [[1, 7], [2, 8]]
        if arm.name == "irepa":
            assert cfg.model.projector == "conv" and cfg.repa.spatial_norm and cfg.repa.align_coeff == 1.0
        if arm.name == "sra":
            assert cfg.repa.encoders == [] and cfg.repa.self_align
        if arm.name == "reg":
            assert cfg.repa.class_token
        if arm.name == "ntxent-depth4":
            assert cfg.repa.align_kind == "ntxent" and cfg.model.align_depth == 4
        if arm.name == "irepa-ntxent":
            assert cfg.model.projector == "conv" and cfg.repa.spatial_norm and cfg.repa.align_kind == "ntxent"
    latent = ("data.space=latent", "data.vae=random:tiny", "model.name=SiT-T/2")  # REPA-E: latent space only
    (arm,) = convergence.parse_ablations(["method=repa-e"])
    cfg = Job(arm, 0, preset, str(ROOT / "configs/tiny.yaml"), latent, str(tmp_path), None, (2,)).train_config()
    assert cfg.train.end_to_end and cfg.data.space == "latent"


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
    monkeypatch.setattr(convergence.evaluate, "make_detector", lambda device: StandInDetector())
    preset = convergence.Preset(steps=4, eval_every=2, batch_size=8, num_train=None, fid_samples=20, fid_reference=20,
                      sample_steps=2, probe_train=20, probe_test=20, probe_epochs=2, seeds=(0, 1), workers=1,
                      threads=1, device="cpu", eval_batch=10)  # fmt: skip
    overrides = ["model.hidden_size=32", "model.depth=2", "model.num_heads=2", "model.align_depth=1",
                 "model.projector_dim=32", "sample.num_steps=2", "train.log_every=1"]  # fmt: skip
    out = tmp_path / "bench"
    threads = torch.get_num_threads()
    kwargs = dict(out=out, config=str(ROOT / "configs/tiny.yaml"), overrides=overrides, data_root=str(root),
                  ablations=[convergence.Arm("repa-depth2", ("model.align_depth=2",))])  # fmt: skip
    summary = convergence.run_benchmark(preset, **kwargs)
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
    board = md[md.index("## Leaderboard") : md.index("## Steps to reach")].splitlines()
    table = [line for line in board if line.startswith("| ")]
    assert [line.split(" | ")[0] for line in table[1:]] == ["| vanilla", "| repa", "| repa-depth2"]
    assert table[0].count("FID @ ") == 2 and "speed-up vs repa" in table[0] and "train s/step" in table[0]
    assert all(line.count(" | ") == table[0].count(" | ") for line in table)
    assert "**Speed-up at every repa checkpoint**" in md
    assert [c["base_step"] for c in summary["arms"]["repa-depth2"]["iso_fid_speedups_vs_repa"]] == [2, 4]
    assert [c["base_step"] for c in summary["arms"]["repa"]["iso_fid_speedups"]] == [2, 4]
    assert (out / "convergence.png").stat().st_size > 0
    assert set(summary["arms"]) == {"vanilla", "repa", "repa-depth2"}  # vanilla: its speed-up vs repa only
    assert set(summary["arms"]["vanilla"]) == {"speedup_vs_repa"}
    assert {"ratio_grid", "ratio_per_seed", "verdict"} <= set(summary["arms"]["repa"]["speedup"])

    # rerunning reuses the finished runs and evaluations; a different budget in the same folder is refused
    before = (out / "results.csv").read_text()
    convergence.run_benchmark(preset, **kwargs)
    assert (out / "results.csv").read_text() == before

    # --report: the finished runs only (nothing trained); an unfinished one is listed, and its arm keeps its other seed
    last = out / "runs" / "repa-depth2-seed1" / "evals" / "step_00000004.json"
    kept = last.read_text()
    last.unlink()
    partial = convergence.run_benchmark(preset, **kwargs, report_only=True)
    assert partial["remaining"] == ["repa-depth2-seed1"] and not last.exists()
    with open(out / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 3 * 2 * 2 - 2
    assert (
        "Not finished yet" in (out / "results.md").read_text()
        and "| repa-depth2 | 1 |" in (out / "results.md").read_text()
    )
    last.write_text(kept)
    # --rows-from: a new folder takes the runs of a report's results.csv as finished; their rows come back unchanged
    (tmp_path / "earlier.csv").write_text(before)
    imported = convergence.run_benchmark(preset, **{**kwargs, "out": tmp_path / "fresh"}, report_only=True,
                                         rows_from=tmp_path / "earlier.csv")  # fmt: skip
    assert imported["remaining"] == [] and (tmp_path / "fresh" / "results.csv").read_text() == before
    with pytest.raises(FileNotFoundError, match="no benchmark to report"):
        convergence.run_benchmark(preset, **{**kwargs, "out": tmp_path / "none"}, report_only=True)
    with pytest.raises(ValueError, match="other settings"):
        convergence.run_benchmark(dataclasses.replace(preset, fid_samples=30), **kwargs)

    # --time-steps: every arm timed side by side (real loop, fresh runs, 2 rounds); the report then uses those s/step
    # (an arm whose alignment stops inside the budget is timed before and after the stop, weighted by their steps)
    stop = convergence.Arm("repa-stop1", ("repa.schedule=stop", "repa.schedule_stop=1"))
    timed = convergence.time_arms(preset, [*kwargs["ablations"], stop], out=out, config=kwargs["config"],
                                  overrides=overrides, data_root=str(root), steps=3, rounds=2)  # fmt: skip
    assert torch.get_num_threads() == threads
    assert set(timed["arms"]) == {"vanilla", "repa", "repa-depth2", "repa-stop1"}
    for name, v in timed["arms"].items():  # 3 steps -> one window of 5 after the dropped warm-up window, per round
        phases = v["phases"].values()
        assert list(v["phases"]) == (["aligned", "after-stop"] if name == "repa-stop1" else ["aligned"])
        assert [ph["steps"] for ph in phases] == ([1, 3] if name == "repa-stop1" else [4])
        for ph in phases:
            assert len(ph["windows"]) == 2 and all(w > 0 for w in ph["windows"])
            assert ph["s_per_step"] == pytest.approx(sum(ph["windows"]) / 2)
        assert v["s_per_step"] == pytest.approx(sum(ph["steps"] * ph["s_per_step"] for ph in phases) / 4)
    assert json.loads((out / "step_times.json").read_text())["arms"] == timed["arms"]
    convergence.run_benchmark(preset, **kwargs, report_only=True)
    md = (out / "results.md").read_text()
    assert "train s/step (timed side by side: `--time-steps`" in md
    for arm in ("vanilla", "repa", "repa-depth2"):  # the report's arms (repa-stop1 was timed only)
        assert f"| {arm} | {timed['arms'][arm]['s_per_step']:.3f} |" in md
    with pytest.raises(ValueError, match="at least one step"):
        convergence.time_arms(preset, [], out=out, config=kwargs["config"], steps=0)


def _fake_focus_weights(path: Path) -> Path:
    """A small state dict named like a 12-block Dinov2Model (the bundle keeps blocks 1..8 of it)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    state = {f"encoder.layer.{i}.mlp.fc1.weight": torch.randn(4, 3, generator=g) for i in range(12)}
    state.update({"embeddings.cls_token": torch.randn(1, 1, 3, generator=g), "layernorm.weight": torch.ones(3)})
    save_file(state, str(path))
    return path


def test_bundle_offline_run_and_deferred_scoring_match_the_online_run(tmp_path, monkeypatch):
    """Bundle a tiny preset, run from it with an empty repa cache, offline and without network, score the packed
    samples afterwards: the report's FIDs, probe and CKNNA equal those of a run that scored online."""
    monkeypatch.setenv("REPA_CACHE", str(tmp_path / "cache"))
    root = write_idx_dataset(tmp_path / "fmnist", num=60)  # 6 per class: the bundle keeps the first 3 (train)
    write_idx_dataset(root, num=60, seed=1, split="test")  # and the first 2 (test)
    monkeypatch.setattr("repa.training.setup.build_encoders", lambda cfg, device: [PatchEncoder(98)])
    monkeypatch.setattr("repa.encoders.load_encoder", lambda *a, **k: PatchEncoder(98))
    monkeypatch.setattr(convergence.evaluate, "make_detector", lambda device: StandInDetector())
    focus = _fake_focus_weights(tmp_path / "focus.safetensors")
    monkeypatch.setattr(convergence.bundle, "encoder_source", lambda name: focus)
    monkeypatch.setattr(convergence.bundle, "installed_names", lambda state: state)  # not a real Dinov2 state dict
    preset = convergence.Preset(steps=4, eval_every=2, batch_size=8, num_train=30, fid_samples=20, fid_reference=20,
                                sample_steps=2, probe_train=20, probe_test=20, probe_epochs=2, seeds=(0, 1),
                                workers=1, threads=1, device="cpu", eval_batch=10)  # fmt: skip
    overrides = ["model.hidden_size=32", "model.depth=2", "model.num_heads=2", "model.align_depth=1",
                 "model.projector_dim=32", "sample.num_steps=2", "train.log_every=1"]  # fmt: skip
    config = str(ROOT / "configs/tiny.yaml")
    convergence.run_benchmark(preset, out=tmp_path / "online", config=config, overrides=overrides, data_root=str(root))

    bundle = tmp_path / "bundle"
    manifest = convergence.bundle.build_bundle(preset, bundle, config=config, overrides=overrides, data_root=str(root))
    assert manifest["data"]["train"] == {"per_class": 3, "images": 30, "split_size": 60}
    assert manifest["data"]["test"] == {"per_class": 2, "images": 20, "split_size": 60}
    enc = manifest["encoders"]["dinov2-vit-s-focus"]
    assert enc["layer"] == 8 and sorted(enc["dropped"]) == [f"encoder.layer.{i}.mlp.fc1.weight" for i in (10, 11, 8, 9)]
    assert not manifest["inception"]["packed"]
    with pytest.raises(ValueError, match="not empty"):
        convergence.bundle.build_bundle(preset, bundle, config=config, overrides=overrides, data_root=str(root))

    # offline: an empty repa cache, no hub, no pip, no download, no other Fashion-MNIST folder
    empty = tmp_path / "empty-cache"
    empty.mkdir()
    monkeypatch.setenv("REPA_CACHE", str(empty))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("REPA_DATA", raising=False)
    monkeypatch.setattr("repa.data.fashion_mnist.DEBIAN_DIR", tmp_path / "no-such-dir")

    def no_network(*args, **kwargs):
        raise AssertionError(f"network or subprocess used offline: {args}")

    monkeypatch.setattr("urllib.request.urlopen", no_network)
    monkeypatch.setattr("subprocess.run", no_network)
    offline = tmp_path / "offline"
    assert convergence.main(["--from-bundle", str(bundle), "--out", str(offline)]) == 0  # the bundle's own preset
    assert not any(empty.iterdir())
    restored = load_file(str(offline / "repa-cache" / "weights" / "dinov2-vit-s-focus.safetensors"))
    original = load_file(str(focus))
    assert set(restored) == set(original) and all(v.dtype == torch.float32 for v in restored.values())
    block8 = "encoder.layer.7.mlp.fc1.weight"  # 0-indexed names: block 8 is layer.7
    assert torch.equal(restored[block8], original[block8].half().float())
    assert not restored["encoder.layer.8.mlp.fc1.weight"].any()  # never run (the encoder stops after block 8)
    pack = offline / "deferred"
    desc = json.loads((pack / "deferred.json").read_text())
    assert len(desc["rows"]) == 2 * 2 * 2 and all(r["fid"] is None for r in desc["rows"])
    assert sorted(p.name for p in pack.glob("samples-*.npz")) == [
        "samples-repa-seed0.npz", "samples-repa-seed1.npz", "samples-vanilla-seed0.npz", "samples-vanilla-seed1.npz"
    ]  # fmt: skip
    with pytest.raises(ValueError, match="needs"):  # more images than the bundle holds
        convergence.bundle.run_from_bundle(bundle, dataclasses.replace(preset, num_train=40), out=tmp_path / "more")

    # a run stopped by its time limit (SIGINT) still packs the evaluations that finished
    real_run_job, calls = convergence.jobs.run_job, []

    def stopped_after_one_job(job):
        calls.append(job)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return real_run_job(job)

    monkeypatch.setattr(convergence.jobs, "run_job", stopped_after_one_job)
    with pytest.raises(KeyboardInterrupt):
        convergence.bundle.run_from_bundle(bundle, preset, out=tmp_path / "stopped")
    stopped = json.loads((tmp_path / "stopped" / "deferred" / "deferred.json").read_text())
    assert stopped["unfinished"] and [(r["arm"], r["seed"], r["step"]) for r in stopped["rows"]] == [
        ("vanilla", 0, 2), ("vanilla", 0, 4)
    ]  # fmt: skip
    monkeypatch.setattr(convergence.jobs, "run_job", real_run_job)

    # scoring elsewhere (a machine with the Inception network and a repa cache)
    monkeypatch.setenv("REPA_CACHE", str(tmp_path / "cache"))
    scored = tmp_path / "scored"
    assert convergence.main(["--score-samples", str(pack), "--from-bundle", str(bundle), "--out", str(scored)]) == 0
    with open(tmp_path / "online" / "results.csv") as f:
        online_rows = list(csv.DictReader(f))
    with open(scored / "results.csv") as f:
        scored_rows = list(csv.DictReader(f))
    assert list(online_rows[0]) == list(scored_rows[0])  # the same columns, in the same order
    timing = {"eval_s", "eval_cpu_s", "train_images_per_s"}
    assert [{k: v for k, v in r.items() if k not in timing} for r in scored_rows] == [
        {k: v for k, v in r.items() if k not in timing} for r in online_rows
    ]  # the same FIDs, probe accuracies, CKNNA and losses, bit for bit
    assert (scored / "convergence.png").stat().st_size > 0
    assert "## Steps to reach" in (scored / "results.md").read_text()
    assert len(list((scored / "fid").glob("*.json"))) == 8  # per-evaluation FIDs: a rerun resumes
    with pytest.raises(ValueError, match="differ from the bundle"):  # other reference images are refused
        other = write_idx_dataset(tmp_path / "other", num=60, seed=5, split="test")
        convergence.deferred.score(pack, tmp_path / "scored2", data_root=str(other))


@pytest.mark.slow  # builds the 22M-parameter encoder once (transformers import and init: ~10-40 s on 2 cores)
def test_bundled_encoder_weights_load_offline(tmp_path, monkeypatch):
    """The real loader reads the restored float16 focus weights (blocks 1..8) from the private cache, offline, also
    when the bundle was built under the other transformers naming of the attention (query/key/value/output.dense
    before ~5.2x, q/k/v/o_proj after): the GPU machine's transformers may differ from the builder's."""
    from safetensors.torch import save_file

    from repa.encoders import load_encoder
    from repa.encoders.focus import _RENAME, build_focus_model

    with torch.device("meta"):  # the architecture's names and shapes; random values (a real init takes seconds)
        shapes = {k: v.shape for k, v in build_focus_model().state_dict().items()}
    g = torch.Generator().manual_seed(0)
    original = {k: torch.randn(shape, generator=g) * 0.02 for k, shape in shapes.items()}

    def other_naming(key: str) -> str:
        for old, new in _RENAME.items():
            key = key.replace(f".{new}.", f".{old}.") if f".{new}." in key else key.replace(f".{old}.", f".{new}.")
        return key

    src = tmp_path / "focus.safetensors"
    save_file({other_naming(k): v for k, v in original.items()}, str(src))
    assert set(load_file(str(src))) != set(original)  # the bundle holds the other naming
    entry = convergence.bundle.pack_encoder(src, tmp_path / "packed.safetensors", layer=8)
    assert {k.split(".")[2] for k in entry["dropped"]} == {"8", "9", "10", "11"}
    assert (tmp_path / "packed.safetensors").stat().st_size < 0.36 * src.stat().st_size  # half precision, 8/12 blocks
    cache = tmp_path / "cache"
    convergence.bundle.restore_encoder(tmp_path, "dinov2-vit-s-focus", {**entry, "file": "packed.safetensors"}, cache)
    monkeypatch.setenv("REPA_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("subprocess.run", lambda *a, **k: pytest.fail("pip run offline"))
    encoder = load_encoder("dinov2-vit-s-focus", 98, layer=8)  # strict load of the full-shape state dict
    loaded = encoder.model.state_dict()
    assert len(encoder.model.encoder.layer) == 8 and set(loaded) == {k for k in original if not k.startswith(
        tuple(f"encoder.layer.{i}." for i in (8, 9, 10, 11)))}  # fmt: skip
    assert all(torch.equal(v, original[k].half().float()) for k, v in loaded.items())
    with torch.no_grad():
        tokens = encoder(torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8))
    assert tokens.shape == (2, 49, 384) and bool(torch.isfinite(tokens).all())


def test_latent_arms_are_probed_on_their_vaes_latents():
    """`evaluate.model_inputs`: pixels for pixel arms; for latent arms (frozen VAE, or REPA-E's tuned one) the
    normalised posterior mean of the run's VAE, as the model was trained to see clean images."""
    from types import SimpleNamespace

    from benchmarks.convergence.evaluate import model_inputs

    from repa.data.vae_spec import load_vae

    images = torch.randint(0, 256, (5, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    pixel = SimpleNamespace(vae=lambda: None)
    assert torch.equal(model_inputs(pixel, images, 2, torch.device("cpu")), images.float() / 127.5 - 1)
    latent = SimpleNamespace(vae=lambda: "random:tiny")
    x = model_inputs(latent, images, 2, torch.device("cpu"))
    vae = load_vae("random:tiny")
    mean, _ = vae.encode_moments((images.float() / 127.5 - 1).expand(-1, 3, -1, -1))
    assert x.shape == (5, 4, 14, 14) and torch.allclose(x, vae.normalize(mean), atol=1e-6)
