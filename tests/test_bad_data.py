"""Bad data: corrupt / empty / truncated images, unusual image modes, wrong latent-shard shapes and labels out of
range either follow the documented policy or stop with one error naming the file; never a silently wrong batch."""

from __future__ import annotations

import gzip
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from repa.config import load_config
from repa.data.folder import CorruptImageError, load_image, load_image_folder
from repa.training.data import InMemoryImages, load_train_images

R = 16  # training resolution of the folder tests


def folder_config(root: Path, *extra: str):
    return load_config(None, ["data.kind=folder", f"data.root={root}", "data.space=pixel", f"data.resolution={R}",
                              "repa.encoders=[]", *extra])  # fmt: skip


@pytest.fixture
def good_folder(tmp_path):
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(tmp_path / "imgs" / c / f"{i}.png")
    return tmp_path / "imgs"


def _jpeg_bytes() -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


BAD_FILES = {
    "empty.jpg": lambda good: b"",
    "half.png": lambda good: good[: len(good) // 2],
    "half.jpg": lambda good: _jpeg_bytes()[: len(_jpeg_bytes()) // 2],
    "header-only.png": lambda good: good[:40],
    "text.png": lambda good: b"this is not an image",
    "random.gif": lambda good: bytes(np.random.default_rng(2).integers(0, 256, 500, dtype=np.uint8)),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_corrupt_image_stops_training_data_with_one_error_naming_it(good_folder, name):
    good = (good_folder / "a" / "0.png").read_bytes()
    bad = good_folder / "b" / name
    bad.write_bytes(BAD_FILES[name](good))
    with pytest.raises(CorruptImageError, match=f"corrupt or unreadable image {bad}"):
        load_train_images(folder_config(good_folder))


def test_skip_policy_counts_and_logs_corrupt_files(good_folder, capsys):
    good = (good_folder / "a" / "0.png").read_bytes()
    for name, make in BAD_FILES.items():
        (good_folder / "b" / name).write_bytes(make(good))
    images, labels, _ = load_image_folder(good_folder, R, on_error="skip", progress=False)
    assert images.shape == (4, 3, R, R) and labels.tolist() == [0, 0, 1, 1]  # only the 4 good images, in order
    assert f"skipped {len(BAD_FILES)} corrupt images in {good_folder}" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- image modes


def _png_rgb48(path: Path, rgb16: np.ndarray) -> None:
    """A 16-bit-per-channel RGB PNG (PIL cannot write one)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    h, w, _ = rgb16.shape
    rows = b"".join(b"\x00" + rgb16[y].astype(">u2").tobytes() for y in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    )


def test_image_modes_convert_to_the_documented_rgb(tmp_path):
    """Each file decodes to exactly the RGB its mode rule gives (checked on a constant image, so the centre crop
    and resize cannot hide a wrong conversion)."""
    n = 24
    cases = {  # file -> (image to save, expected RGB of every pixel)
        "gray.png": (Image.new("L", (n, n), 77), (77, 77, 77)),
        "gray-alpha.png": (Image.new("LA", (n, n), (77, 0)), (77, 77, 77)),  # transparent: alpha dropped
        "bilevel.png": (Image.new("1", (n, n), 1), (255, 255, 255)),
        "rgba.png": (Image.new("RGBA", (n, n), (200, 10, 20, 0)), (200, 10, 20)),
        "gray16.png": (Image.fromarray(np.full((n, n), 51400, np.uint16)), (200, 200, 200)),  # >> 8
        "int32.tif": (Image.fromarray(np.full((n, n), 51400, np.int32)), (200, 200, 200)),  # "I": as 16-bit
        "gray16.tif": (Image.fromarray(np.full((n, n), 2570, np.uint16)), (10, 10, 10)),
    }
    palette = Image.new("P", (n, n), 3)
    palette.putpalette([0, 0, 0] * 3 + [12, 34, 56] + [0, 0, 0] * 252)
    palette.info["transparency"] = 3  # a transparent palette entry keeps its colour
    cases["palette.png"] = (palette, (12, 34, 56))
    for name, (img, rgb) in cases.items():
        img.save(tmp_path / name)
        with Image.open(tmp_path / name) as check:
            assert check.mode == img.mode or (img.mode, check.mode) == ("I;16", "I;16"), name
        out = load_image(tmp_path / name, R)
        assert out.shape == (R, R, 3) and out.dtype == np.uint8, name
        assert (out == np.array(rgb, np.uint8)).all(), (name, out[0, 0], rgb)
    _png_rgb48(tmp_path / "rgb48.png", np.full((n, n, 3), [51400, 2570, 65535], np.uint16))
    assert (load_image(tmp_path / "rgb48.png", R) == np.array([200, 10, 255], np.uint8)).all()
    Image.new("CMYK", (n, n), (0, 255, 0, 0)).save(tmp_path / "cmyk.jpg")  # magenta, through lossy JPEG
    out = load_image(tmp_path / "cmyk.jpg", R).astype(int)
    assert np.abs(out - np.array([255, 0, 255])).max() <= 6


@pytest.mark.parametrize(
    "name, image, reason",
    [
        ("float.tif", Image.fromarray(np.full((8, 8), 0.5, np.float32)), "unsupported image mode 'F'"),
        ("lab.tif", Image.new("LAB", (8, 8), (50, 0, 0)), "unsupported image mode 'LAB'"),
        ("int32-neg.tif", Image.fromarray(np.full((8, 8), -5, np.int32)), "outside the 16-bit range"),
        ("int32-big.tif", Image.fromarray(np.full((8, 8), 70000, np.int32)), "outside the 16-bit range"),
    ],
)
def test_modes_without_a_faithful_rgb_are_refused_naming_the_file(tmp_path, name, image, reason):
    image.save(tmp_path / name)
    with pytest.raises(CorruptImageError, match=f"{tmp_path / name}: ValueError: .*{reason}"):
        load_image(tmp_path / name, R)


def test_odd_sizes_give_the_training_shape(tmp_path):
    for size in [(1, 1), (1, 300), (300, 2), (R, R)]:
        Image.new("RGB", size, (9, 8, 7)).save(tmp_path / "x.png")
        out = load_image(tmp_path / "x.png", R)
        assert out.shape == (R, R, 3) and (out == [9, 8, 7]).all(), size


# -------------------------------------------------------------------------------------------------- labels


def test_label_out_of_range_in_idx_files_names_the_file(tmp_path):
    from tests.helpers.tiny import write_idx_dataset

    root = write_idx_dataset(tmp_path / "fm", num=20)
    labels = root / "train-labels-idx1-ubyte.gz"
    raw = bytearray(gzip.decompress(labels.read_bytes()))
    raw[8 + 5] = 12  # item 5: class 12 of 10
    labels.write_bytes(gzip.compress(bytes(raw)))
    for num_train in ("null", "10"):  # a class-balanced subset must not silently drop the bad item either
        cfg = load_config(None, ["data.kind=fashion-mnist", "data.space=pixel", f"data.root={root}",
                                 f"data.num_train={num_train}", "repa.encoders=[]"])  # fmt: skip
        with pytest.raises(ValueError, match=f"{labels}: label 12 outside"):
            load_train_images(cfg)


def test_in_memory_labels_are_checked():
    images = torch.zeros(3, 1, 4, 4, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"toy: label -1 of item 2 is outside \[0, 10\)"):
        InMemoryImages(images, torch.tensor([0, 9, -1]), 10, "toy")
    with pytest.raises(ValueError, match="uint8"):
        InMemoryImages(images.float(), torch.tensor([0, 1, 2]), 10, "toy")


# ---------------------------------------------------------------------------------------------- latent shards


def _write_shards(out: Path, labels: list[list[int]], classes=("a", "b")) -> None:
    """A minimal `repa prepare` output (2 x 3 items, 4x2x2 latents, one 4-token encoder) without a VAE."""
    from repa.data.shard_writer import write_manifest, write_shard
    from repa.data.shards import FORMAT, VERSION

    config = {"resolution": 16, "vae": "stub", "latent_scale": 0.18215, "vae_downsample": 8,
              "latent_shape": [4, 2, 2], "latent_dtype": "float32", "target_dtype": "float16", "flips": [False],
              "encoders": [{"name": "enc", "source": "", "resolution": 28, "layer": None, "token_grid": [2, 2],
                            "num_tokens": 4, "embed_dim": 8}]}  # fmt: skip
    plan = {"format": FORMAT, "version": VERSION, "config": config, "shard_size": 3,
            "num_shards": len(labels), "source": {"num_files": 3 * len(labels), "classes": list(classes),
                                                  "fingerprint": "test"}}  # fmt: skip
    out.mkdir(parents=True)
    (out / "prepare.json").write_text(json.dumps(plan))
    g = torch.Generator().manual_seed(0)
    for s, lab in enumerate(labels):
        k = len(lab)
        part = {"mean": torch.randn(k, 1, 4, 2, 2, generator=g), "std": torch.rand(k, 1, 4, 2, 2, generator=g),
                "tokens": [torch.randn(k, 1, 4, 8, generator=g).half()], "labels": torch.tensor(lab),
                "file_index": torch.arange(3 * s, 3 * s + k)}  # fmt: skip
        write_shard(out, s, plan, [part], [])
    write_manifest(out)


def _latent_config(root: Path):
    return load_config(None, [f"data.root={root}", "data.resolution=16", "data.hflip=false", "repa.encoders=[enc]",
                              "repa.encoder_resolution=28"])  # fmt: skip


def test_latent_shards_load_for_training(tmp_path):
    _write_shards(tmp_path / "ok", [[0, 1, 0], [1, 1, 0]])
    data = load_train_images(_latent_config(tmp_path / "ok"))
    assert data.num_items == 6 and data.labels.tolist() == [0, 1, 0, 1, 1, 0]


def test_latent_label_out_of_range_names_the_shard_file(tmp_path):
    _write_shards(tmp_path / "s", [[0, 1, 0], [1, 2, 0]])  # 2 classes: label 2 would be the null (CFG) class
    with pytest.raises(ValueError, match=r"latents-00001\.safetensors: label 2 of item 1 is outside \[0, 2\)"):
        load_train_images(_latent_config(tmp_path / "s"))


def test_wrong_latent_shard_shapes_stop_training_naming_the_file(tmp_path):
    from safetensors.torch import load_file, save_file

    from repa.data.shards import ShardError

    _write_shards(tmp_path / "s", [[0, 1, 0], [1, 1, 0]])
    path = tmp_path / "s" / "latents-00001.safetensors"
    tensors = load_file(str(path))
    save_file({**tensors, "std": tensors["std"][:, :, :3].contiguous()}, str(path))  # 3 latent channels, not 4
    with pytest.raises(ShardError, match=r"latents-00001\.safetensors: tensor 'std' has shape \(3, 1, 3, 2, 2\)"):
        load_train_images(_latent_config(tmp_path / "s"))
    targets = tmp_path / "s" / "targets-enc-00000.safetensors"
    save_file({"tokens": torch.zeros(3, 1, 5, 8, dtype=torch.float16)}, str(targets))  # 5 tokens, not 4
    save_file(tensors, str(path))
    with pytest.raises(ShardError, match=r"targets-enc-00000\.safetensors: tensor 'tokens' has shape \(3, 1, 5, 8\)"):
        load_train_images(_latent_config(tmp_path / "s"))
