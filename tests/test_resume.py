"""Resume contracts: a config change to the model or the maths is refused (or accepted with --allow-config-change and
recorded), harmless ones pass, a model of another shape gets one line; the metrics log of a killed and resumed run
equals an uninterrupted one for any log and checkpoint intervals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from repa.checkpoint import load_checkpoint
from repa.cli.main import main as cli_main
from repa.config import load_config
from repa.training import train
from repa.training.resume import ConfigChangeError, diff_configs
from tests.helpers.tiny import PatchEncoder, killed_at, metrics, tiny_overrides
from tests.test_faults import assert_same_training_state

ROOT = Path(__file__).parents[1]
TINY = ROOT / "configs" / "tiny.yaml"

pytestmark = pytest.mark.usefixtures("isolated_cache")


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory, fmnist_root):
    """The tiny command stopped at step 3 (its checkpoint), to be resumed by copies."""
    tmp = tmp_path_factory.mktemp("stopped")
    with pytest.MonkeyPatch.context() as m:
        m.setenv("REPA_CACHE", str(tmp / "cache"))
        m.setattr("repa.training.setup.build_encoders", lambda cfg, device: [PatchEncoder(98)])
        train(load_config(TINY, tiny_overrides(tmp / "run", fmnist_root, "train.max_steps=3")))
    return tmp / "run"


@pytest.fixture
def run(stopped_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(stopped_run, copy)
    return copy


def _snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in run.rglob("*") if p.is_file()}


def _changes(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "config_changes.jsonl").read_text().splitlines()]


def _no_work(monkeypatch) -> None:
    def boom(*a, **k):
        raise AssertionError("a refused resume must fail before loading any data")

    monkeypatch.setattr("repa.training.loop.load_train_images", boom)


@pytest.mark.parametrize(
    "override, listed",
    [
        ("model.align_depth=2", "model.align_depth 1 -> 2"),
        ("optim.lr=0.001", "optim.lr 0.0003 -> 0.001"),
        ("train.seed=1", "train.seed 0 -> 1"),
        ("train.global_batch_size=16", "train.global_batch_size 8 -> 16"),
        ("repa.align_coeff=1.0", "repa.align_coeff 0.5 -> 1.0"),
    ],
)
def test_change_to_the_model_or_the_maths_is_refused_before_any_work(run, fmnist_root, monkeypatch, override, listed):
    before = _snapshot(run)
    _no_work(monkeypatch)
    over = tiny_overrides(run, fmnist_root, override, "train.max_steps=12")  # a harmless change alongside
    with pytest.raises(ConfigChangeError, match="--allow-config-change") as info:
        train(load_config(TINY, over))
    message = str(info.value)
    assert f"from step_00000003 with another config: {listed} (these change" in message
    assert "max_steps" not in message and "\n" not in message
    assert _snapshot(run) == before  # nothing written: config.yaml, metrics, checkpoints as they were


def test_lr_change_is_accepted_with_the_flag_applied_and_recorded(run, fmnist_root, test_encoder, capsys):
    over = tiny_overrides(run, fmnist_root, "optim.lr=0.001", "train.max_steps=12")
    assert cli_main(["train", str(TINY), *over]) == ConfigChangeError.exit_code == 21
    assert "optim.lr 0.0003 -> 0.001" in capsys.readouterr().err
    assert cli_main(["train", str(TINY), *over, "--allow-config-change"]) == 0
    expected = [{"step": 3, "key": "optim.lr", "old": 0.0003, "new": 0.001},
                {"step": 3, "key": "train.max_steps", "old": 3, "new": 12}]  # fmt: skip
    assert _changes(run) == expected
    assert load_checkpoint(run / "checkpoints" / "step_00000012")["state"]["config_changes"] == expected
    assert [r["lr"] for r in metrics(run)] == [0.0003] * 3 + [0.001] * 9  # the new lr applies (not the restored one)
    ck = load_checkpoint(run / "checkpoints" / "step_00000012")
    assert ck["optimizer"]["optimizer"]["param_groups"][0]["lr"] == 0.001
    assert "lr: 0.001" in (run / "config.yaml").read_text()
    assert cli_main(["train", str(TINY), *over]) == 0  # the run's config is now the new one: nothing to refuse
    assert _changes(run) == expected


def test_harmless_changes_pass_and_are_recorded(run, fmnist_root, test_encoder):
    over = tiny_overrides(run, fmnist_root, "train.max_steps=5", "train.log_every=2", "train.checkpoint_every=5",
                          f"train.num_threads={torch.get_num_threads()}", "sample.num_steps=3")  # fmt: skip
    out = train(load_config(TINY, over))
    assert out["step"] == 5
    assert {r["key"] for r in _changes(run)} == {"train.max_steps", "train.log_every", "train.checkpoint_every",
                                                 "train.num_threads", "sample.num_steps"}  # fmt: skip
    assert all(r["step"] == 3 for r in _changes(run))


def test_a_resume_killed_before_its_next_checkpoint_records_its_changes_once(run, fmnist_root, test_encoder,
                                                                             monkeypatch):  # fmt: skip
    over = tiny_overrides(run, fmnist_root, "optim.lr=0.001")
    with killed_at("model.safetensors@6", monkeypatch):
        train(load_config(TINY, over), allow_config_change=True)
    expected = [{"step": 3, "key": "optim.lr", "old": 0.0003, "new": 0.001},
                {"step": 3, "key": "train.max_steps", "old": 3, "new": 6}]  # fmt: skip
    assert _changes(run) == expected
    train(load_config(TINY, over), allow_config_change=True)
    assert _changes(run) == expected


@pytest.mark.parametrize("override, listed", [("model.hidden_size=64", "model.hidden_size 32 -> 64"),
                                              ("model.depth=3", "model.depth 2 -> 3")])  # fmt: skip
def test_a_model_of_another_shape_gets_one_line(run, fmnist_root, test_encoder, monkeypatch, override, listed, capsys):
    def boom(*a, **k):
        raise AssertionError("the shape is checked before the targets are computed")

    monkeypatch.setattr("repa.training.setup.prepare_targets", boom)
    over = tiny_overrides(run, fmnist_root, override)
    assert cli_main(["train", str(TINY), *over, "--allow-config-change"]) == 21
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "its model has another shape" in line and f"config changes: {listed}" in line
    assert "size mismatch" not in line and len(line) < 700


def test_diff_fills_keys_added_since_with_their_defaults():
    from repa.config import to_dict

    cfg = load_config(TINY)
    old = to_dict(cfg)
    del old["train"]["progress"]  # a run written before the key existed (default: true)
    assert diff_configs(old, to_dict(cfg)) == []
    old["train"]["progress"] = False
    assert [str(c) for c in diff_configs(old, to_dict(cfg))] == ["train.progress false -> true"]


# --------------------------------------------------------------------------------- metrics across a resume


@pytest.mark.parametrize("log_every, checkpoint_every, kill_at", [(2, 3, 3), (3, 2, 4), (4, 3, 6)])
def test_metrics_of_a_killed_run_equal_an_uninterrupted_one(tmp_path, fmnist_root, test_encoder, monkeypatch,
                                                             log_every, checkpoint_every, kill_at):  # fmt: skip
    """Intervals that do not divide each other: the log window spanning the resume covers the steps before the kill
    too (the checkpoint carries its sums)."""
    extra = (f"train.log_every={log_every}", f"train.checkpoint_every={checkpoint_every}", "train.max_steps=9")
    full, killed = tmp_path / "full", tmp_path / "killed"
    train(load_config(TINY, tiny_overrides(full, fmnist_root, *extra)))

    with killed_at(f"rename@{kill_at}", monkeypatch):  # right after checkpoint `kill_at` is in place
        train(load_config(TINY, tiny_overrides(killed, fmnist_root, *extra)))
    assert kill_at % log_every  # the kill lands inside a log window
    train(load_config(TINY, tiny_overrides(killed, fmnist_root, *extra)))
    assert [r["step"] for r in metrics(killed)] == [r["step"] for r in metrics(full)]
    assert_same_training_state(full, killed)
    assert torch.isfinite(torch.tensor([r["total"] for r in metrics(killed)])).all()


# --------------------------------------------------------------------------------- lr schedules across a resume


def test_a_cosine_lr_schedule_resumes_exactly_and_its_end_cannot_move(tmp_path, fmnist_root, test_encoder, monkeypatch):
    """optim.lr_schedule=cosine with warm-up: a run killed mid-checkpoint and rerun equals an uninterrupted one bit for
    bit (the lr is a function of the update count, which the checkpoint holds); the decay ends at train.max_steps,
    so changing it on resume changes the maths and is refused like any such change."""
    extra = ("optim.lr_schedule=cosine", "optim.warmup_steps=2", "optim.final_lr=0.00001", "train.max_steps=9")
    full, killed = tmp_path / "full", tmp_path / "killed"
    train(load_config(TINY, tiny_overrides(full, fmnist_root, *extra)))

    with killed_at("model.safetensors@6", monkeypatch):  # steps 4-6 logged, then killed: resume from 3
        train(load_config(TINY, tiny_overrides(killed, fmnist_root, *extra)))
    with pytest.raises(ConfigChangeError, match=r"train.max_steps 9 -> 12 \(these change"):
        train(load_config(TINY, tiny_overrides(killed, fmnist_root, *extra, "train.max_steps=12")))
    train(load_config(TINY, tiny_overrides(killed, fmnist_root, *extra)))
    assert_same_training_state(full, killed)
    lrs = [r["lr"] for r in metrics(killed)]
    assert lrs[:2] == pytest.approx([3e-4, 3e-4]) and lrs[-1] == pytest.approx(1e-5)  # warmed up; the final lr
    assert lrs == sorted(lrs, reverse=True)
