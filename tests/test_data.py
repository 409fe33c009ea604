"""Data: IDX reader, Fashion-MNIST lookup, ADM centre crop, colour conversion, corrupt-image policies, VAE wrapper,
encoder-target cache (equality with the online encoder, reuse, mismatch, atomic + resumable writes)."""

from __future__ import annotations

import gzip
import json
import struct

import numpy as np
import pytest
import torch
from PIL import Image

import repa.data.fashion_mnist as fm
from repa.data import (
    LATENT_SCALE,
    VAE,
    CorruptImageError,
    IDXFormatError,
    ImageFolder,
    TargetCache,
    TargetCacheMismatch,
    build_target_cache,
    center_crop_arr,
    load_fashion_mnist,
    load_image_folder,
    read_idx,
    skip_none_collate,
)
from repa.data.folder import to_rgb
from repa.encoders import load_encoder

torch.set_num_threads(2)


def idx_bytes(arr: np.ndarray) -> bytes:
    return bytes([0, 0, 8, arr.ndim]) + b"".join(struct.pack(">I", s) for s in arr.shape) + arr.tobytes()


def write_fmnist(folder, n=6, gz=True, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    for stem, arr in [("train-images-idx3-ubyte", images), ("train-labels-idx1-ubyte", labels)]:
        raw = idx_bytes(arr)
        (folder / (stem + (".gz" if gz else ""))).write_bytes(gzip.compress(raw) if gz else raw)
    return images, labels


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_reader_synthetic(tmp_path, gz):
    images, labels = write_fmnist(tmp_path / "fm", gz=gz)
    x, y = load_fashion_mnist("train", root=tmp_path / "fm")
    assert x.dtype == torch.uint8 and y.dtype == torch.int64 and x.shape == (6, 28, 28)
    np.testing.assert_array_equal(x.numpy(), images)
    np.testing.assert_array_equal(y.numpy(), labels)


def test_idx_corrupt_files(tmp_path):
    good = idx_bytes(np.zeros((2, 28, 28), np.uint8))
    cases = {"magic": b"\x00\x00\x09\x03" + good[4:], "truncated": good[:-10], "short": good[:6]}
    for name, raw in cases.items():
        (tmp_path / name).write_bytes(raw)
        with pytest.raises(IDXFormatError, match=name if name == "magic" else str(tmp_path)):
            read_idx(tmp_path / name, 3)
    (tmp_path / "bad.gz").write_bytes(b"not gzip")
    with pytest.raises(IDXFormatError, match="bad.gz"):
        read_idx(tmp_path / "bad.gz", 3)


def test_fashion_mnist_not_found_names_every_place(tmp_path, monkeypatch):
    monkeypatch.setattr(fm, "DEBIAN_DIR", tmp_path / "debian")
    monkeypatch.setenv("REPA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("REPA_DATA", str(tmp_path / "data"))
    with pytest.raises(FileNotFoundError) as info:
        load_fashion_mnist("test", root=tmp_path / "root", download=False)
    msg = str(info.value)
    for place in ["root", "data/fashion-mnist", "debian", "cache/data/fashion-mnist", "dataset-fashion-mnist"]:
        assert place in msg
    write_fmnist(tmp_path / "data" / "fashion-mnist")  # $REPA_DATA is searched
    assert len(load_fashion_mnist("train", download=False)[0]) == 6
    with pytest.raises(ValueError):
        load_fashion_mnist("val")


@pytest.mark.skipif(not fm.DEBIAN_DIR.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_real_fashion_mnist():
    x, y = load_fashion_mnist("test")
    assert x.shape == (10000, 28, 28) and torch.equal(y.bincount(), torch.full((10,), 1000))


def test_center_crop_known_answers():
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (100, 150, 3), dtype=np.uint8)  # each pixel a 4x4 block of the input
    big = Image.fromarray(np.repeat(np.repeat(blocks, 4, 0), 4, 1))  # 600 x 400 (W x H)
    out = center_crop_arr(big, 100)  # box 600x400 -> 300x200 -> 150x100 (exact), no resize, crop x 25..125
    np.testing.assert_array_equal(out, blocks[:, 25:125])
    small = Image.fromarray(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8))  # 7 x 5 -> bicubic 6 x 4, crop x 1
    ref = np.asarray(small.resize((6, 4), resample=Image.BICUBIC))[:, 1:5]
    np.testing.assert_array_equal(center_crop_arr(small, 4), ref)
    tall = Image.fromarray(np.full((40, 10, 3), 77, np.uint8))  # upscaled x2 to 20 x 80, crop y 30..50
    out = center_crop_arr(tall, 20)
    assert out.shape == (20, 20, 3) and (out == 77).all()


def test_rgb_conversion_of_modes():
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    for img in [Image.fromarray(gray), Image.fromarray(np.stack([gray, gray], -1))]:
        np.testing.assert_array_equal(np.asarray(to_rgb(img)), np.repeat(gray[..., None], 3, -1))
    rgba = np.zeros((3, 4, 4), np.uint8)
    rgba[..., 0] = 200  # fully transparent red: alpha is dropped, colour kept
    np.testing.assert_array_equal(np.asarray(to_rgb(Image.fromarray(rgba)))[..., 0], 200)
    i16 = Image.fromarray(gray.astype(np.uint16) * 256)
    np.testing.assert_array_equal(np.asarray(to_rgb(i16))[..., 1], gray)
    for img in [Image.fromarray(gray).convert("P"), Image.new("CMYK", (4, 3), (0, 255, 0, 0))]:
        arr = np.asarray(to_rgb(img))
        assert arr.shape == (3, 4, 3) and arr.dtype == np.uint8


def make_folder(root, corrupt=True):
    rng = np.random.default_rng(0)
    for name in ["cat", "dog"]:
        (root / name).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (40 + 8 * i, 48, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).save(root / "dog" / "gray.jpg")
    (root / "dog" / "notes.txt").write_text("ignored")
    if corrupt:
        (root / "cat" / "empty.jpg").write_bytes(b"")
        png = (root / "dog" / "0.png").read_bytes()
        (root / "dog" / "trunc.png").write_bytes(png[: len(png) // 2])
        (root / "cat" / "text.jpg").write_text("not an image")


def test_image_folder_and_corrupt_policies(tmp_path):
    make_folder(tmp_path / "ok", corrupt=False)
    images, labels, classes = load_image_folder(tmp_path / "ok", 16, progress=False)
    assert images.shape == (5, 3, 16, 16) and images.dtype == torch.uint8
    assert classes == ["cat", "dog"] and labels.tolist() == [0, 0, 1, 1, 1]
    make_folder(tmp_path / "bad")
    ds = ImageFolder(tmp_path / "bad", 16)
    for i, (path, _) in enumerate(ds.samples):
        if path.name in ("empty.jpg", "trunc.png", "text.jpg"):
            with pytest.raises(CorruptImageError, match=path.name):
                ds[i]
    skip = ImageFolder(tmp_path / "bad", 16, on_error="skip")
    batch = skip_none_collate([skip[i] for i in range(len(skip))])
    assert batch["image"].shape == (5, 3, 16, 16) and skip.num_skipped == 3
    images, _, _ = load_image_folder(tmp_path / "bad", 16, on_error="skip", progress=False)
    assert len(images) == 5
    with pytest.raises(CorruptImageError):
        load_image_folder(tmp_path / "bad", 16, progress=False)


def test_vae_roundtrip_shapes_and_scale():
    assert LATENT_SCALE == 0.18215
    vae = VAE.from_config()
    assert not vae.training and all(not p.requires_grad for p in vae.parameters())
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    mean, std = vae.encode_moments(x)
    assert mean.shape == std.shape == (2, 4, 8, 8) and (std > 0).all()
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    z = vae.sample_latents(mean, std, g1)
    torch.testing.assert_close(z, vae.sample_latents(mean, std, g2))
    torch.testing.assert_close(vae.sample_latents(mean, torch.zeros_like(std)), mean * LATENT_SCALE)
    out = vae.decode(z)
    assert out.shape == (2, 3, 16, 16) and out.dtype == torch.float32
    u8 = vae.decode_to_uint8(z)
    assert u8.dtype == torch.uint8 and u8.shape == (2, 3, 16, 16)
    vae.train()
    assert not vae.training


def test_vae_missing_weights_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(RuntimeError, match="HF_HUB_OFFLINE"):
        VAE.from_pretrained("stabilityai/sd-vae-ft-ema")


def tiny_encoder(layer=None):
    over = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2)
    return load_encoder("random-dinov2-vit-s", 28, random_init=True, config_overrides=over, layer=layer)


def fm_images(n=10, seed=0):
    return torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_target_cache_equals_online_encoder(tmp_path):
    enc, images = tiny_encoder(), fm_images()
    path = tmp_path / "t.safetensors"
    cache = build_target_cache(enc, images, path, batch_size=4, flips=(False, True), progress=False)
    assert cache.tensor.shape == (2, 10, 4, 32) and cache.tensor.dtype == torch.float16
    online, mirrored = enc(images), enc(images.flip(-1))
    cos = torch.nn.functional.cosine_similarity(cache.get(torch.arange(10)), online, dim=-1)
    assert cos.min() > 0.99999  # float16 storage is harmless for a cosine loss
    torch.testing.assert_close(cache.get(3, True), mirrored[3], atol=2e-3 * online.abs().max(), rtol=2e-3)
    flip = torch.tensor([True, False])
    torch.testing.assert_close(
        cache.get(torch.tensor([1, 2]), flip), torch.stack([mirrored[1], online[2]]), atol=0.02, rtol=2e-3
    )
    f32 = build_target_cache(
        enc, images, tmp_path / "f32.safetensors", flips=(False,), dtype=torch.float32, progress=False
    )
    torch.testing.assert_close(f32.get(torch.arange(10)), online)
    from safetensors import safe_open  # a standard safetensors file with our JSON metadata

    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["repa"])
        assert f.get_tensor("targets").shape == (2, 10, 4, 32)
    assert meta["encoder"] == "random-dinov2-vit-s" and meta["num_images"] == 10 and meta["flips"] == [False, True]
    assert meta["resolution"] == 28 and meta["layer"] is None and meta["num_tokens"] == 4 and meta["embed_dim"] == 32


def test_target_cache_reuse_and_mismatch(tmp_path, monkeypatch):
    enc, images = tiny_encoder(), fm_images()
    path = tmp_path / "t.safetensors"
    first = build_target_cache(enc, images, path, progress=False)
    monkeypatch.setattr(type(enc), "forward", lambda *a: pytest.fail("a matching cache must be reused"))
    again = build_target_cache(enc, images, path, progress=False)
    assert torch.equal(again.tensor, first.tensor)
    with pytest.raises(TargetCacheMismatch, match="fingerprint"):
        build_target_cache(enc, fm_images(seed=1), path, progress=False)
    monkeypatch.undo()
    with pytest.raises(TargetCacheMismatch, match="layer"):
        build_target_cache(tiny_encoder(layer=1), images, path, progress=False)
    rebuilt = build_target_cache(tiny_encoder(layer=1), images, path, progress=False, overwrite=True)
    assert rebuilt.meta["layer"] == 1
    with pytest.raises(TargetCacheMismatch, match="resolution"):
        TargetCache.load(path, expect={"resolution": 98})


def test_target_cache_atomic_and_resumable(tmp_path):
    enc, images = tiny_encoder(), fm_images(12)
    calls = {"n": 0}

    class Crashing(torch.nn.Module):
        def __init__(self, inner, crash_at):
            super().__init__()
            self.inner, self.crash_at = inner, crash_at
            self.name, self.source, self.resolution, self.layer = inner.name, inner.source, inner.resolution, None
            self.token_grid, self.embed_dim = inner.token_grid, inner.embed_dim

        def forward(self, x):
            calls["n"] += 1
            if calls["n"] == self.crash_at:
                raise KeyboardInterrupt("simulated crash")
            return self.inner(x)

    path = tmp_path / "t.safetensors"
    with pytest.raises(KeyboardInterrupt):
        build_target_cache(
            Crashing(enc, 3), images, path, batch_size=4, flips=(False, True), progress=False, flush_seconds=0
        )
    assert not path.exists() and (tmp_path / "t.safetensors.partial").exists()  # never a half-written cache
    calls["n"] = 0
    cache = build_target_cache(
        Crashing(enc, -1), images, path, batch_size=4, flips=(False, True), progress=False, flush_seconds=0
    )
    assert calls["n"] == 4  # 6 batches in all, 2 were done before the crash
    assert not (tmp_path / "t.safetensors.partial").exists()
    full = build_target_cache(
        enc, images, tmp_path / "full.safetensors", batch_size=4, flips=(False, True), progress=False
    )
    assert torch.equal(cache.tensor, full.tensor)


def test_target_cache_refuses_float16_overflow(tmp_path):
    class Huge(torch.nn.Module):
        name, source, resolution, layer, token_grid, embed_dim = "huge", "", 28, None, (2, 2), 3

        def forward(self, x):
            return torch.full((len(x), 4, 3), 1e5)

    with pytest.raises(ValueError, match="float16"):
        build_target_cache(Huge(), fm_images(2), tmp_path / "h.safetensors", progress=False)
    ok = build_target_cache(Huge(), fm_images(2), tmp_path / "h32.safetensors", progress=False, dtype=torch.float32)
    assert ok.get(0).max() == 1e5


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_damaged_target_cache_names_the_file(tmp_path, damage):
    enc, images = tiny_encoder(), fm_images()
    path = tmp_path / "t.safetensors"
    first = build_target_cache(enc, images, path, progress=False)
    data = path.read_bytes()
    del first
    damaged = {"truncate": data[: len(data) - 100], "garbage": b"\xff" * 64 + data[64:], "empty": b""}[damage]
    path.write_bytes(damaged)
    with pytest.raises(TargetCacheMismatch, match=f"target cache {path} is damaged"):
        TargetCache.load(path)
    with pytest.raises(TargetCacheMismatch, match="damaged"):
        build_target_cache(enc, images, path, progress=False)
    rebuilt = build_target_cache(enc, images, path, progress=False, overwrite=True)
    assert len(rebuilt) == 10


def test_other_safetensors_file_is_not_called_damaged(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"targets": torch.zeros(1, 2, 3, 4)}, str(path))
    with pytest.raises(TargetCacheMismatch, match="is not a repa target cache") as info:
        TargetCache.load(path)
    assert "damaged" not in str(info.value)


def test_entries_named_like_images_that_are_no_regular_file_are_refused_without_opening(tmp_path):
    """A broken symbolic link, a symbolic-link loop, a FIFO and a directory named like images are listed by
    `find_images` and refused by `load_image` from `stat` alone (the FIFO is never opened: the alarm would fire);
    `ImageFolder(on_error="skip")` counts them like corrupt files, and the directory's contents are still images."""
    import os
    import signal

    from repa.data.folder import find_images, load_image

    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "a" / "ok.png")
    (root / "a" / "broken.png").symlink_to(tmp_path / "missing.png")
    (root / "a" / "loop.jpg").symlink_to(root / "a" / "loop.jpg")
    os.mkfifo(root / "a" / "pipe.png")
    (root / "a" / "dir.png").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "a" / "dir.png" / "inside.png")
    samples, classes = find_images(root)
    names = [p.relative_to(root / "a").as_posix() for p, _ in samples]
    assert classes == ["a"] and names == ["broken.png", "dir.png", "dir.png/inside.png", "loop.jpg", "ok.png",
                                          "pipe.png"]  # fmt: skip
    reasons = {"broken.png": "broken symbolic link", "loop.jpg": "cannot stat it", "pipe.png": "it is a FIFO",
               "dir.png": "it is a directory"}  # fmt: skip

    def boom(*_):
        raise TimeoutError("blocked: the FIFO was opened")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(120)
    try:
        for name, why in reasons.items():
            with pytest.raises(CorruptImageError, match=f"{name}: .*{why}"):
                load_image(root / "a" / name, 8)
        ds = ImageFolder(root, 8, on_error="skip")
        items = [ds[i] for i in range(len(ds))]
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert ds.num_skipped == 4 and sorted(p.name for p in ds.skipped) == sorted(reasons)
    assert sum(it is not None for it in items) == 2
