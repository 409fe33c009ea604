"""Config: presets load, overrides apply, bad keys/types/combinations fail with one clear message."""

from pathlib import Path

import pytest

from repa.config import Config, dump_config, from_dict, load_config, parse_overrides, to_dict, validate

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


def test_there_are_presets():
    names = {p.stem for p in CONFIGS}
    assert {"tiny", "sit-b2-repa", "sit-l2-repa", "sit-xl2-repa", "dit-xl2-repa", "sit-xl2", "tiny-vanilla"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_preset_loads_and_round_trips(path, tmp_path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    dump_config(cfg, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert to_dict(again) == to_dict(cfg)


def test_vanilla_presets_run_no_encoder():
    for name in ("sit-xl2", "sit-b2", "dit-xl2", "tiny-vanilla"):
        cfg = load_config(Path(__file__).parents[1] / "configs" / f"{name}.yaml")
        assert not cfg.repa.enabled


def test_official_recipe_defaults():
    cfg = load_config(Path(__file__).parents[1] / "configs" / "sit-xl2-repa.yaml")
    assert cfg.repa.align_coeff == 0.5 and cfg.model.align_depth == 8
    assert cfg.optim.lr == 1e-4 and cfg.optim.betas == (0.9, 0.999) and cfg.optim.ema_decay == 0.9999
    assert cfg.train.global_batch_size == 256 and cfg.optim.grad_clip == 1.0


def test_overrides_are_typed():
    cfg = load_config(None, ["train.max_steps=200", "repa.encoders=[a,b]", "optim.lr=3e-4", "train.progress=false"])
    assert cfg.train.max_steps == 200 and cfg.repa.encoders == ["a", "b"] and cfg.optim.lr == 3e-4
    assert cfg.train.progress is False
    assert parse_overrides(["a.b.c=1"]) == {"a": {"b": {"c": 1}}}


def test_unknown_key_is_named_with_a_suggestion():
    with pytest.raises(ValueError, match=r"unknown config key 'train.max_step'.*train.max_steps"):
        load_config(None, ["train.max_step=3"])
    with pytest.raises(ValueError, match="unknown config key 'nonsense'"):
        from_dict({"nonsense": {}})


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.max_steps=abc", "train.max_steps: expected an integer"),
        ("train.progress=3", "expected true/false"),
        ("transport.path=spiral", "not one of"),
        ("optim.betas=[0.9]", "expected 2 values"),
    ],
)
def test_wrong_types_fail(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, [override])


def test_override_syntax_errors():
    with pytest.raises(ValueError, match="section.key=value"):
        parse_overrides(["max_steps"])
    with pytest.raises(ValueError, match="dotted"):
        parse_overrides(["max_steps=3"])


def test_impossible_combinations_fail_before_work():
    cfg = load_config(None, ["train.global_batch_size=6"])
    with pytest.raises(ValueError, match="not divisible by num_processes \\(4\\)"):
        validate(cfg, world_size=4)
    with pytest.raises(ValueError, match="align_depth=9 exceeds model.depth=4"):
        load_config(None, ["model.align_depth=9", "model.depth=4"])
    with pytest.raises(ValueError, match="data.space=pixel"):
        load_config(None, ["data.kind=fashion-mnist", "data.space=latent"])
    with pytest.raises(ValueError, match="one path per entry"):
        load_config(None, ["repa.encoders=[a,b]", "repa.encoder_weights=[x]"])
    for bad in ("0", "1.5"):
        with pytest.raises(ValueError, match="train.compile_memory_budget must be in"):
            load_config(None, [f"train.compile_memory_budget={bad}"])
    assert load_config(None, ["train.compile_memory_budget=0.5"]).train.compile_memory_budget == 0.5


def test_missing_file_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_yaml_is_safe_loaded(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("train: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(Exception, match="could not determine a constructor|ConstructorError|python/object"):
        load_config(evil)


def test_yaml_no_is_the_string_choice():
    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"
