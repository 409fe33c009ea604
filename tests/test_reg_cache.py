"""REG with cached targets: the target cache stores the encoder's global token beside the patch tokens, so
`repa.class_token=true` runs with `repa.cache_targets=true` and gives the loss of the online encoder; caches written
before it (no global token) still serve plain REPA, and a REG run rebuilds one with them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from repa.config import ConfigError, load_config
from repa.data.features import TargetCache, build_target_cache, describe
from repa.encoders import load_encoder
from repa.losses import RepaLoss
from repa.models import build_model
from repa.training import setup, train
from repa.training.data import InMemoryImages
from tests.helpers.tiny import metrics, tiny_overrides

torch.set_num_threads(2)
ROOT = Path(__file__).parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
TINY_DINOV2 = {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 32}

pytestmark = pytest.mark.usefixtures("isolated_cache")


def tiny_dinov2(resolution: int = 56):
    """A random-weight DINOv2 of the real architecture (it has a CLS token: its global token)."""
    return load_encoder("random-dinov2-vit-s", resolution, random_init=True, config_overrides=TINY_DINOV2)


def images(n: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def old_format_cache(cache: TargetCache, path: Path) -> None:
    """The file an earlier version wrote: the patch tokens only, no `global_token` entry in the metadata."""
    meta = {k: v for k, v in cache.meta.items() if k != "global_token"}
    save_file({"targets": cache.tensor.clone()}, str(path), {"repa": json.dumps(meta)})


# ----------------------------------------------------------------------------------------- the cache file


def test_target_cache_stores_the_global_token_beside_the_patch_tokens(tmp_path):
    enc, imgs = tiny_dinov2(), images()
    assert enc.global_token_kind == "cls"
    path = tmp_path / "t.safetensors"
    cache = build_target_cache(enc, imgs, path, batch_size=4, flips=(False, True), dtype=torch.float32, progress=False)
    assert cache.tensor.shape == (2, 6, 16, 16) and cache.global_tokens.shape == (2, 6, 16)
    for flip, view in ((0, imgs), (1, imgs.flip(-1))):
        online = enc.encode(view, global_token=True)
        torch.testing.assert_close(cache.tensor[flip], online.tokens)
        torch.testing.assert_close(cache.global_tokens[flip], online.global_token)
    with safe_open(str(path), "pt") as f:  # still a standard safetensors file, now with two tensors
        assert set(f.keys()) == {"targets", "global_tokens"}
        torch.testing.assert_close(f.get_tensor("global_tokens"), cache.global_tokens)
        assert json.loads(f.metadata()["repa"])["global_token"] is True
    assert describe(cache.meta).endswith("+ global token")
    # float16 storage (the default) keeps the global token within float16 precision
    half = build_target_cache(enc, imgs, tmp_path / "h.safetensors", progress=False)
    assert half.global_tokens.dtype == torch.float16
    torch.testing.assert_close(half.global_tokens[0].float(), cache.global_tokens[0], atol=2e-3, rtol=2e-3)


def test_an_old_cache_serves_plain_repa_and_is_rebuilt_for_reg(tmp_path, monkeypatch, capsys):
    enc, imgs = tiny_dinov2(), images()
    path = tmp_path / "t.safetensors"
    old_format_cache(build_target_cache(enc, imgs, tmp_path / "new.safetensors", progress=False), path)
    old = TargetCache.load(path)
    assert old.global_tokens is None and "global token" not in describe(old.meta)
    monkeypatch.setattr(type(enc), "forward", lambda *a: pytest.fail("a matching cache must be reused"))
    monkeypatch.setattr(type(enc), "encode", lambda *a, **k: pytest.fail("a matching cache must be reused"))
    reused = build_target_cache(enc, imgs, path, progress=False)  # plain REPA: the old cache as it is
    assert torch.equal(reused.tensor, old.tensor) and reused.global_tokens is None
    monkeypatch.undo()
    rebuilt = build_target_cache(enc, imgs, path, progress=True, global_token=True)  # REG: rebuilt, with a line
    assert "rebuilding" in capsys.readouterr().out
    assert rebuilt.global_tokens is not None and torch.equal(rebuilt.tensor, old.tensor)
    assert build_target_cache(enc, imgs, path, progress=False).global_tokens is not None  # it serves plain REPA too


def test_reg_run_on_an_old_cache_rebuilds_it(tmp_path, fmnist_root, monkeypatch):
    monkeypatch.setattr("repa.training.setup.build_encoders", lambda cfg, device: [tiny_dinov2(98)])
    over = tiny_overrides(tmp_path / "run", fmnist_root, "repa.class_token=true", "train.max_steps=1")
    cfg = load_config(TINY, over)
    data = InMemoryImages(images(8), torch.arange(8) % 10, 10, "fm")
    enc = tiny_dinov2(98)
    path = setup.target_cache_path(cfg, data, enc)
    path.parent.mkdir(parents=True)
    old_format_cache(build_target_cache(enc, data.images, tmp_path / "new.safetensors", progress=False), path)
    plain = load_config(TINY, tiny_overrides(tmp_path / "run", fmnist_root, "train.max_steps=1"))
    setup.prepare_targets(plain, data, [enc])  # plain REPA reads the old cache
    assert data.class_tokens is None and data.targets[0].shape == (1, 8, 49, 16)
    setup.prepare_targets(cfg, data, [enc])  # REG: rebuilt with the global token
    assert data.class_tokens is not None and data.targets[0].shape == (1, 8, 49, 16)


# ----------------------------------------------------------------------------------------- the loss


@pytest.mark.parametrize("diffusion", ["flow", "ddpm"])
def test_reg_loss_with_cached_targets_equals_the_online_encoder(tmp_path, diffusion):
    """The same batch (mirrored items included), seed and draws: cached (global token in front of encoder 0's
    targets, split by the loss) and online (the encoder's `encode`) give the same terms."""
    enc, imgs = tiny_dinov2(), images(6)
    cache = build_target_cache(enc, imgs, tmp_path / "t.safetensors", flips=(False, True), dtype=torch.float32,
                               progress=False, global_token=True)  # fmt: skip
    data = InMemoryImages(
        imgs, torch.arange(6) % 5, 5, "tiny", targets=[cache.tensor], class_tokens=cache.global_tokens
    )
    idx, flips = torch.tensor([4, 0, 3]), torch.tensor([True, False, True])
    batch = data.batch(idx, flips, torch.device("cpu"))
    assert batch["targets"][0].shape == (3, 1 + 16, 16)
    online = enc.encode(batch["images"], global_token=True)
    torch.testing.assert_close(batch["targets"][0][:, 0], online.global_token)  # REG's layout: cat([cls, patches])
    name = "SiT-T/2" if diffusion == "flow" else "DiT-T/2"
    torch.manual_seed(0)
    model = build_model(name, input_size=28, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=5,
                        encoder_dims=[16], projector_dim=24, align_depth=1, class_token_dim=16)  # fmt: skip
    g = torch.Generator().manual_seed(1)
    draws = dict(t=torch.rand(3, generator=g), noise=torch.randn(3, 1, 28, 28, generator=g),
                 noise_cls=torch.randn(3, 16, generator=g))  # fmt: skip
    loss = RepaLoss(diffusion=diffusion, class_token_coeff=0.03)
    kw = dict(model_kwargs={"force_drop_ids": torch.zeros(3, dtype=torch.long)}, **draws)
    cached = loss(model, batch["x"], batch["y"], batch["targets"], class_tokens_in_targets=True, **kw)
    direct = loss(model, batch["x"], batch["y"], [online.tokens], class_tokens=online.global_token, **kw)
    assert cached.keys() == direct.keys() and "class_token" in cached
    for key in cached:
        torch.testing.assert_close(cached[key], direct[key], rtol=1e-5, atol=1e-6, msg=key)
    with pytest.raises(ValueError, match="class_tokens_in_targets"):
        loss(model, batch["x"], batch["y"], None, class_tokens_in_targets=True, **kw)


# ----------------------------------------------------------------------------------------- the training loop


def test_reg_trains_with_cached_targets_like_online(tmp_path, fmnist_root, monkeypatch):
    monkeypatch.setattr("repa.training.setup.build_encoders", lambda cfg, device: [tiny_dinov2(98)])
    runs = {}
    for name, extra in (("cached", ()), ("online", ("repa.cache_targets=false",))):
        runs[name] = tmp_path / name
        over = tiny_overrides(runs[name], fmnist_root, "train.max_steps=3", "repa.class_token=true", "data.hflip=true",
                              *extra)  # fmt: skip
        train(load_config(TINY, over))
    cached, online = metrics(runs["cached"]), metrics(runs["online"])
    assert len(cached) == len(online) == 3
    for rc, ro in zip(cached, online):  # float16 storage of the cache: the same loss up to its precision
        assert rc["denoise"] == pytest.approx(ro["denoise"], abs=1e-5)
        assert rc["align"] == pytest.approx(ro["align"], abs=1e-4)
        assert rc["class_token"] == pytest.approx(ro["class_token"], rel=2e-3, abs=1e-5)
    # attention alignment still needs the encoder online (its maps are not cached)
    with pytest.raises(ConfigError, match="repa.cache_targets=false"):
        load_config(TINY, tiny_overrides(tmp_path, fmnist_root, "repa.attention_align=true",
                                         "repa.attention_pairs=[[1,1]]"))  # fmt: skip


# ----------------------------------------------------------------------------------------- latent shards


class NoGlobalToken(torch.nn.Module):
    """An encoder as earlier versions stored it: patch tokens only (no `encode`)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.name, self.source, self.resolution, self.layer = inner.name, inner.source, inner.resolution, None
        self.token_grid, self.embed_dim = inner.token_grid, inner.embed_dim

    def forward(self, x):
        return self.inner(x)


def test_latent_shards_store_the_global_token_for_reg(tmp_path):
    from repa.data.folder import load_image
    from repa.data.prepare import prepare_shards
    from repa.data.shards import LatentShards, ShardError
    from repa.data.vae_spec import load_vae
    from tests.test_prepare import make_folder

    src, vae, enc = make_folder(tmp_path / "src", per_class=3), load_vae("random:small", "cpu"), tiny_dinov2(28)
    common = dict(vae=vae, resolution=32, shard_size=4, batch_size=4, flip=True, progress=False)
    prepare_shards(src, tmp_path / "new", encoders=[enc], **common)
    prepare_shards(src, tmp_path / "old", encoders=[NoGlobalToken(enc)], **common)
    new, old = LatentShards(tmp_path / "new", verify=True), LatentShards(tmp_path / "old")
    assert new.encoders[0]["global_token"] is True and "global_token" not in old.encoders[0]
    idx, flips = torch.tensor([5, 0, 2]), torch.tensor([True, False, True])
    glob = new.global_tokens(idx, flips)
    assert glob.shape == (3, 16) and glob.dtype == torch.float32
    paths = sorted(src.rglob("*.png"))  # the items in order: the stored tokens are those of their centre crops
    crops = torch.stack([torch.from_numpy(np.array(load_image(paths[i], 32))).permute(2, 0, 1) for i in idx])
    crops = torch.where(flips[:, None, None, None], crops.flip(-1), crops)
    torch.testing.assert_close(glob, enc.encode(crops, global_token=True).global_token, atol=2e-3, rtol=2e-3)
    plain = new.batch(idx, flips, "cpu", eps=torch.zeros(3, 4, 4, 4))
    assert plain["targets"][0].shape == (3, 4, 16)  # plain REPA: the patch tokens only
    torch.testing.assert_close(old.targets(idx, flips)[0], plain["targets"][0])  # the same patch tokens
    new.use_class_token()
    reg = new.batch(idx, flips, "cpu", eps=torch.zeros(3, 4, 4, 4))
    assert reg["targets"][0].shape == (3, 1 + 4, 16)
    assert torch.equal(reg["targets"][0][:, 0], glob) and torch.equal(reg["targets"][0][:, 1:], plain["targets"][0])
    with pytest.raises(ShardError, match="without the encoder's global token.*rerun `repa prepare`"):
        old.use_class_token()
    # the run's plan: REG on stored targets asks the shards for the global token
    over = ["data.kind=latents", "data.space=latent", f"data.root={tmp_path / 'old'}", "repa.class_token=true",
            "repa.encoders=[random-dinov2-vit-s]", "repa.encoder_resolution=28", "repa.encoder_layer=null",
            "model.hidden_size=32", "model.depth=2", "model.num_heads=2", "model.align_depth=1"]  # fmt: skip
    with pytest.raises(ShardError, match="global token"):
        setup.plan_targets(load_config(TINY, over), old, torch.device("cpu"))
    fresh = LatentShards(tmp_path / "new")
    plan = setup.plan_targets(load_config(TINY, over), fresh, torch.device("cpu"))
    assert fresh.class_token and not plan.online and plan.specs[0][1] == 16
