"""The REPA family through the training loop: each option trains the tiny preset and `repa sample` works on the
result; a run with the options on resumes bit-identically; the schedule's weight is logged; SRA runs with no
encoder at all."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from repa.checkpoint import load_checkpoint
from repa.cli.main import main as cli_main
from repa.config import ConfigError, load_config
from repa.encoders import load_encoder
from repa.training import train
from tests.helpers.tiny import PatchEncoder, launch_training, metrics, tiny_overrides

ROOT = Path(__file__).parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
TINY_DINOV2 = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
ONLINE = ("repa.cache_targets=false",)

pytestmark = pytest.mark.usefixtures("isolated_cache")


def tiny_dinov2(cfg, device):
    """A random-weight DINOv2 of the real architecture (2 layers): it has a CLS token and attention maps."""
    return [load_encoder("random-dinov2-vit-s", 98, random_init=True, config_overrides=TINY_DINOV2)]


OPTIONS = {
    "conv-projector": ("model.projector=conv", "model.projector_kernel=3"),
    "spatial-norm": ("repa.spatial_norm=true",),
    "schedule-stop": ("repa.schedule=stop", "repa.schedule_stop=2"),
    "schedule-cosine": ("repa.schedule=cosine", "repa.schedule_start=1", "repa.schedule_stop=3"),
    "attention-align": ("repa.attention_align=true", "repa.attention_pairs=[[1,1],[2,2]]", *ONLINE),
    "class-token": ("repa.class_token=true", *ONLINE),
    "self-align": ("repa.self_align=true", "repa.self_align_blocks=[1,2]"),
    "self-align-no-encoder": ("repa.self_align=true", "repa.self_align_blocks=[1,2]", "repa.encoders=[]"),
    "ntxent-irepa": ("repa.align_kind=ntxent", "model.projector=conv", "repa.spatial_norm=true"),
}


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_each_option_trains_and_samples(name, tmp_path, fmnist_root, monkeypatch):
    monkeypatch.setattr("repa.training.setup.build_encoders", tiny_dinov2)
    run = tmp_path / "run"
    over = tiny_overrides(run, fmnist_root, "train.max_steps=4", "train.checkpoint_every=4", *OPTIONS[name])
    train(load_config(TINY, over))
    records = metrics(run)
    assert len(records) == 4 and all(torch.isfinite(torch.tensor(r["total"])) for r in records)
    terms = set(records[-1])
    if name == "attention-align":
        assert "align_attn" in terms
    if name == "class-token":
        assert "class_token" in terms
    if name.startswith("self-align"):
        assert "self_align" in terms
    if name == "self-align-no-encoder":
        assert records[-1]["align"] == 0.0  # no external encoder: the self-alignment is the only extra term
    if name == "schedule-stop":  # lambda x 1 for steps 0, 1; x 0 from step 2 on (a function of the step only)
        assert [r["align_weight"] for r in records] == [1.0, 1.0, 0.0, 0.0]
    assert cli_main(["sample", str(run), "--num", "4", "--steps", "2", "--out", str(tmp_path / "samples")]) == 0
    assert len(list((tmp_path / "samples").glob("*.npz"))) == 1


def test_after_the_schedule_stop_the_online_encoder_does_not_run(tmp_path, fmnist_root, monkeypatch):
    """HASTE's stop: steps 0, 1 run the encoder (tokens and attention maps); from step 2 on it does not, and the
    scheduled terms log 0."""
    calls = []

    def counted(cfg, device):
        (enc,) = tiny_dinov2(cfg, device)
        encode = enc.encode
        enc.encode = lambda *a, **k: calls.append(1) or encode(*a, **k)
        return [enc]

    monkeypatch.setattr("repa.training.setup.build_encoders", counted)
    run = tmp_path / "run"
    over = tiny_overrides(run, fmnist_root, "train.max_steps=4", "train.checkpoint_every=4", *OPTIONS["schedule-stop"],
                          *OPTIONS["attention-align"])  # fmt: skip
    train(load_config(TINY, over))
    records = metrics(run)
    assert len(calls) == 2 and [r["align_weight"] for r in records] == [1.0, 1.0, 0.0, 0.0]
    assert all(r["align"] != 0.0 and r["align_attn"] != 0.0 for r in records[:2])
    assert all(r["align"] == 0.0 and r["align_attn"] == 0.0 for r in records[2:])


@pytest.mark.multiproc
def test_after_the_schedule_stop_ddp_still_finds_every_parameter_used(tmp_path, fmnist_root):
    """Past the stop the alignment is not computed, yet the projector stays in the graph: DDP (which looks for
    parameters without gradient) trains on 2 processes as on 1."""
    runs = {n: tmp_path / f"run{n}" for n in (1, 2)}
    for n, run in runs.items():
        launch_training(tmp_path, n, tiny_overrides(run, fmnist_root, "train.max_steps=4", *OPTIONS["schedule-stop"]))
    m1, m2 = metrics(runs[1]), metrics(runs[2])
    assert [r["align"] == 0.0 for r in m2] == [False, False, True, True]
    for a, b in zip(m1, m2):
        assert a["denoise"] == pytest.approx(b["denoise"], rel=1e-4, abs=1e-6)


def test_resume_with_the_options_on_is_bit_identical(tmp_path, fmnist_root, monkeypatch):
    """Kill-free version of the resume contract: 2 + 2 steps equal 4 steps with every draw-using option on
    (REG's class-token noise and SRA's time gaps come from their own per-step streams)."""
    monkeypatch.setattr("repa.training.setup.build_encoders", tiny_dinov2)
    on = ("repa.class_token=true", "repa.self_align=true", "repa.self_align_blocks=[1,2]", "repa.schedule=linear",
          "repa.schedule_stop=3", "model.projector=conv", "repa.spatial_norm=true", *ONLINE)  # fmt: skip
    full, part = tmp_path / "full", tmp_path / "part"
    train(load_config(TINY, tiny_overrides(full, fmnist_root, "train.max_steps=4", "train.checkpoint_every=2", *on)))
    train(load_config(TINY, tiny_overrides(part, fmnist_root, "train.max_steps=2", "train.checkpoint_every=2", *on)))
    train(load_config(TINY, tiny_overrides(part, fmnist_root, "train.max_steps=4", "train.checkpoint_every=2", *on)))
    a, b = (load_checkpoint(r / "checkpoints" / "step_00000004") for r in (full, part))
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys() and all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("images_per_s", "peak_memory_gb")} for r in rs]  # noqa: E731
    assert strip(metrics(full)) == strip(metrics(part))


def test_options_that_need_the_encoder_online_say_so(tmp_path, fmnist_root):
    # HASTE's attention maps are not cached; REG's global token is (tests/test_reg_cache.py)
    with pytest.raises(ConfigError, match="repa.cache_targets=false"):
        load_config(TINY, tiny_overrides(tmp_path, fmnist_root, "repa.attention_align=true",
                                         "repa.attention_pairs=[[1,1]]"))  # fmt: skip
    load_config(TINY, tiny_overrides(tmp_path, fmnist_root, "repa.class_token=true"))


def test_a_patch_encoder_without_attention_maps_is_refused_clearly(tmp_path, fmnist_root, monkeypatch):
    monkeypatch.setattr("repa.training.setup.build_encoders", lambda cfg, device: [PatchEncoder(98)])
    over = tiny_overrides(tmp_path / "run", fmnist_root, "repa.attention_align=true", "repa.attention_pairs=[[1,1]]",
                          *ONLINE)  # fmt: skip
    with pytest.raises(ValueError, match="attention"):
        train(load_config(TINY, over))
