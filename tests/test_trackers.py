"""`train.trackers`: TensorBoard writes real event files holding the scalars of metrics.jsonl at the same steps and the
sample grids as images (a resume drops the replayed steps' events); W&B runs offline without an account; unknown or
missing trackers are one-line config errors; none = metrics.jsonl only, as before."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from repa.cli.main import main as cli_main
from repa.config import ConfigError, load_config
from repa.training import train
from repa.training.tracking import check_installed, wandb_mode
from tests.helpers.tiny import killed_at, metrics, tiny_overrides

ROOT = Path(__file__).parents[1]
TINY = ROOT / "configs" / "tiny.yaml"

pytestmark = pytest.mark.usefixtures("isolated_cache")

needs_tensorboard = pytest.mark.skipif(
    importlib.util.find_spec("tensorboard") is None,
    reason="tensorboard is not installed (pip install 'repa[tensorboard]')",
)


def _events(run: Path):
    """The run's TensorBoard events as EventAccumulator reads them (purged steps hidden, as TensorBoard shows)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "trackers" / "repa"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


@needs_tensorboard
def test_tensorboard_logs_the_metrics_and_the_sample_grids(tmp_path, fmnist_root, test_encoder):
    run = tmp_path / "run"
    over = tiny_overrides(run, fmnist_root, "train.trackers=[tensorboard]", "train.sample_every=3", "train.log_every=2")
    train(load_config(TINY, over))
    assert list((run / "trackers" / "repa").glob("events.out.tfevents.*"))
    events, records = _events(run), metrics(run)
    assert {"denoise", "align", "total", "grad_norm", "lr"} <= set(events.Tags()["scalars"])
    for key in ("total", "denoise", "lr"):
        got = [(e.step, e.value) for e in events.Scalars(key)]
        assert [s for s, _ in got] == [r["step"] for r in records] == [2, 4, 6]
        assert [v for _, v in got] == pytest.approx([r[key] for r in records], rel=1e-6)  # float32 in the events
    images = events.Images("samples")
    assert [i.step for i in images] == [3, 6] and images[0].width > 0 and images[0].height > 0


@needs_tensorboard
def test_tensorboard_after_a_kill_shows_each_step_once(tmp_path, fmnist_root, test_encoder, monkeypatch):
    """Killed while writing checkpoint 6 after logging steps 4-6: the resume from step 3 replays them, and the
    events of the first attempt's steps 4-6 are purged (as metrics.jsonl is trimmed)."""
    run = tmp_path / "run"
    over = tiny_overrides(run, fmnist_root, "train.trackers=[tensorboard]")

    with killed_at("model.safetensors@6", monkeypatch):
        train(load_config(TINY, over))
    train(load_config(TINY, over))
    got = [(e.step, e.value) for e in _events(run).Scalars("total")]
    assert [s for s, _ in got] == [1, 2, 3, 4, 5, 6]
    assert [v for _, v in got] == pytest.approx([r["total"] for r in metrics(run)], rel=1e-6)


def test_wandb_runs_offline_without_an_account(tmp_path, fmnist_root, test_encoder, monkeypatch):
    if importlib.util.find_spec("wandb") is None:
        pytest.skip("wandb is not installed (pip install 'repa[wandb]'); its tracker is optional")
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_PROJECT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    train(load_config(TINY, tiny_overrides(run, fmnist_root, "train.trackers=[wandb]", "train.sample_every=3")))
    run_id = (run / "trackers" / "wandb_run_id").read_text().strip()
    (offline,) = (run / "trackers" / "wandb").glob(f"offline-run-*-{run_id}")
    data = (offline / f"run-{run_id}.wandb").read_bytes()
    for r in metrics(run):  # the history holds each logged value as JSON
        assert json.dumps(r["denoise"]).encode() in data and json.dumps(r["total"]).encode() in data
    grids = sorted(p.name.split("_")[1] for p in (offline / "files" / "media" / "images").glob("samples_*.png"))
    assert grids == ["3", "6"]  # the sample grids of steps 3 and 6 as images


def test_wandb_mode_defaults_to_offline_without_a_key(monkeypatch):
    for var in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(var, raising=False)
    assert wandb_mode() == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode() is None  # wandb's default: online
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.delenv("WANDB_API_KEY")
    assert wandb_mode() is None  # WANDB_MODE is respected (wandb reads it)


def test_unknown_tracker_is_one_line_naming_the_key(tmp_path, capsys):
    with pytest.raises(
        ConfigError, match=r"train.trackers: 'tensorbord' is not a tracker \(did you mean tensorboard\?\)"
    ):
        load_config(TINY, ["train.trackers=[tensorbord]"])
    with pytest.raises(ConfigError, match="train.trackers lists a tracker twice"):
        load_config(TINY, ["train.trackers=[wandb,wandb]"])
    assert cli_main(["train", str(TINY), "train.trackers=[mlflow]", f"train.run_dir={tmp_path / 'run'}"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "train.trackers: 'mlflow' is not a tracker (valid: tensorboard, wandb)" in line
    assert load_config(TINY, ["train.trackers=tensorboard,wandb"]).train.trackers == ["tensorboard", "wandb"]
    assert load_config(TINY).train.trackers == []  # the default: metrics.jsonl only


def test_a_tracker_that_is_not_installed_is_named_before_any_work(tmp_path, fmnist_root, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr("repa.training.tracking.importlib.util.find_spec",
                        lambda name, *a: None if name == "tensorboard" else real(name, *a))  # fmt: skip
    with pytest.raises(
        ConfigError, match=r"lists tensorboard, which is not installed: pip install 'repa\[tensorboard\]'"
    ):
        check_installed(["tensorboard"])
    run = tmp_path / "run"
    with pytest.raises(ConfigError, match="not installed"):
        train(load_config(TINY, tiny_overrides(run, fmnist_root, "train.trackers=[tensorboard]")))
    assert not run.exists()
