"""`repa prepare` and `LatentShards`: end to end on a generated folder with a random small SD-VAE and encoder,
resume after an interruption equals an uninterrupted run, ranks split shards, corrupt files, damaged shards."""

from __future__ import annotations

import json
import os
import signal
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from repa.cli.main import main as cli_main
from repa.data.folder import CorruptImageError, load_image
from repa.data.prepare import prepare_shards
from repa.data.shards import LatentShards, ShardError
from repa.data.vae import LATENT_SCALE
from repa.data.vae_spec import load_vae
from repa.encoders import load_encoder

torch.set_num_threads(2)

ENC_CONFIG = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
CLI_ARGS = ["--resolution", "32", "--vae", "random:small", "--encoders", "random-dinov2-vit-s",
            "--encoder-resolution", "28", "--encoder-random-init", "--encoder-config", json.dumps(ENC_CONFIG),
            "--shard-size", "5", "--batch-size", "4", "--flip", "--workers", "0", "--no-progress"]  # fmt: skip


def make_folder(root: Path, per_class: int = 6, seed: int = 0) -> Path:
    """2 classes x `per_class` PNGs of varied sizes (so the ADM crop resizes and crops)."""
    rng = np.random.default_rng(seed)
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = rng.integers(0, 256, (64, 48 + 8 * i, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / c / f"{i:02d}.png")
    return root


def tiny_parts():
    vae = load_vae("random:small", "cpu")
    enc = load_encoder("random-dinov2-vit-s", 28, random_init=True, config_overrides=ENC_CONFIG)
    return vae, enc


def run_api(src, out, parts=None, **kw):
    vae, enc = parts or tiny_parts()
    args = dict(vae=vae, encoders=[enc], resolution=32, shard_size=5, batch_size=4, flip=True, progress=False)
    return prepare_shards(src, out, **{**args, **kw})


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.suffix == ".safetensors"}


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def reference(src, tmp_path_factory):
    """An uninterrupted run through the command line."""
    out = tmp_path_factory.mktemp("ref") / "shards"
    assert cli_main(["prepare", str(src), str(out), *CLI_ARGS]) == 0
    return out


def test_prepare_end_to_end_and_reader(src, reference):
    m = json.loads((reference / "manifest.json").read_text())
    assert m["num_items"] == 12 and m["num_shards"] == 3 and m["classes"] == ["cat", "dog"]
    assert m["config"]["latent_scale"] == LATENT_SCALE and m["config"]["flips"] == [False, True]
    assert m["config"]["vae"] == "random:small" and m["config"]["latent_shape"] == [4, 4, 4]
    assert m["config"]["encoders"][0]["token_grid"] == [2, 2] and m["skipped"]["count"] == 0

    data = LatentShards(reference, verify=True)
    assert (data.num_items, data.num_classes, data.sample_shape, len(data)) == (12, 2, (4, 4, 4), 12)
    assert (
        data.labels.tolist() == [0] * 6 + [1] * 6 and data.has_flips and data.encoder_names == ["random-dinov2-vit-s"]
    )

    # stored moments / targets are those of the (mirrored) centre-cropped images
    vae, enc = tiny_parts()
    paths = sorted(src.rglob("*.png"))
    idx, flips = torch.tensor([7, 0, 11, 5]), torch.tensor([True, False, False, True])
    images = torch.stack([torch.from_numpy(np.array(load_image(paths[i], 32))).permute(2, 0, 1) for i in idx])
    images = torch.where(flips[:, None, None, None], images.flip(-1), images)
    mean, std = data.moments(idx, flips)
    want_mean, want_std = vae.encode_moments(images.float() / 127.5 - 1)
    torch.testing.assert_close(mean, want_mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(std, want_std, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(data.targets(idx, flips)[0], enc(images), atol=2e-3, rtol=2e-3)  # float16 storage

    # batch: x = (mean + std * eps) * 0.18215, eps from the caller's generator (or given), reproducible
    b1 = data.batch(idx, flips, "cpu", torch.Generator().manual_seed(3))
    b2 = data.batch(idx, flips, "cpu", torch.Generator().manual_seed(3))
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(3))
    assert torch.equal(b1["x"], (mean + std * eps) * LATENT_SCALE)  # bit-identical: SD-VAE's plain scale
    assert torch.equal(b1["x"], b2["x"]) and b1["y"].tolist() == [1, 0, 1, 0]
    assert (
        m["latent_norm"] == {"source": "vae", "scale": LATENT_SCALE, "shift": 0.0} and "latent_norm" not in m["config"]
    )
    assert data.scale == LATENT_SCALE and data.latent_norm.scalar_scale == LATENT_SCALE
    torch.testing.assert_close(data.batch(idx, flips, "cpu", eps=eps)["x"], b1["x"])
    assert [t.shape for t in b1["targets"]] == [(4, 4, 32)] and b1["x"].dtype == torch.float32
    data.check_encoders(["random-dinov2-vit-s"], 28, None)
    with pytest.raises(ValueError, match="rerun `repa prepare`"):
        data.check_encoders(["dinov2-vit-b"], 224)
    with pytest.raises(IndexError):
        data.batch(torch.tensor([12]), torch.tensor([False]), "cpu")


def test_resume_after_interruption_equals_uninterrupted(src, reference, tmp_path):
    out = tmp_path / "shards"

    def crash(shard):
        raise KeyboardInterrupt(f"killed after shard {shard}")

    with pytest.raises(KeyboardInterrupt):
        run_api(src, out, on_shard_done=crash)
    assert (out / "shard-00000.json").is_file() and not (out / "manifest.json").exists()
    with pytest.raises(FileNotFoundError, match="unfinished"):
        LatentShards(out)
    (out / "latents-00001.safetensors").write_bytes(b"half-written by a killed process")  # no record: redone
    (out / ".latents-00002.safetensors.tmp-999").write_bytes(b"stale temp file")
    done = []
    run_api(src, out, on_shard_done=done.append)
    assert done == [1, 2]  # shard 0 was skipped
    assert not list(out.glob(".*")), "stale temporary files are removed"
    assert files_of(out) == files_of(reference)
    assert (
        json.loads((out / "manifest.json").read_text())["shards"]
        == json.loads((reference / "manifest.json").read_text())["shards"]
    )
    with pytest.raises(ValueError, match="other settings"):
        run_api(src, out, resolution=16)  # same folder, different plan


def test_ranks_split_shards_and_equal_one_process(src, reference, tmp_path):
    """Two ranks as two threads meeting at a real barrier: rank r takes shards s % 2 == r; same bytes as 1 process."""
    out = tmp_path / "shards"
    barrier = threading.Barrier(2, timeout=120)
    seen, results, errors = {0: [], 1: []}, {}, []
    parts = {r: tiny_parts() for r in (0, 1)}  # built here: random init seeds the global RNG, threads would race

    def rank_main(rank):
        try:
            results[rank] = run_api(src, out, parts[rank], rank=rank, world_size=2, barrier=barrier.wait,
                                    on_shard_done=seen[rank].append)  # fmt: skip
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert seen == {0: [0, 2], 1: [1]} and results[1] is None and results[0]["num_items"] == 12
    assert files_of(out) == files_of(reference)


def test_corrupt_images_skip_or_raise(tmp_path):
    src = make_folder(tmp_path / "src", per_class=3)
    (src / "dog" / "zz_empty.png").write_bytes(b"")
    (src / "cat" / "zz_truncated.png").write_bytes((src / "cat" / "00.png").read_bytes()[:60])
    with pytest.raises(CorruptImageError, match="zz_truncated.png"):
        run_api(src, tmp_path / "raise", flip=False)
    m = run_api(src, tmp_path / "skip", flip=False, on_error="skip", latent_dtype="float16", images=True)
    assert m["skipped"] == {"count": 2, "files": ["cat/zz_truncated.png", "dog/zz_empty.png"]}
    data = LatentShards(tmp_path / "skip")
    assert data.num_items == 6 and data.labels.tolist() == [0, 0, 0, 1, 1, 1]
    # --images: the centre crops themselves, mirrored on read, for encoders run during training
    crop = torch.from_numpy(np.array(load_image(src / "dog" / "01.png", 32))).permute(2, 0, 1)
    assert torch.equal(
        data.images(torch.tensor([4, 4]), torch.tensor([False, True])), torch.stack([crop, crop.flip(-1)])
    )
    assert torch.equal(data.batch(torch.tensor([4]), torch.tensor([False]), "cpu")["images"][0], crop)
    with pytest.raises(ValueError, match="without --flip"):
        data.batch(torch.tensor([0]), torch.tensor([True]), "cpu")
    assert data.batch(torch.tensor([0, 5]), torch.tensor([False, False]), "cpu")["x"].dtype == torch.float32


def test_damaged_shards_give_clear_errors(reference, tmp_path):
    from safetensors.torch import load_file, save_file

    out = tmp_path / "shards"
    out.mkdir()
    for p in reference.iterdir():
        (out / p.name).write_bytes(p.read_bytes())
    bad = out / "latents-00001.safetensors"
    tensors = load_file(str(bad))
    tensors["mean"] = tensors["mean"][..., :3, :3].contiguous()
    save_file(tensors, str(bad))
    with pytest.raises(ShardError, match=r"latents-00001\.safetensors.*'mean' has shape \(5, 2, 4, 3, 3\)"):
        LatentShards(out)
    target = out / "targets-random-dinov2-vit-s-00002.safetensors"
    (out / "latents-00001.safetensors").write_bytes((reference / "latents-00001.safetensors").read_bytes())
    target.write_bytes(target.read_bytes()[:-16])
    with pytest.raises(ShardError, match=r"targets-random-dinov2-vit-s-00002\.safetensors is truncated"):
        LatentShards(out)
    target.unlink()
    with pytest.raises(ShardError, match="missing"):
        LatentShards(out)


@contextmanager
def fails_instead_of_hanging(seconds: int):
    """SIGALRM after `seconds`: a test that opened a FIFO fails with TimeoutError instead of blocking forever."""

    def boom(*_):
        raise TimeoutError(f"blocked for {seconds} s: something opened a FIFO")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_broken_links_fifos_and_image_named_directories_are_reported_like_corrupt_files(tmp_path, capsys):
    """Entries named like images that are no regular file used to vanish from the file list; now they stop
    `prepare` (on_error=raise) or are skipped, counted, printed and listed in manifest.json (on_error=skip), and the
    FIFO is never opened (the alarm would fire)."""
    src = make_folder(tmp_path / "src", per_class=2)
    (src / "cat" / "zz_broken.png").symlink_to(tmp_path / "nowhere.png")
    os.mkfifo(src / "dog" / "zz_fifo.jpg")
    (src / "dog" / "zz_dir.png").mkdir()
    Image.fromarray(np.full((40, 40, 3), 7, np.uint8)).save(src / "dog" / "zz_dir.png" / "inner.png")  # still read
    (src / "dog" / "zz_notes.txt").write_text("not named like an image: not listed")
    with fails_instead_of_hanging(300):
        with pytest.raises(CorruptImageError, match=r"zz_broken\.png: broken symbolic link"):
            run_api(src, tmp_path / "raise", flip=False)
        m = run_api(src, tmp_path / "skip", flip=False, on_error="skip")
    assert m["skipped"] == {"count": 3, "files": ["cat/zz_broken.png", "dog/zz_dir.png", "dog/zz_fifo.jpg"]}
    assert m["num_items"] == 5 and m["source"]["num_files"] == 8  # 2 + 2 images, inner.png, the 3 entries
    out = capsys.readouterr().out
    assert "3 corrupt or unreadable files skipped, e.g. cat/zz_broken.png; listed in manifest.json" in out
    data = LatentShards(tmp_path / "skip")
    assert data.num_items == 5 and data.labels.tolist() == [0, 0, 1, 1, 1]
