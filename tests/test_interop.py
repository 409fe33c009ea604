"""Official checkpoints load by inference: qk-norm models at widths and head counts outside the registry, with and
without projectors, through every command that loads a checkpoint (`repa sample`, `repa eval generate`, `repa probe`,
`repa align`), with the same outputs as the model built with the true arguments; what the weights cannot say is a
one-line error naming the flag; a state dict that contradicts itself fails before anything is built."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

from repa.analysis.run import run_align, run_probe
from repa.cli.main import main as cli_main
from repa.config import from_dict
from repa.convert import infer_model_kwargs
from repa.data.npz import save_samples
from repa.evaluation.sampling import balanced_labels
from repa.generate import apply_sample_overrides, decoder_for, generate_batches, grid_labels, to_adm_nhwc
from repa.loading import LoadedModel, load_model, load_official
from repa.models import DiffusionTransformer
from tests.helpers.tiny import PatchEncoder

torch.set_num_threads(2)
BASE = dict(input_size=8, patch_size=2, in_channels=4, depth=3, num_classes=5, projector_dim=32)
# widths 80 and 96 are no registry size; 5 heads of 16 and 3 heads of 32 are no registry head count either
QK_NORM = dict(BASE, hidden_size=80, num_heads=5, qk_norm=True)
QK_NORM_PROJ = dict(BASE, hidden_size=96, num_heads=3, qk_norm=True, encoder_dims=[16, 24], align_depth=2)
PLAIN_PROJ = dict(BASE, hidden_size=80, num_heads=5, encoder_dims=[16], align_depth=3)
FLAGS = ["--num-heads", "5", "--align-depth", "3"]  # what PLAIN_PROJ's bare weights cannot say
SAMPLING = ["--steps", "2", "--cfg-scale", "1.5", "--vae", "random:tiny"]


def random_model(seed: int, **kw) -> DiffusionTransformer:
    """Random weights everywhere, in the official key layout (the official init zeroes adaLN and the final layer)."""
    model = DiffusionTransformer(**kw)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.02 if "embedding" in name else 0.1))
    return model.eval()


def save_official(path: Path, kw: dict, layout: str) -> DiffusionTransformer:
    """Write a checkpoint; returns the model whose weights a loader should take (the EMA of a `last.pt`)."""
    model = random_model(1, **kw)
    if layout == "pt":
        torch.save(model.state_dict(), path)
    elif layout == "safetensors":
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    else:  # official REPA train.py: model, ema, opt, args (a custom model name: no registry entry says the heads)
        ema = random_model(2, **kw)
        args = argparse.Namespace(model="SiT-custom/2", encoder_depth=kw["align_depth"], qk_norm=kw["qk_norm"],
                                  enc_type="dinov2-vit-b", proj_coeff=0.5)  # fmt: skip
        torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": {}, "args": args, "steps": 3}, path)
        model = ema
    return model


def true_loaded(model: DiffusionTransformer, path: Path) -> LoadedModel:
    return LoadedModel(model, from_dict({}), {"format": "repa", "model_kwargs": model.config}, path)


def reference_samples(model: DiffusionTransformer, labels: torch.Tensor) -> np.ndarray:
    cfg = from_dict({})
    apply_sample_overrides(cfg, {"num_steps": 2, "cfg_scale": 1.5})
    batches = generate_batches(model, cfg, labels, (4, 8, 8), seed=0, batch_size=4, decode=decoder_for("random:tiny"))
    return to_adm_nhwc(torch.cat(list(batches)))


CASES = {  # name: (model kwargs, file layout, flags)
    "qk-norm": (QK_NORM, "pt", []),
    "qk-norm+projectors, last.pt with args": (QK_NORM_PROJ, "last.pt", []),
    "qk-norm+projectors, bare": (QK_NORM_PROJ, "safetensors", ["--align-depth", "2"]),
    "projectors, no qk-norm, bare": (PLAIN_PROJ, "pt", FLAGS),
}


@pytest.mark.parametrize("case", CASES)
def test_repa_sample_loads_by_inference(case, tmp_path, capsys):
    kw, layout, flags = CASES[case]
    path = tmp_path / f"ckpt.{layout.split('.')[-1]}"
    model = save_official(path, kw, layout)
    argv = ["sample", str(path), "--num", "4", "--batch-size", "4", "--out", str(tmp_path / "s"), *SAMPLING]
    if flags:  # without them: one line naming each missing flag
        assert cli_main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("repa sample: error: cannot tell")
        assert all(f in err for f in flags[::2])
    assert cli_main([*argv, *flags]) == 0
    (npz,) = (tmp_path / "s").glob("*.npz")
    np.testing.assert_array_equal(np.load(npz)["arr_0"], reference_samples(model, grid_labels(4, 5)))

    loaded = load_model(path, num_heads=int(flags[1]) if "--num-heads" in flags else None,
                        align_depth=int(flags[-1]) if "--align-depth" in flags else None)  # fmt: skip
    inferred = loaded.info["model_kwargs"]
    assert inferred == {k: model.config[k] for k in inferred}
    assert (loaded.num_heads, loaded.align_depth) == (kw["num_heads"], kw.get("align_depth"))
    g = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(3, 4, 8, 8, generator=g), torch.rand(3, generator=g), torch.tensor([0, 4, 5])
    with torch.no_grad():
        (out, zs), (want, want_zs) = loaded.model(x, t, y), model(x, t, y)
    torch.testing.assert_close(out, want, atol=0, rtol=0)
    for a, b in zip(zs, want_zs, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_a_guessed_head_count_loads_but_computes_another_function():
    """Why an unknown head count is an error, not width / 64: without qk-norm no shape depends on it."""
    model = random_model(1, **PLAIN_PROJ)
    guess = DiffusionTransformer(**{**PLAIN_PROJ, "num_heads": 1}).eval()
    guess.load_state_dict(model.state_dict(), strict=True)
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])
    with torch.no_grad():
        assert not torch.allclose(guess.velocity(x, t, y), model.velocity(x, t, y), atol=1e-3)
    with pytest.raises(ValueError, match=r"^cannot tell the number of attention heads .* pass --num-heads"):
        load_official(model.state_dict(), align_depth=3)
    with pytest.raises(ValueError, match="contradicts the checkpoint: its qk-norm weights have head dimension 16"):
        load_official(random_model(1, **QK_NORM).state_dict(), num_heads=4)


def test_the_official_golden_checkpoint_loads_with_the_flags():
    """The golden fixture, written by the official REPA code (width 64, 4 heads, no qk-norm, a projector on block 2):
    its bare `model.pt` names neither, so it needs both flags, and then reproduces the official outputs."""
    golden = Path(__file__).parent / "fixtures" / "golden"
    with pytest.raises(ValueError, match="pass --num-heads .* and --align-depth"):
        load_official(golden / "model.pt")
    model, _ = load_official(golden / "model.pt", num_heads=4, align_depth=2)
    f = load_file(golden / "forward.safetensors")
    with torch.no_grad():
        out, zs = model(f["x_t"], f["t"], f["y"])
    torch.testing.assert_close(out, f["out"], rtol=0, atol=1e-5)
    torch.testing.assert_close(zs[0], f["zs_0"], rtol=0, atol=1e-5)


class FakeDetector:
    """A fixed random projection of pooled pixels (the real detectors are tested in test_evaluation)."""

    name = "fake"

    def features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = F.adaptive_avg_pool2d(images.float() / 255, 2).flatten(1)  # (B, 12)
        w = torch.randn(12, 8, generator=torch.Generator().manual_seed(0))
        return {"pool": x @ w, "spatial": x[:, :6]}


@pytest.fixture(params=list(CASES))
def official_checkpoint(request, tmp_path):
    """Each official layout of CASES: (model built with the true arguments, file, the flags it needs)."""
    kw, layout, flags = CASES[request.param]
    path = tmp_path / f"ckpt.{layout.split('.')[-1]}"
    return save_official(path, kw, layout), path, flags


def refused_without(flags: list[str], argv: list[str], capsys) -> None:
    """Without the flags a checkpoint needs, the command stops with one line naming each of them."""
    if flags:
        assert cli_main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "cannot tell" in err and all(f in err for f in flags[::2]), err


def test_eval_generate_takes_the_flags(official_checkpoint, tmp_path, monkeypatch, capsys):
    model, path, flags = official_checkpoint
    monkeypatch.setattr("repa.evaluation.generation.make_detector", lambda *a, **k: FakeDetector())
    ref = tmp_path / "ref.npz"
    save_samples(ref, np.random.default_rng(0).integers(0, 256, (6, 16, 16, 3), dtype=np.uint8))
    argv = ["eval", "generate", str(path), "--num", "4", "--ref", str(ref), "--batch-size", "4", "--no-is",
            "--device", "cpu", "--no-progress", "--out", str(tmp_path / "e"), *SAMPLING]  # fmt: skip
    refused_without(flags, argv, capsys)
    assert cli_main([*argv, *flags]) == 0
    (npz,) = (tmp_path / "e").glob("*.npz")
    np.testing.assert_array_equal(np.load(npz)["arr_0"], reference_samples(model, balanced_labels(4, 5, seed=0)))


@pytest.fixture
def image_folder(tmp_path):
    rng = np.random.default_rng(0)
    for c in range(2):
        (tmp_path / "folder" / f"class{c}").mkdir(parents=True)
        for i in range(6):
            pixels = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8) // (c + 1)
            Image.fromarray(pixels).save(tmp_path / "folder" / f"class{c}" / f"{i}.png")
    return tmp_path / "folder"


def test_probe_and_align_take_the_flags(official_checkpoint, image_folder, tmp_path, monkeypatch, capsys):
    model, path, flags = official_checkpoint
    monkeypatch.setattr("repa.encoders.load_encoder", lambda name, resolution=224, **k: PatchEncoder(resolution))
    common = ["--data-root", str(image_folder), "--vae", "random:tiny", "--layers", "1,3", "--times", "0.5",
              "--device", "cpu", "--no-progress"]  # fmt: skip
    cpu, want = torch.device("cpu"), true_loaded(model, path)

    probe = ["probe", str(path), "--num-train", "8", "--num-test", "4", "--epochs", "2", "--out", str(tmp_path / "p")]
    refused_without(flags, [*probe, *common], capsys)
    assert cli_main([*probe, *common, *flags]) == 0
    rows = run_probe(want, "1,3", "0.5", 8, 4, 2, data_root=image_folder, vae="random:tiny", device=cpu,
                     progress=False, write=False)["rows"]  # fmt: skip
    assert json.loads((tmp_path / "p" / "probe.json").read_text())["rows"] == rows

    align = ["align", str(path), "--encoder", "dinov2-vit-b", "--num", "8", "--k", "3", "--out", str(tmp_path / "a")]
    refused_without(flags, [*align, *common], capsys)
    assert cli_main([*align, *common, *flags]) == 0
    rows = run_align(want, "dinov2-vit-b", None, None, "1,3", "0.5", 8, "cknna", 3, data_root=image_folder,
                     vae="random:tiny", device=cpu, progress=False, write=False)["rows"]  # fmt: skip
    assert json.loads((tmp_path / "a" / "align.json").read_text())["rows"] == rows


# ------------------------------------------------------------------------------------------------- inference rules


@pytest.mark.parametrize(
    "kw",
    [
        dict(BASE, hidden_size=48, num_heads=4, qk_norm=True),
        dict(BASE, hidden_size=48, num_heads=6, qk_norm=True, learn_sigma=True, encoder_dims=[8, 8], align_depth=3),
        dict(BASE, hidden_size=40, num_heads=5, qk_norm=True, mlp_ratio=2.6),  # int(40 * 2.6) = 104 MLP units
        dict(BASE, hidden_size=64, num_heads=2, qk_norm=True, mlp_ratio=1 / 3, class_dropout_prob=0.0),
    ],
)
def test_inference_recovers_the_constructor_arguments(kw):
    state = DiffusionTransformer(**kw).state_dict()
    info = {"config": {"model": {"name": "SiT-B/2", "class_dropout_prob": kw.get("class_dropout_prob", 0.1)}}}
    got = infer_model_kwargs(state, align_depth=kw.get("align_depth"), info=info)
    model = DiffusionTransformer(**got)
    ignore = ("mlp_ratio", "class_dropout_prob") + (() if kw.get("encoder_dims") else ("projector_dim",))
    same = {k: v for k, v in DiffusionTransformer(**kw).config.items() if k not in ignore}
    assert {k: model.config[k] for k in same} == same
    model.load_state_dict(state, strict=True)  # and so the MLP width (1/3 of 64: 21 units)


@pytest.mark.parametrize("hidden, heads", [(192, 3), (384, 6), (768, 12), (1024, 16), (1152, 16)])
def test_registry_widths_keep_their_head_counts(hidden, heads):
    kw = dict(input_size=2, patch_size=1, in_channels=1, hidden_size=hidden, depth=1, num_heads=1, num_classes=1)
    state = DiffusionTransformer(**kw).state_dict()
    assert infer_model_kwargs(state)["num_heads"] == heads
    assert infer_model_kwargs(state, 8)["num_heads"] == 8  # an explicit count wins (no qk-norm to contradict it)


def test_config_and_args_state_what_the_tensors_cannot():
    state = DiffusionTransformer(**dict(PLAIN_PROJ, hidden_size=96, num_heads=4)).state_dict()
    cfg = {"model": {"name": "SiT-T/2", "num_heads": None, "align_depth": None}}  # the registry entry: 3 heads, 2
    got = infer_model_kwargs(state, info={"config": cfg})
    assert (got["num_heads"], got["align_depth"]) == (3, 2)
    cfg = {"model": {"name": "SiT-T/2", "num_heads": 4, "align_depth": 3}}  # the config's own overrides
    got = infer_model_kwargs(state, info={"config": cfg})
    assert (got["num_heads"], got["align_depth"]) == (4, 3)
    got = infer_model_kwargs(state, 8, align_depth=1, info={"config": cfg})  # the flags win
    assert (got["num_heads"], got["align_depth"]) == (8, 1)
    # official args name a model whose width (1152) is not the tensors' (96): its 16 heads would divide 96 but are
    # not this checkpoint's, so the count stays unknown; the depth they state is used
    with pytest.raises(ValueError, match=r"^cannot tell the number of attention heads .*: pass --num-heads"):
        infer_model_kwargs(state, info={"args": {"model": "SiT-XL/2", "encoder_depth": 1}})
    got = infer_model_kwargs(state, 4, info={"args": {"model": "SiT-XL/2", "encoder_depth": 1}})
    assert (got["num_heads"], got["align_depth"]) == (4, 1)
    state = DiffusionTransformer(**dict(PLAIN_PROJ, hidden_size=384, num_heads=4)).state_dict()  # an S-width
    got = infer_model_kwargs(state, info={"args": {"model": "SiT-S/2", "encoder_depth": 1}})  # the name's width
    assert (got["num_heads"], got["align_depth"]) == (6, 1)
    state = DiffusionTransformer(**PLAIN_PROJ).state_dict()
    with pytest.raises(ValueError, match=r"3 attention heads \(the checkpoint's config\) do not divide the width 80"):
        infer_model_kwargs(state, info={"config": {"model": {"name": "SiT-T/2", "align_depth": 1}}})
    with pytest.raises(ValueError, match=r"^cannot tell which block feeds the projectors .* --align-depth \(1\.\.3\)$"):
        infer_model_kwargs(state, 5)


# ---------------------------------------------------------------------------------- inconsistent state dicts


def _broken(how: str) -> dict[str, torch.Tensor]:
    state = random_model(1, **QK_NORM_PROJ).state_dict()
    if how == "huge block index":  # `blocks.99999999` alone would ask for 10^8 blocks
        state["blocks.99999999.mlp.fc1.weight"] = torch.zeros(1, 1)
    elif how == "missing block":
        state = {k: v for k, v in state.items() if not k.startswith("blocks.1.")}
    elif how == "projector shape":
        state["projectors.1.2.weight"] = torch.zeros(32, 31)
    elif how == "projector numbering":
        state = {k.replace("projectors.1.", "projectors.7."): v for k, v in state.items()}
    elif how == "width":
        state["blocks.2.mlp.fc2.weight"] = torch.zeros(96, 100)
    elif how == "head dimension":
        state = {k: torch.zeros(7) if "_norm." in k else v for k, v in state.items()}
    elif how == "stray key":
        state["blocks.0.attn.extra"] = torch.zeros(1)
    return state


@pytest.mark.parametrize(
    "how, message",
    [
        ("huge block index", r"blocks are not numbered 0\.\.3: blocks\.3 is missing but blocks\.99999999 is present"),
        ("missing block", r"blocks are not numbered 0\.\.1: blocks\.1 is missing but blocks\.2 is present"),
        ("projector shape", r"projectors\.1\.2\.weight is \(32, 31\), not \(32, 32\)"),
        ("projector numbering", r"projectors\.1 is missing but projectors\.7 is present"),
        ("width", r"blocks\.2\.mlp\.fc2\.weight is \(96, 100\), not \(96, 384\)"),
        ("head dimension", r"head dimension 7 does not divide width 96"),
        ("stray key", r"unexpected \['blocks\.0\.attn\.extra'\]"),
    ],
)
def test_an_inconsistent_state_dict_fails_before_building(how, message, tmp_path, monkeypatch, capsys):
    def never(*args, **kwargs):
        raise AssertionError("a model was built from an inconsistent state dict")

    monkeypatch.setattr("repa.loading.DiffusionTransformer", never)
    with pytest.raises(ValueError, match=message):
        load_official(_broken(how))
    torch.save(_broken(how), tmp_path / "bad.pt")
    assert cli_main(["sample", str(tmp_path / "bad.pt"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("repa sample: error:")
