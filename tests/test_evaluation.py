"""Evaluation: Fréchet distance maths, FeatureStats, IS, precision/recall, ADM .npz I/O, labels, the FID Inception."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from repa.evaluation import (
    ADM_STATISTICS_DETECTOR,
    FeatureStats,
    balanced_labels,
    fid_from_stats,
    frechet_distance,
    image_batches,
    inception_score,
    manifold_radii,
    precision_recall,
    rank_slice,
    read_npz_arrays,
    reference_statistics,
    save_samples,
    score,
    tf_bilinear_resize,
)

METHODS = ["sqrtm", "eigh"]


def _random_stats(dim, num, seed, shift=0.0):
    rng = np.random.default_rng(seed)
    feats = rng.standard_normal((num, dim)) @ (rng.standard_normal((dim, dim)) / np.sqrt(dim)) + shift
    return FeatureStats.from_features(feats)


# ----------------------------------------------------------------------------------------- Fréchet distance


@pytest.mark.parametrize("method", METHODS)
def test_fid_of_identical_stats_is_zero(method):
    s = _random_stats(32, 200, 0)
    assert abs(frechet_distance(s.mean, s.cov, s.mean, s.cov, method=method)) < 1e-8
    assert abs(fid_from_stats(s, s, method=method)) < 1e-8


@pytest.mark.parametrize("method", METHODS)
def test_fid_diagonal_closed_form(method):
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.standard_normal(16), rng.standard_normal(16)
    a, b = rng.uniform(0.1, 3, 16), rng.uniform(0.1, 3, 16)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b), method=method) == pytest.approx(expected, rel=1e-10)
    # the same covariances in a shared rotated basis (commuting, non-diagonal): the distance is unchanged
    q, _ = np.linalg.qr(rng.standard_normal((16, 16)))
    got = frechet_distance(q @ mu1, q @ np.diag(a) @ q.T, q @ mu2, q @ np.diag(b) @ q.T, method=method)
    assert got == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("method", METHODS)
def test_fid_one_dimensional(method):
    # N(m1, s1^2) vs N(m2, s2^2): (m1 - m2)^2 + (s1 - s2)^2
    got = frechet_distance(np.array([1.5]), np.array([[4.0]]), np.array([-0.5]), np.array([[0.25]]), method=method)
    assert got == pytest.approx(2.0**2 + (2.0 - 0.5) ** 2, rel=1e-12)
    assert frechet_distance(1.5, 4.0, -0.5, 0.25, method=method) == pytest.approx(6.25)  # scalars are accepted


def test_sqrtm_and_eigh_agree_including_rank_deficient():
    a, b = _random_stats(64, 300, 2, shift=0.3), _random_stats(64, 300, 3)
    s = fid_from_stats(a, b, method="sqrtm")
    assert fid_from_stats(a, b, method="eigh") == pytest.approx(s, rel=1e-9)
    # fewer samples than dimensions: singular covariances, as with small sample sets of 2048-d features
    rng = np.random.default_rng(4)
    c = FeatureStats.from_features(np.abs(rng.standard_normal((40, 64))))
    d = FeatureStats.from_features(np.abs(rng.standard_normal((40, 64))) * 1.2)
    s = fid_from_stats(c, d, method="sqrtm")
    assert np.isfinite(s) and fid_from_stats(c, d, method="eigh") == pytest.approx(s, rel=1e-6)


def test_fid_matches_torchmetrics():
    """An established implementation (torchmetrics' eigenvalue formulation) from the same statistics."""
    tm_fid = pytest.importorskip("torchmetrics.image.fid")
    a, b = _random_stats(96, 500, 5, shift=0.2), _random_stats(96, 500, 6)
    ref = float(tm_fid._compute_fid(*(torch.from_numpy(v) for v in (a.mean, a.cov, b.mean, b.cov))))
    for method in METHODS:
        assert fid_from_stats(a, b, method=method) == pytest.approx(ref, rel=1e-6)


def test_fid_rejects_bad_shapes():
    with pytest.raises(ValueError):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(3), method="nope")


# ----------------------------------------------------------------------------------------- FeatureStats


def test_feature_stats_match_numpy_merge_and_pack():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((300, 12)) * 3 + 5
    whole = FeatureStats.from_features(x)
    np.testing.assert_allclose(whole.mean, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(whole.cov, np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)
    parts = [FeatureStats.from_features(torch.from_numpy(x[i : i + 70])) for i in range(0, 300, 70)]
    merged = parts[0]
    for p in parts[1:]:
        merged = merged.merge(p)
    assert merged.num == 300
    np.testing.assert_allclose(merged.cov, whole.cov, rtol=1e-10)
    # an all-reduce SUM of packed tensors is a merge
    summed = sum(p.packed() for p in parts)
    np.testing.assert_allclose(FeatureStats.unpacked(summed, 12).cov, whole.cov, rtol=1e-10)


def test_feature_stats_save_load_without_pickle(tmp_path):
    s = _random_stats(10, 50, 8)
    s.save(tmp_path / "s.npz")
    with np.load(tmp_path / "s.npz", allow_pickle=False) as d:
        assert all(d[k].dtype != object for k in d.files)
        np.testing.assert_array_equal(d["sigma"], s.cov)
    t = FeatureStats.load(tmp_path / "s.npz")
    assert t.num == s.num
    np.testing.assert_array_equal(t.mean, s.mean)
    np.testing.assert_array_equal(t.cov, s.cov)


# ----------------------------------------------------------------------------------------- Inception Score


def test_inception_score_known_values():
    num_classes, splits = 20, 10
    labels = np.tile(np.arange(num_classes), 5 * splits)  # each split holds every class equally often
    one_hot = np.eye(num_classes)[labels]
    mean, std = inception_score(one_hot, num_splits=splits)
    assert mean == pytest.approx(num_classes, rel=1e-12) and std == pytest.approx(0, abs=1e-9)
    uniform = np.full((100, num_classes), 1 / num_classes)
    assert inception_score(uniform)[0] == pytest.approx(1.0)
    # logits input: very confident logits behave like one-hot probabilities
    assert inception_score(torch.from_numpy(one_hot * 50.0), logits=True)[0] == pytest.approx(num_classes, rel=1e-6)


# ----------------------------------------------------------------------------------------- precision / recall


def _brute_force_pr(ref, sam, k):
    def d2(u, v):
        return ((u[:, None, :] - v[None, :, :]) ** 2).sum(-1)

    r_ref = np.sort(d2(ref, ref), axis=1)[:, k]
    r_sam = np.sort(d2(sam, sam), axis=1)[:, k]
    d = d2(ref, sam)
    precision = np.mean((d <= r_ref[:, None]).any(axis=0))
    recall = np.mean((d <= r_sam[None, :]).any(axis=1))
    return precision, recall


def test_precision_recall_constructed_manifolds():
    rng = np.random.default_rng(9)
    a = rng.standard_normal((60, 8)).astype(np.float32)
    b = rng.standard_normal((60, 8)).astype(np.float32) + 100.0
    assert precision_recall(a, a) == (1.0, 1.0)
    assert precision_recall(a, b) == (0.0, 0.0)
    # samples cover only one of the reference's two clusters: all realistic, half the reference recalled
    ref = np.concatenate([a, b])
    assert precision_recall(ref, a, batch_size=16) == (1.0, 0.5)


def test_precision_recall_matches_brute_force_definition():
    rng = np.random.default_rng(10)
    ref = rng.standard_normal((90, 5))
    sam = rng.standard_normal((70, 5)) * 1.3 + 0.4
    p, r = precision_recall(ref, sam, k=3, batch_size=16)  # blocks smaller than the sets
    bp, br = _brute_force_pr(ref, sam, 3)
    assert (p, r) == pytest.approx((bp, br), abs=1e-12)
    assert 0 < p < 1 and 0 < r < 1
    radii = manifold_radii(torch.from_numpy(ref).float(), k=3, batch_size=7)
    np.testing.assert_allclose(radii.numpy(), np.sort(((ref[:, None] - ref[None]) ** 2).sum(-1), 1)[:, 3], rtol=1e-4)


# ----------------------------------------------------------------------------------------- labels


def test_balanced_labels():
    labels = balanced_labels(1000, 10, seed=3)
    assert torch.equal(torch.bincount(labels, minlength=10), torch.full((10,), 100))
    assert torch.equal(labels, balanced_labels(1000, 10, seed=3))
    assert not torch.equal(labels, balanced_labels(1000, 10, seed=4))
    assert not torch.equal(labels[:100], labels[:100].sort().values)  # shuffled
    shards = [balanced_labels(1000, 10, seed=3, rank=r, world_size=3) for r in range(3)]
    assert [len(s) for s in shards] == [334, 333, 333]
    assert torch.equal(torch.cat(shards), labels)
    uneven = torch.bincount(balanced_labels(1003, 10, seed=0), minlength=10)
    assert uneven.max() - uneven.min() == 1 and uneven.sum() == 1003
    assert rank_slice(10, 3, 4) == slice(8, 10)
    with pytest.raises(ValueError):
        rank_slice(10, 4, 4)


# ----------------------------------------------------------------------------------------- .npz batches


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_streaming_round_trip(tmp_path, compressed):
    rng = np.random.default_rng(11)
    images = rng.integers(0, 256, (23, 8, 8, 3), dtype=np.uint8)
    path = tmp_path / "s.npz"
    if compressed:
        np.savez_compressed(path, arr_0=images, arr_1=np.arange(23))
    else:
        save_samples(path, images, np.arange(23))
    batches = list(image_batches(path, batch_size=5))
    assert [len(b) for b in batches] == [5, 5, 5, 5, 3]
    np.testing.assert_array_equal(np.concatenate(batches), images)
    assert sum(len(b) for b in image_batches(path, batch_size=5, limit=12)) == 12
    np.testing.assert_array_equal(read_npz_arrays(path, ["arr_1", "mu"])["arr_1"], np.arange(23))


def test_npz_refuses_object_arrays(tmp_path):
    np.savez(tmp_path / "o.npz", arr_0=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError):
        list(image_batches(tmp_path / "o.npz"))


# ----------------------------------------------------------------------------------------- pipeline (fake detector)


class _FakeDetector:
    """A fixed random projection of 4x4-pooled pixels: cheap stand-in for the Inception network."""

    name = "fake"

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.w_pool = torch.randn(48, 16, generator=g)
        self.w_spatial = torch.randn(48, 6, generator=g)
        self.w_logits = torch.randn(16, 10, generator=g)

    def features(self, images):
        x = F.adaptive_avg_pool2d(images.float() / 255, 4).flatten(1)
        pool = x @ self.w_pool
        return {"pool": pool, "spatial": x @ self.w_spatial, "logits": pool @ self.w_logits}


def test_evaluate_end_to_end_with_reference_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("REPA_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(12)
    images = rng.integers(0, 256, (80, 16, 16, 3), dtype=np.uint8)
    save_samples(tmp_path / "ref.npz", images)
    det = _FakeDetector()
    m = score(tmp_path / "ref.npz", tmp_path / "ref.npz", det, batch_size=32, progress=False)
    assert abs(m["fid"]) < 1e-6 and abs(m["sfid"]) < 1e-6
    assert (m["precision"], m["recall"]) == (1.0, 1.0) and m["num_samples"] == 80 and m["is"] > 1
    assert len(list((tmp_path / "cache" / "eval").glob("ref-*.npz"))) == 1
    # torch NCHW batches are accepted too; darker samples are farther away
    dark = [torch.from_numpy(images[i : i + 40] // 2).permute(0, 3, 1, 2) for i in (0, 40)]
    m2 = score(dark, tmp_path / "ref.npz", det, progress=False, out_json=tmp_path / "m.json")
    assert m2["fid"] > 1 and (tmp_path / "m.json").is_file()


class _AdmInceptionStandIn(_FakeDetector):
    """The fake detector under the name of the detector ADM's precomputed statistics belong to."""

    name = ADM_STATISTICS_DETECTOR


def test_reference_uses_precomputed_adm_statistics(tmp_path, monkeypatch):
    monkeypatch.setenv("REPA_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(13)
    images = rng.integers(0, 256, (30, 8, 8, 3), dtype=np.uint8)
    mu, sigma = np.ones(16), np.eye(16) * 2
    np.savez(tmp_path / "ref.npz", arr_0=images, mu=mu, sigma=sigma, mu_s=np.zeros(6), sigma_s=np.eye(6))
    ref = reference_statistics(tmp_path / "ref.npz", _AdmInceptionStandIn(), progress=False)
    assert ref.source == "precomputed" and ref.pool.shape == (30, 16) and ref.note is None
    assert ref.source_of("spatial") == "precomputed"
    np.testing.assert_array_equal(ref.stats["pool"][1], sigma)
    np.testing.assert_array_equal(ref.stats["spatial"][0], np.zeros(6))
    own = reference_statistics(tmp_path / "ref.npz", _AdmInceptionStandIn(), use_precomputed=False, progress=False)
    assert own.source == "images" and not np.allclose(own.stats["pool"][0], mu)


# ----------------------------------------------------------------------------------------- the FID Inception network


def _nvidia_resize(x, size):
    """StyleGAN/EDM's emulation of TF's legacy resize_bilinear with affine_grid + grid_sample (an independent form)."""
    b, c, h, w = x.shape
    theta = torch.eye(2, 3, dtype=torch.float64).repeat(b, 1, 1)
    theta[:, 0, 2] += 1 / w - 1 / size
    theta[:, 1, 2] += 1 / h - 1 / size
    grid = F.affine_grid(theta, [b, c, size, size], align_corners=False)
    return F.grid_sample(x.double(), grid, mode="bilinear", padding_mode="border", align_corners=False)


@pytest.mark.parametrize("side", [32, 256, 512])
def test_tf_legacy_resize_matches_grid_sample_emulation(side):
    x = torch.rand(2, 3, side, side, generator=torch.Generator().manual_seed(side)) * 255
    ours = tf_bilinear_resize(x, (299, 299))
    torch.testing.assert_close(ours.double(), _nvidia_resize(x, 299), atol=2e-3, rtol=0)
    same = torch.rand(1, 3, 299, 299)
    assert tf_bilinear_resize(same, (299, 299)) is same
    const = torch.full((1, 3, side, side), 77.0)
    torch.testing.assert_close(tf_bilinear_resize(const, (299, 299)), torch.full((1, 3, 299, 299), 77.0))


@pytest.mark.slow
def test_inception_detector_loads_and_extracts(tmp_path):
    from repa.evaluation import InceptionDetector, inception_path

    try:
        archive = inception_path()
    except FileNotFoundError as err:
        pytest.skip(f"FID Inception weights unavailable offline: {err}")
    det = InceptionDetector(archive, classifier=None)
    images = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    feats = det.features(images)
    assert feats["pool"].shape == (3, 2048) and feats["spatial"].shape == (3, 17 * 17 * 7)
    assert all(torch.isfinite(v).all() for v in feats.values()) and "logits" not in feats
    assert (feats["pool"] >= 0).all() and (feats["spatial"] >= 0).all()  # after ReLU / average pooling
    # pool features are the TorchScript network's own output on our preprocessing
    net = torch.jit.load(str(archive))
    torch.testing.assert_close(net(det.preprocess(images)), feats["pool"])
    pre = det.preprocess(images)
    assert pre.shape == (3, 3, 299, 299) and pre.min() >= -1 and pre.max() < 1
    with pytest.raises(ValueError):
        det.features(images.float())
    assert "switched off" in det.is_missing_reason
    # an explicit classifier matrix (here random) gives logits = pool @ W, and no missing-IS reason
    w = torch.randn(2048, 1008, generator=torch.Generator().manual_seed(1))
    np.save(tmp_path / "w.npy", w.numpy())
    with_is = InceptionDetector(archive, classifier=tmp_path / "w.npy")
    assert with_is.is_missing_reason is None
    torch.testing.assert_close(with_is.features(images)["logits"], feats["pool"] @ w)


def test_encoder_detector_mean_pools_tokens():
    from repa.evaluation import Detector, EncoderDetector

    class _Tokens(torch.nn.Module):
        name = "toy"

        def forward(self, images):
            return images.float().flatten(2).transpose(1, 2)  # (B, H*W, 3)

    det = EncoderDetector(_Tokens(), resolution=4)
    assert isinstance(det, Detector) and det.name == "encoder/toy/4/mean"
    images = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    torch.testing.assert_close(det.features(images)["pool"], images.float().mean(dim=(2, 3)))
