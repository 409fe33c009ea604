"""`optim.lr_schedule` (repa.training.schedule): warm-up then constant (the official recipe, unchanged bit for bit),
cosine or linear decay to `optim.final_lr` at `train.max_steps`; its checks; the lr a run logs and applies."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from repa.checkpoint import latest_checkpoint, load_checkpoint
from repa.config import ConfigError, load_config
from repa.training import train
from repa.training.schedule import lr_at, lr_factor, lr_lambda
from tests.helpers.tiny import metrics, tiny_overrides

ROOT = Path(__file__).parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


def _cfg(*overrides: str):
    return load_config(TINY, ["optim.lr=3e-4", "train.max_steps=500", *overrides])  # what the values below assume


def test_constant_is_the_warm_up_only_schedule_bit_for_bit():
    """The lambda this module replaced, for every step (== on floats, not approx)."""
    for warmup in (0, 1, 5, 7):
        old = lambda step: min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0  # noqa: E731, B023
        cfg = _cfg("optim.warmup_steps=" + str(warmup), "train.max_steps=20")
        new = lr_lambda(cfg)
        assert [new(s) for s in range(40)] == [old(s) for s in range(40)]
    assert _cfg().optim.lr_schedule == "constant" and _cfg().optim.final_lr == 0.0  # the default: official recipe


def test_cosine_known_values():
    lr, final = 1e-3, 1e-5
    cfg = _cfg("optim.lr=0.001", "optim.final_lr=0.00001", "optim.lr_schedule=cosine", "optim.warmup_steps=10",
               "train.max_steps=110")  # fmt: skip
    assert lr_at(cfg, 0) == pytest.approx(lr / 10)  # the first warm-up step
    assert lr_at(cfg, 9) == lr  # the end of the warm-up: the full lr
    assert lr_at(cfg, 10) == pytest.approx(lr)  # the decay starts from it
    assert lr_at(cfg, 60) == pytest.approx((lr + final) / 2)  # the midpoint of the cosine
    assert lr_at(cfg, 35) == pytest.approx(final + (lr - final) * (1 + math.cos(math.pi / 4)) / 2)
    assert lr_at(cfg, 110) == pytest.approx(final)  # reached at train.max_steps
    assert lr_at(cfg, 500) == pytest.approx(final)  # and kept past it
    values = [lr_at(cfg, s) for s in range(10, 111)]
    assert values == sorted(values, reverse=True)


def test_linear_known_values():
    lr, final = 2e-4, 0.0
    cfg = _cfg("optim.lr=0.0002", "optim.lr_schedule=linear", "train.max_steps=100")
    assert lr_at(cfg, 0) == lr  # no warm-up: the full lr at step 0
    assert lr_at(cfg, 25) == pytest.approx(0.75 * lr)
    assert lr_at(cfg, 50) == pytest.approx((lr + final) / 2)
    assert lr_at(cfg, 100) == final == lr_at(cfg, 150)
    assert lr_factor(5, schedule="linear", warmup_steps=4, total_steps=8, final_ratio=0.5) == pytest.approx(0.875)


def test_the_plain_function_rejects_an_unknown_schedule():
    with pytest.raises(ValueError, match="unknown lr schedule 'step'"):
        lr_factor(3, schedule="step")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["optim.lr_schedule=step"], r"optim.lr_schedule: 'step' is not one of \['constant', 'cosine', 'linear'\]"),
        (["optim.lr_schedule=cosine", "optim.final_lr=-0.001"], "optim.final_lr must be >= 0, got -0.001"),
        (["optim.lr_schedule=cosine", "optim.final_lr=0.001"], r"optim.final_lr=0.001 must be <= optim.lr=0.0003"),
        (["optim.final_lr=0.00001"], "optim.final_lr=1e-05 applies only to optim.lr_schedule=cosine or linear"),
        (
            ["optim.lr_schedule=linear", "optim.warmup_steps=500"],
            "optim.warmup_steps=500 leaves no step for the linear",
        ),
        (["optim.lr_schedule=cosine", "optim.final_lr=nan"], "optim.final_lr must be a finite number"),
    ],
)
def test_bad_schedules_fail_at_load_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        _cfg(*overrides)


def test_edge_schedules_load():
    _cfg("optim.lr_schedule=cosine", "optim.final_lr=0.0003")  # final = lr: a flat "decay"
    _cfg("optim.lr_schedule=cosine", "optim.warmup_steps=499")  # one decay step
    _cfg("optim.lr_schedule=linear", "train.max_steps=0")  # nothing to train: nothing to decay


@pytest.mark.usefixtures("isolated_cache")
def test_a_run_logs_and_applies_the_scheduled_lr(tmp_path, fmnist_root, test_encoder):
    """metrics.jsonl's lr at step n is the lr of the next update (LambdaLR after n updates); the checkpoint's
    optimizer holds it."""
    cfg = load_config(TINY, tiny_overrides(tmp_path / "run", fmnist_root, "optim.lr_schedule=linear",
                                           "optim.final_lr=0.0001", "optim.warmup_steps=2"))  # fmt: skip
    train(cfg)
    logged = [r["lr"] for r in metrics(tmp_path / "run")]
    assert logged == [lr_at(cfg, s) for s in range(1, 7)]
    assert logged[-1] == pytest.approx(1e-4)
    ck = load_checkpoint(latest_checkpoint(tmp_path / "run" / "checkpoints"))
    assert ck["optimizer"]["optimizer"]["param_groups"][0]["lr"] == logged[-1]


def test_the_issue_16_options_load_from_a_yaml_preset(tmp_path):
    """lr schedule, trackers and init_from as YAML keys (the CLI's dotted overrides set the same fields)."""
    preset = tmp_path / "finetune.yaml"
    preset.write_text(
        f"base: {TINY}\n"
        "model:\n  init_from: weights/last.pt\n"
        "optim:\n  lr_schedule: cosine\n  warmup_steps: 10\n  final_lr: 1.0e-6\n"
        "train:\n  trackers: [tensorboard, wandb]\n"
    )
    cfg = load_config(preset)
    assert cfg.model.init_from == "weights/last.pt" and cfg.train.trackers == ["tensorboard", "wandb"]
    assert (cfg.optim.lr_schedule, cfg.optim.warmup_steps, cfg.optim.final_lr) == ("cosine", 10, 1e-6)
