"""Config: presets load, overrides apply, bad keys/types/combinations fail with one clear message."""

from pathlib import Path

import pytest

from repa.config import Config, ConfigError, dump_config, from_dict, load_config, parse_overrides, to_dict, validate

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


# ------------------------------------------------------------------- every value is validated at load


@pytest.mark.parametrize(
    "overrides, message",
    [
        # a zero head count or projector width divided by zero at model build
        (["model.num_heads=0"], r"model.num_heads must be >= 1, got 0"),
        (["model.num_heads=-4"], r"model.num_heads must be >= 1, got -4"),
        (["model.projector_dim=0"], r"model.projector_dim must be >= 1, got 0"),
        (["model.projector_dim=-8"], r"model.projector_dim must be >= 1"),
        (["model.hidden_size=0"], r"model.hidden_size must be >= 1"),
        (["model.depth=0", "repa.encoders=[]"], r"model.depth must be >= 1"),
        (["model.hidden_size=30", "model.num_heads=3"], r"hidden_size=30 must be divisible by 4"),
        (["model.mlp_ratio=0"], r"model.mlp_ratio must be > 0"),
        (["model.mlp_ratio=-1"], r"model.mlp_ratio must be > 0"),
        (["repa.encoder_layer=0"], r"repa.encoder_layer must be >= 1"),
        # AdamW settings certain to fail: 0/0 = NaN on the first update, divergence, meaningless moments
        (["optim.eps=0"], r"optim.eps must be > 0 .*0/0 = NaN"),
        (["optim.eps=-1e-8"], r"optim.eps must be > 0"),
        (["optim.lr=nan"], r"optim.lr must be a finite number, got nan"),
        (["optim.lr=.inf"], r"optim.lr must be a finite number, got inf"),
        (["optim.lr=10"], r"optim.lr=10.0 is far too large"),
        (["optim.lr=1e6"], r"optim.lr=1000000.0 is far too large"),
        (["optim.betas=[0.9,1.0]"], r"optim.betas\[1\] must be in \[0, 1\), got 1.0"),
        (["optim.betas=[-0.1,0.999]"], r"optim.betas\[0\] must be in \[0, 1\)"),
        (["optim.betas=[nan,0.999]"], r"optim.betas\[0\] must be a finite number"),
        (["optim.weight_decay=-0.01"], r"optim.weight_decay must be >= 0"),
        (["optim.weight_decay=inf"], r"optim.weight_decay must be a finite number"),
        (["optim.lr=0.1", "optim.weight_decay=20"], r"optim.lr x optim.weight_decay = 2 must be <= 1"),
        (["optim.grad_clip=nan"], r"optim.grad_clip must be a finite number"),
        (["optim.grad_clip=-1"], r"optim.grad_clip must be >= 0"),
        (["optim.ema_decay=nan"], r"optim.ema_decay must be a finite number"),
        (["optim.ema_decay=1.5"], r"optim.ema_decay must be in \[0, 1\]"),
        # other floats and ints
        (["repa.align_coeff=nan"], r"repa.align_coeff must be a finite number"),
        (["model.class_dropout_prob=nan"], r"model.class_dropout_prob must be a finite number"),
        (["train.compile_memory_budget=nan"], r"train.compile_memory_budget must be a finite number"),
        (["sample.cfg_scale=inf"], r"sample.cfg_scale must be a finite number"),
        (["sample.cfg_scale=0"], r"sample.cfg_scale must be >= 1 \(1 = no guidance"),
        (["sample.cfg_scale=0.5"], r"sample.cfg_scale must be >= 1"),
        (["sample.cfg_scale=4", "model.class_dropout_prob=0"], r"sample.cfg_scale=4.0 needs the unconditional"),
        (["model.name=DiT-XL/2", "sample.num_steps=2000"], r"model.name=DiT-XL/2 samples with DDPM.*at most 1000"),
        (["transport.diffusion=ddpm", "sample.num_steps=1001"], r"transport.diffusion=ddpm samples with DDPM"),
        (["train.seed=-1"], r"train.seed must be in \[0, 2\*\*63\)"),
        (["sample.seed=18446744073709551616"], r"sample.seed must be in \[0, 2\*\*63\)"),
        (["data.root=' '"], r"data.root must name a folder"),
        (["data.vae=''"], r"data.vae must name the VAE"),
        (["repa.encoders=['dinov2-vit-b', ' ']"], r"repa.encoders holds an empty name"),
        # the patch size must divide the image side (checked at model build, after the data and encoders)
        (["model.name=SiT-T/8", "data.kind=fashion-mnist", "data.space=pixel"], r"28 px is not divisible by .* 8"),
        (
            ["model.name=SiT-B/4", "data.kind=folder", "data.space=pixel", "data.resolution=30"],
            r"data.resolution=30 is not divisible by the patch size 4",
        ),  # fmt: skip
    ],
)
def test_bad_values_fail_at_load_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_config(None, overrides)
    assert isinstance(info.value, ValueError) and "\n" not in str(info.value)


@pytest.mark.parametrize("kind", ["folder", "fashion-mnist"])
def test_image_data_in_latent_space_is_a_frozen_vae_run(kind):
    """Images with data.space=latent train in the frozen `data.vae`'s latent space (encoded once at load time,
    `repa.training.data.PrecomputedLatents`; pinned in tests/test_repa_e.py): a valid config, not an error."""
    cfg = load_config(None, [f"data.kind={kind}", "data.space=latent", "data.root=/images"])
    assert cfg.data.space == "latent" and not cfg.train.end_to_end


def test_valid_edge_values_still_load():
    cfg = load_config(
        None,
        ["optim.lr=0", "optim.lr=1", "optim.betas=[0,0]", "optim.weight_decay=0", "optim.grad_clip=0",
         "optim.ema_decay=0", "sample.cfg_scale=1", "train.seed=0", "model.class_dropout_prob=0", "optim.eps=1e-30",
         "sample.cfg_scale=1.5", "model.class_dropout_prob=0.1", "model.name=DiT-B/2", "sample.num_steps=1000"],
    )  # fmt: skip
    assert cfg.optim.lr == 1.0 and cfg.optim.betas == (0.0, 0.0) and cfg.sample.num_steps == 1000


def test_a_section_that_is_not_a_mapping_is_refused(tmp_path):
    for text in ("train: 0\n", "train: []\n", "train: 5\n"):
        (tmp_path / "c.yaml").write_text(text)
        with pytest.raises(ConfigError, match="train: expected a mapping of keys"):
            load_config(tmp_path / "c.yaml")
    (tmp_path / "c.yaml").write_text("train:\n")  # an empty section means the defaults
    assert load_config(tmp_path / "c.yaml").train.max_steps == 400_000


def test_conflicting_overrides_are_named():
    with pytest.raises(ConfigError, match=r"override 'train.max_steps.x=1' conflicts with .*'train.max_steps=...'"):
        parse_overrides(["train.max_steps=3", "train.max_steps.x=1"])


# ------------------------------------------------------------------------------------- preset files


@pytest.mark.parametrize(
    "files, start, message",
    [
        ({"a.yaml": "base: a.yaml\n"}, "a.yaml", r"a.yaml: base: a.yaml makes a cycle .*cannot be its own base"),
        ({"a.yaml": "base: ./a.yaml\ntrain: {max_steps: 3}\n"}, "a.yaml", r"base: ./a.yaml makes a cycle"),
        ({"a.yaml": "base: b.yaml\n", "b.yaml": "base: a.yaml\n"}, "a.yaml", r"b.yaml: base: a.yaml makes a cycle \(.*a.yaml -> .*b.yaml -> .*a.yaml\)"),
        ({"a.yaml": "base: b.yaml\n", "b.yaml": "base: c.yaml\n", "c.yaml": "base: b.yaml\n"}, "a.yaml", r"c.yaml: base: b.yaml makes a cycle"),
        ({"a.yaml": "base: 3\n"}, "a.yaml", r"a.yaml: base: must name a preset file .*got 3"),
        ({"a.yaml": "base: [b.yaml]\n"}, "a.yaml", r"a.yaml: base: must name a preset file .*got \['b.yaml'\]"),
        ({"a.yaml": "base: {x: 1}\n"}, "a.yaml", r"base: must name a preset file"),
        ({"a.yaml": "base: ''\n"}, "a.yaml", r"base: must name a preset file"),
    ],
)  # fmt: skip
def test_base_cycles_and_non_strings_are_refused(tmp_path, files, start, message):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(tmp_path / start)


def test_base_chains_still_merge_and_a_missing_base_names_its_referrer(tmp_path):
    (tmp_path / "a.yaml").write_text("train: {max_steps: 1, log_every: 2}\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\ntrain: {max_steps: 3}\n")
    (tmp_path / "c.yaml").write_text("base: b.yaml\ntrain: {seed: 4}\n")
    cfg = load_config(tmp_path / "c.yaml")
    assert (cfg.train.max_steps, cfg.train.log_every, cfg.train.seed) == (3, 2, 4)
    (tmp_path / "d.yaml").write_text("base: gone.yaml\n")
    with pytest.raises(FileNotFoundError, match=r"config file not found: .*gone.yaml \(the base: of .*d.yaml\)"):
        load_config(tmp_path / "d.yaml")


@pytest.mark.parametrize(
    "content",
    [b"train:\n  run_dir: caf\xe9\n", b"\xff\xfetrain:\n", "train:\n  run_dir: é\n".encode("utf-16")],
    ids=["latin-1", "bad-bom", "utf-16"],
)
def test_a_non_utf8_preset_is_named(tmp_path, content):
    (tmp_path / "enc.yaml").write_bytes(content)
    with pytest.raises(ConfigError, match=rf"{tmp_path / 'enc.yaml'} is not UTF-8 text \(byte 0x.. at offset \d+\)"):
        load_config(tmp_path / "enc.yaml")
    (tmp_path / "base.yaml").write_bytes(content)  # also as another preset's base
    (tmp_path / "child.yaml").write_text("base: base.yaml\n")
    with pytest.raises(ConfigError, match=r"base.yaml is not UTF-8 text"):
        load_config(tmp_path / "child.yaml")


@pytest.mark.parametrize(
    "text, message",
    [
        ("train: [1\n", r"bad.yaml: not valid YAML at line 2, column 1: expected ',' or ']'"),
        ("train:\n  x: 1\n y: 2\n", r"bad.yaml: not valid YAML at line 3, column 2"),
        ("train:\n\tmax_steps: 3\n", r"bad.yaml: not valid YAML at line 2"),
        ("a\x00b: 1\n", r"bad.yaml: not valid YAML at character 1: unacceptable character #x0000"),
    ],
)
def test_yaml_syntax_errors_name_the_file_and_line(tmp_path, text, message):
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(tmp_path / "bad.yaml")
    assert "\n" not in str(info.value)


def test_refused_yaml_tags_are_one_line_naming_the_file(tmp_path):
    (tmp_path / "evil.yaml").write_text("train: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError, match=r"evil.yaml: refused YAML at line 1, column 8: could not determine a "
                                          r"constructor .*python/object/apply:os.system.*!!python/") as info:  # fmt: skip
        load_config(tmp_path / "evil.yaml")
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match=r"override 'train.run_dir=!!python/name:os.system': refused YAML"):
        parse_overrides(["train.run_dir=!!python/name:os.system"])
    with pytest.raises(ConfigError, match=r"override 'train.max_steps=\[1': not valid YAML"):
        parse_overrides(["train.max_steps=[1"])
