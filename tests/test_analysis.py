"""Analysis: CKNNA/CKA/mutual-kNN definitions and invariances, linear probe, hidden-state hooks, table writers."""

import itertools
import json

import numpy as np
import pytest
import torch
from torch import nn

from repa.analysis import (
    alignment,
    alignment_table,
    cka,
    cknna,
    collect_hidden_states,
    heatmap,
    hidden_states,
    hsic_unbiased,
    linear_probe,
    mutual_knn,
    prepare_features,
    probe_layers,
    table_grid,
    write_csv,
    write_json,
)


def _feats(n=80, d=24, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ----------------------------------------------------------------------------------------- HSIC / CKA


def test_hsic_unbiased_equals_u_statistic():
    """Song et al. 2012 eq. 5 equals the U-statistic over distinct index quadruples (brute force, n = 6)."""
    x, y = _feats(6, 3, 1), _feats(6, 2, 2)
    K, L = x @ x.T, y @ y.T
    n, total = 6, 0.0
    for quad in itertools.permutations(range(n), 4):
        for i, j, q, r in itertools.permutations(quad):
            total += K[i, j] * (L[i, j] + L[q, r] - 2 * L[i, q])
    expected = total / 24 / (n * (n - 1) * (n - 2) * (n - 3))
    assert float(hsic_unbiased(K, L)) == pytest.approx(float(expected), rel=1e-10)


def test_biased_cka_matches_feature_space_formula():
    """Linear CKA = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F) on centred features (Kornblith et al. 2019)."""
    x, y = _feats(50, 7, 3), _feats(50, 5, 4)
    xc, yc = x - x.mean(0), y - y.mean(0)
    hsic = torch.linalg.norm(yc.T @ xc) ** 2
    expected = hsic / (torch.linalg.norm(xc.T @ xc) * torch.linalg.norm(yc.T @ yc))
    assert cka(x, y) == pytest.approx(float(expected), rel=1e-6)
    assert cka(x, x) == pytest.approx(1.0, abs=1e-6)


# ----------------------------------------------------------------------------------------- CKNNA / mutual k-NN


def test_cknna_of_identical_features_is_one():
    x = _feats()
    assert cknna(x, x) == pytest.approx(1.0, abs=1e-6)
    # normalised features have small kernels, so the reference's +1e-6 is visible: check it exactly
    xp = prepare_features(x)
    assert cknna(xp, xp) == pytest.approx(1.0, abs=1e-3)
    assert mutual_knn(x, x) == 1.0
    assert alignment(x, x, "mutual_knn") == 1.0


def test_cknna_invariances():
    x, y = _feats(seed=5), _feats(d=12, seed=6) + 0.5 * _feats(d=12, seed=5)[:, :12]
    base = cknna(x, y)
    q, _ = torch.linalg.qr(_feats(24, 24, 7))
    assert cknna(x @ q, y) == pytest.approx(base, rel=1e-6)  # orthogonal rotation
    assert cknna(3.0 * x, y) == pytest.approx(base, rel=1e-4)  # isotropic scaling (up to the +1e-6)
    # not exactly symmetric, as in the reference: the k-NN masks are row-wise, so the masked kernels are not
    assert cknna(y, x) == pytest.approx(base, rel=0.05)
    assert mutual_knn(x @ q, 2.0 * y) == mutual_knn(x, y)


def test_cknna_with_all_neighbours_is_unbiased_cka():
    x, y = _feats(40, 10, 8), _feats(40, 6, 9)
    assert cknna(x, y, k=39) == pytest.approx(cka(x, y, unbiased=True), rel=1e-12)


def test_related_features_score_higher_than_unrelated():
    x = _feats(120, 16, 10)
    related = x @ _feats(16, 8, 11) + 0.1 * _feats(120, 8, 12)
    unrelated = _feats(120, 8, 13)
    for metric in ("cknna", "cka", "unbiased_cka", "mutual_knn"):
        assert alignment(x, related, metric) > alignment(x, unrelated, metric) + 0.2, metric


def test_metric_argument_checks():
    x = _feats(10, 3)
    with pytest.raises(ValueError):
        cknna(x, x, k=1)
    with pytest.raises(ValueError):
        cknna(x, x, k=10)
    with pytest.raises(ValueError):
        cknna(x, x[:5])
    with pytest.raises(ValueError):
        alignment(x, x, "svcca")


def test_prepare_features_clamps_and_normalises():
    x = _feats(20, 30, 14)
    x[0, 0] = 1000.0
    p = prepare_features(x, outlier_quantile=0.95)
    torch.testing.assert_close(p.norm(dim=1), torch.ones(20))
    raw = prepare_features(x, outlier_quantile=0.95, normalize=False)
    assert raw.abs().max() < 5 and raw[0, 0] == raw.abs().max()
    exact = prepare_features(x, outlier_quantile=0.95, exact=True, normalize=False)
    assert exact.abs().max() < 5
    torch.testing.assert_close(prepare_features(x, None, normalize=False), x.float())


# ----------------------------------------------------------------------------------------- linear probe


def _clusters(n_per_class=60, num_classes=4, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=g) * 3
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    return centres[labels] + torch.randn(len(labels), dim, generator=g), labels


def test_linear_probe_separable_and_deterministic():
    x, y = _clusters()
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(1))
    tr, te = perm[:180], perm[180:]
    res = linear_probe(x[tr], y[tr], x[te], y[te], epochs=20, batch_size=32, lr=1e-2)
    assert res.train_acc > 0.95 and res.test_acc > 0.95
    again = linear_probe(x[tr], y[tr], x[te], y[te], epochs=20, batch_size=32, lr=1e-2)
    assert again == res
    chance = linear_probe(x[tr], y[tr][torch.randperm(180)], x[te], y[te], epochs=5, batch_size=32)
    assert chance.test_acc < 0.6


def test_probe_layers_table_and_writers(tmp_path):
    x, y = _clusters(n_per_class=30)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    features = {(layer, t): (1 - t) * x + t * 10 * noise for layer in (1, 2) for t in (0.0, 0.9)}
    rows = probe_layers(features, y, epochs=10, batch_size=32, lr=1e-2)
    assert [(r["layer"], r["t"]) for r in rows] == [(1, 0.0), (1, 0.9), (2, 0.0), (2, 0.9)]
    assert rows[0]["test_acc"] > 0.9 and rows[0]["test_acc"] > rows[1]["test_acc"]
    r_labels, c_labels, grid = table_grid(rows, "test_acc")
    assert r_labels == [1, 2] and c_labels == [0.0, 0.9] and grid.shape == (2, 2)
    heatmap(rows, tmp_path / "probe.png", title="probe")
    assert (tmp_path / "probe.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    write_csv(rows, tmp_path / "probe.csv")
    assert (tmp_path / "probe.csv").read_text().splitlines()[0] == "layer,t,train_acc,test_acc,train_loss"
    write_json(rows, tmp_path / "probe.json")
    assert json.loads((tmp_path / "probe.json").read_text()) == rows
    mask = torch.zeros(len(y), dtype=torch.bool)
    mask[::5] = True
    assert len(probe_layers({(1, 0.0): x}, y, test_mask=mask, epochs=2)) == 1


def test_alignment_table_rows():
    x = _feats(60, 8, 15)
    features = {(layer, 0.5): x @ _feats(8, 8, layer) for layer in (2, 4)}
    rows = alignment_table(features, {"enc": x, "rand": _feats(60, 8, 16)}, metrics=("cknna", "mutual_knn"), k=5)
    assert len(rows) == 8 and {r["target"] for r in rows} == {"enc", "rand"}
    enc = [r["value"] for r in rows if r["target"] == "enc" and r["metric"] == "cknna"]
    rnd = [r["value"] for r in rows if r["target"] == "rand" and r["metric"] == "cknna"]
    assert min(enc) > max(rnd)


# ----------------------------------------------------------------------------------------- hidden-state hooks


class _TokenModel(nn.Module):
    """Implements the DiffusionTransformer hidden-state contract: tokens = patches of x_t, scaled per layer."""

    num_classes = 7

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.seen = {}

    def forward_hidden(self, x_t, t, y, layers):
        self.seen = {"y": y, "t": t, "training": self.training}
        tokens = x_t.flatten(2).transpose(1, 2)  # (B, H*W, C)
        return {layer: tokens * layer * self.scale for layer in layers}


def test_hidden_states_noises_with_the_linear_path_and_null_label():
    model = _TokenModel().train()
    x = torch.randn(3, 2, 4, 4)
    noise = torch.randn(3, 2, 4, 4)
    out = hidden_states(model, x, 0.25, [1, 3], noise=noise, pool=None)
    x_t = 0.75 * x + 0.25 * noise  # t = 0 data, t = 1 noise
    torch.testing.assert_close(out[3], 3 * x_t.flatten(2).transpose(1, 2))
    assert torch.equal(model.seen["y"], torch.full((3,), 7)) and model.seen["training"] is False
    assert model.training  # mode restored
    pooled = hidden_states(model, x, torch.full((3,), 0.25), [1], noise=noise)
    torch.testing.assert_close(pooled[1], x_t.flatten(2).mean(-1))
    clean = hidden_states(model, x, 0.0, [1], y=torch.tensor([1, 2, 3]))
    torch.testing.assert_close(clean[1], x.flatten(2).mean(-1))
    assert torch.equal(model.seen["y"], torch.tensor([1, 2, 3]))


def test_collect_hidden_states_is_reproducible():
    model = _TokenModel()
    data = [(torch.randn(4, 2, 4, 4), torch.zeros(4)) for _ in range(3)]
    a = collect_hidden_states(model, data, layers=[1, 2], times=[0.0, 0.5], seed=1)
    b = collect_hidden_states(model, data, layers=[1, 2], times=[0.0, 0.5], seed=1)
    assert set(a) == {(1, 0.0), (1, 0.5), (2, 0.0), (2, 0.5)} and a[(2, 0.5)].shape == (12, 2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    torch.testing.assert_close(a[(1, 0.0)], torch.cat([x.flatten(2).mean(-1) for x, _ in data]))


def test_hidden_states_on_the_real_model():
    models = pytest.importorskip("repa.models")
    try:
        model = models.build_model("SiT-T/2", input_size=8, in_channels=4, num_classes=10, depth=3)
    except (TypeError, ValueError, KeyError) as err:
        pytest.skip(f"model registry not usable here: {err}")
    x = torch.randn(2, 4, 8, 8)
    out = hidden_states(model, x, 0.5, [1, 3], generator=torch.Generator().manual_seed(0))
    assert set(out) == {1, 3} and out[3].shape == (2, model.hidden_size)
    tokens = hidden_states(model, x, 0.5, [2], pool=None, generator=torch.Generator().manual_seed(0))
    assert tokens[2].shape[:2] == (2, 16) and np.isfinite(tokens[2].numpy()).all()


# ----------------------------------------------------------------------------------------- outlier clamp setting


def _with_outliers(n=60, d=16, seed=21):
    """Paired features where a few huge coordinates dominate one side (what the 0.95-quantile clamp is for)."""
    base = _feats(n, d, seed)
    feats = base @ _feats(d, d, seed + 1) + 0.3 * _feats(n, d, seed + 2)
    feats[:6, 3] = 400.0  # outliers in 6 rows of one coordinate
    return feats, base


def test_outlier_clamp_changes_values_on_data_with_an_outlier_and_can_be_turned_off():
    feats, target = _with_outliers()
    clamped = alignment(feats, target, "cknna", k=5)  # default: q = 0.95, as platonic-rep's pipeline
    assert clamped == alignment(feats, target, "cknna", k=5, outlier_quantile=0.95)
    off = alignment(feats, target, "cknna", k=5, outlier_quantile=None)
    assert off == alignment(feats, target, "cknna", k=5, outlier_quantile=1.0)  # 1 = off, as the reference's
    assert abs(clamped - off) > 0.02
    rows = {q: alignment_table({(1, 0.0): feats}, target, ("cknna",), k=5, outlier_quantile=q) for q in (0.95, None)}
    assert rows[0.95][0]["value"] == clamped and rows[None][0]["value"] == off
    # without outliers the clamp changes little
    plain = _feats(60, 16, 30)
    assert alignment(plain, plain @ _feats(16, 16, 31), "cknna", k=5, outlier_quantile=None) == pytest.approx(
        alignment(plain, plain @ _feats(16, 16, 31), "cknna", k=5), abs=0.1
    )
    with pytest.raises(ValueError, match="outlier_quantile"):
        prepare_features(feats, 0.0)


def test_run_align_records_and_applies_the_outlier_quantile(monkeypatch, tmp_path):
    from types import SimpleNamespace

    import repa.analysis.run as run_mod
    from repa.cli.main import main as cli_main

    feats, target = _with_outliers()
    repa_cfg = SimpleNamespace(encoders=[], encoder_layer=None, encoder_weights=None, encoder_resolution=224)
    loaded = SimpleNamespace(cfg=SimpleNamespace(repa=repa_cfg), is_repa=False, run_dir=None, path=tmp_path / "ckpt",
                             info={"model_kwargs": {"depth": 2}, "step": 3, "ema": True})  # fmt: skip
    n = len(feats)
    inputs = SimpleNamespace(images=torch.zeros(n, 3, 8, 8, dtype=torch.uint8), x=torch.zeros(n, 4, 2, 2),
                             labels=torch.zeros(n, dtype=torch.long))  # fmt: skip
    monkeypatch.setattr(run_mod, "_as_loaded", lambda *a, **k: loaded)
    monkeypatch.setattr(run_mod, "load_inputs", lambda *a, **k: inputs)
    monkeypatch.setattr(run_mod, "encoder_features", lambda *a, **k: target)
    monkeypatch.setattr(run_mod, "model_features", lambda *a, **k: {(1, 0.0): feats, (2, 0.0): 2 * feats})

    def align(**kw):
        return run_mod.run_align("ckpt", "enc", layers="1,2", times="0", num=n, k=5, out_dir=tmp_path / "a",
                                 device=torch.device("cpu"), progress=False, **kw)  # fmt: skip

    default, off = align(write=False), align(write=True, outlier_quantile=None)
    assert default["meta"]["outlier_quantile"] == 0.95 and off["meta"]["outlier_quantile"] is None
    assert default["rows"][0]["value"] == alignment(feats, target, "cknna", k=5)
    assert off["rows"][0]["value"] == alignment(feats, target, "cknna", k=5, outlier_quantile=None)
    assert json.loads((tmp_path / "a" / "align.json").read_text())["meta"]["outlier_quantile"] is None
    assert align(write=False, outlier_quantile=1.0)["meta"]["outlier_quantile"] is None
    with pytest.raises(ValueError, match="outlier quantile"):
        align(write=False, outlier_quantile=1.5)

    # encoder vs encoder, through the command line: --outlier-quantile 0.9 / none reach the driver and align.json
    import repa.analysis.structure as structure_mod  # encoder-vs-encoder reads images and features through it

    monkeypatch.setattr(structure_mod, "source_batches",
                        lambda *a, **k: ([torch.zeros(n, 3, 8, 8, dtype=torch.uint8)], n))  # fmt: skip
    monkeypatch.setattr(structure_mod, "encoder_features", lambda name, *a, **k: feats if name == "a" else target)
    for flag, want in (([], 0.95), (["--outlier-quantile", "0.9"], 0.9), (["--outlier-quantile", "none"], None)):
        out = tmp_path / f"enc{want}"
        argv = ["align", "--encoder", "a", "--encoder-b", "b", "--num", str(n), "--k", "5", "--out", str(out),
                "--no-progress", *flag]  # fmt: skip
        assert cli_main(argv) == 0
        result = json.loads((out / "align.json").read_text())
        assert result["meta"]["outlier_quantile"] == want
        assert result["rows"][0]["value"] == alignment(feats, target, "cknna", k=5, outlier_quantile=want)
    with pytest.raises(SystemExit):  # argparse refuses it before any work
        cli_main(["align", "--encoder", "a", "--encoder-b", "b", "--outlier-quantile", "2"])
