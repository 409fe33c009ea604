"""`model.init_from`: `repa train` starts a fresh run from an official REPA `last.pt`, a public SiT checkpoint or a repa
run (its backbone at step 0 is the checkpoint's, strictly), from the Python API and the CLI override syntax; the
source is recorded (path, sha256); a missing or misfitting file is one line naming the key; on resume the run's
checkpoint wins."""

from __future__ import annotations

import argparse
import hashlib
import json
import re
from pathlib import Path

import pytest
import torch

from repa.checkpoint import latest_checkpoint, load_checkpoint
from repa.cli.main import main as cli_main
from repa.config import ConfigError, load_config
from repa.convert import repa_to_sit_state_dict, sit_to_repa_state_dict
from repa.models import DiffusionTransformer
from repa.training import train
from repa.training.finetune import RECORD
from tests.helpers.tiny import tiny_overrides

ROOT = Path(__file__).parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
# the model of `tiny_overrides` on Fashion-MNIST (1 channel, 28 px, 10 classes) with the test encoder (16 wide)
TINY_MODEL = dict(input_size=28, patch_size=4, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=10,
                  align_depth=1, projector_dim=32)  # fmt: skip

pytestmark = pytest.mark.usefixtures("isolated_cache", "test_encoder")


def _random(seed: int, **kw) -> DiffusionTransformer:
    """Random weights everywhere (the official init zeroes adaLN and the final layer)."""
    model = DiffusionTransformer(**{**TINY_MODEL, **kw})
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def _official_last_pt(path: Path, encoder_dim: int = 16) -> dict[str, torch.Tensor]:
    """REPA's train.py checkpoint layout (model, ema, opt, args); returns the EMA weights (what fine-tuning reads)."""
    model, ema = _random(1, encoder_dims=[encoder_dim]), _random(2, encoder_dims=[encoder_dim])
    args = argparse.Namespace(model="SiT-T/4", encoder_depth=1, enc_type="dinov2-vit-b", proj_coeff=0.5)
    torch.save({"model": model.state_dict(), "ema": ema.state_dict(),
                "opt": torch.optim.AdamW(model.parameters()).state_dict(), "args": args, "steps": 10}, path)  # fmt: skip
    return ema.state_dict()


@pytest.fixture
def step0(monkeypatch):
    """The model's weights at step 0 (when the EMA copies it), captured from inside `train`."""
    import repa.training.loop as loop

    seen: dict[str, dict[str, torch.Tensor]] = {}
    real = loop.EMA

    def spy(model, *args, **kwargs):
        seen["state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return real(model, *args, **kwargs)

    monkeypatch.setattr(loop, "EMA", spy)
    return seen


def _assert_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], keys) -> None:
    for k in keys:
        assert torch.equal(got[k], want[k]), k


def test_official_last_pt_through_the_python_api(tmp_path, fmnist_root, step0, capsys):
    ckpt = tmp_path / "last.pt"
    ema = _official_last_pt(ckpt)
    run = tmp_path / "run"
    train(load_config(TINY, tiny_overrides(run, fmnist_root, f"model.init_from={ckpt}", "train.max_steps=2")))
    assert step0["state"].keys() == ema.keys()
    _assert_equal(step0["state"], ema, ema)  # backbone and (same-shaped) projectors: the checkpoint's EMA weights
    record = json.loads((run / RECORD).read_text())
    assert record["path"] == str(ckpt.resolve()) and record["sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert record["format"] == "repa" and record["source"] == "official" and record["fresh"] == []
    (line,) = [x for x in capsys.readouterr().out.splitlines() if x.startswith("[repa] model.init_from")]
    assert f"from {ckpt}" in line and record["sha256"][:12] in line and "0 fresh" in line
    assert "init_from: " + str(ckpt) in (run / "config.yaml").read_text()  # the config records it too
    assert load_checkpoint(latest_checkpoint(run / "checkpoints"))["state"]["step"] == 2


def test_official_projectors_of_another_width_are_fresh_and_seeded(tmp_path, fmnist_root, step0):
    """Projectors that do not fit (a 24-wide encoder there, 16 here) start from the run's own seeded init: the same
    tensors as the run without init_from."""
    ckpt = tmp_path / "last.pt"
    ema = _official_last_pt(ckpt, encoder_dim=24)
    train(load_config(TINY, tiny_overrides(tmp_path / "plain", fmnist_root, "train.max_steps=1")))
    plain = step0["state"]
    run = tmp_path / "run"
    train(load_config(TINY, tiny_overrides(run, fmnist_root, f"model.init_from={ckpt}", "train.max_steps=1")))
    backbone = [k for k in ema if not k.startswith("projectors.")]
    _assert_equal(step0["state"], ema, backbone)
    projectors = [k for k in plain if k.startswith("projectors.")]
    _assert_equal(step0["state"], plain, projectors)
    record = json.loads((run / RECORD).read_text())
    assert record["fresh"] == sorted(projectors) and len(record["dropped"]) == 6


def test_public_sit_checkpoint_through_the_cli(tmp_path, fmnist_root, step0, capsys):
    """`repa train CONFIG model.init_from=PATH`: a public SiT file (2C outputs, SiT's time and sign) is converted to
    REPA's conventions; the run's projectors are fresh."""
    sit = tmp_path / "SiT-T-4-28x28.pt"
    torch.save(repa_to_sit_state_dict(_random(3).state_dict()), sit)
    want = sit_to_repa_state_dict(torch.load(sit, weights_only=True))
    run = tmp_path / "run"
    over = tiny_overrides(run, fmnist_root, f"model.init_from={sit}", "train.max_steps=2")
    assert cli_main(["train", str(TINY), *over]) == 0
    _assert_equal(step0["state"], want, want)
    assert all(k.startswith("projectors.") for k in set(step0["state"]) - set(want))
    record = json.loads((run / RECORD).read_text())
    assert record["format"] == "sit" and record["fresh"] == sorted(set(step0["state"]) - set(want))
    assert "[repa] model.init_from: " in capsys.readouterr().out


def test_a_repa_run_folder_and_resume_where_the_checkpoint_wins(tmp_path, fmnist_root, step0, capsys):
    source = tmp_path / "source"
    train(load_config(TINY, tiny_overrides(source, fmnist_root, "train.max_steps=2")))
    source_ema = load_checkpoint(latest_checkpoint(source / "checkpoints"))["ema"]
    run = tmp_path / "run"
    train(load_config(TINY, tiny_overrides(run, fmnist_root, f"model.init_from={source}", "train.max_steps=3")))
    _assert_equal(step0["state"], source_ema, source_ema)  # the newest checkpoint's EMA weights
    record = (run / RECORD).read_text()
    assert json.loads(record)["path"] == str(latest_checkpoint(source / "checkpoints").resolve())
    capsys.readouterr()
    # resume with another (even missing) init_from: recorded as a harmless change, the run's checkpoint wins
    train(load_config(TINY, tiny_overrides(run, fmnist_root, f"model.init_from={tmp_path / 'gone.pt'}")))
    assert "model.init_from not read: the run resumes from its checkpoint (step 3)" in capsys.readouterr().out
    assert (run / RECORD).read_text() == record
    changes = [json.loads(x) for x in (run / "config_changes.jsonl").read_text().splitlines()]
    assert {c["key"] for c in changes} == {"model.init_from", "train.max_steps"}


def test_a_missing_file_is_one_line_before_any_work(tmp_path, fmnist_root, monkeypatch, capsys):
    def boom(*a, **k):
        raise AssertionError("a missing model.init_from must fail before loading any data")

    monkeypatch.setattr("repa.training.loop.load_train_images", boom)
    missing = tmp_path / "nowhere" / "last.pt"
    over = tiny_overrides(tmp_path / "run", fmnist_root, f"model.init_from={missing}")
    assert cli_main(["train", str(TINY), *over]) == ConfigError.exit_code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert f"model.init_from={missing}: checkpoint not found: {missing}" in line
    with pytest.raises(ConfigError, match="model.init_from must name a checkpoint"):
        load_config(TINY, ["model.init_from=' '"])


@pytest.mark.parametrize(
    "kw, message",
    [
        (
            dict(hidden_size=48, num_heads=4),
            r"pos_embed is \[1, 49, 48\] there, \[1, 49, 32\] here\): the checkpoint: width 48",
        ),
        (dict(depth=3), r"blocks.2.attn.qkv.weight is not in the model\): the checkpoint: width 32, depth 3"),
        (dict(num_classes=5), r"y_embedder.embedding_table.weight is \[6, 32\] there, \[11, 32\] here"),
    ],
)
def test_a_checkpoint_of_another_shape_is_one_line(tmp_path, fmnist_root, capsys, kw, message):
    ckpt = tmp_path / "other.pt"
    torch.save({"ema": _random(4, **kw).state_dict()}, ckpt)
    over = tiny_overrides(tmp_path / "run", fmnist_root, f"model.init_from={ckpt}")
    assert cli_main(["train", str(TINY), *over]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert f"model.init_from={ckpt} does not fit the config's model (SiT-T/4; " in line
    assert re.search(message, line), line
    assert "size mismatch" not in line


def test_a_qk_norm_checkpoint_with_a_non_registry_head_count(tmp_path, fmnist_root, step0, capsys):
    """Width 32 with 4 heads and qk-norm (the registry would say nothing of width 32): the head dimension the
    qk-norm weights state must agree with `model.num_heads`, which is what the model is built with."""
    ckpt = tmp_path / "qk.pt"
    ema = _random(5, qk_norm=True, num_heads=4).state_dict()
    torch.save({"ema": ema}, ckpt)
    run = tmp_path / "run"
    over = tiny_overrides(run, fmnist_root, f"model.init_from={ckpt}", "model.qk_norm=true", "train.max_steps=1")
    assert cli_main(["train", str(TINY), *over]) == 2  # tiny_overrides say 2 heads: the checkpoint has 4
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert f"model.init_from={ckpt}: num_heads=2 (--num-heads / model.num_heads) contradicts the checkpoint" in line
    assert "head dimension 8, i.e. 4 heads at width 32" in line
    assert cli_main(["train", str(TINY), *over, "model.num_heads=4"]) == 0
    _assert_equal(step0["state"], ema, ema)
