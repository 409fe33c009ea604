"""Evaluation faults: damaged inputs name the file, precomputed statistics only for their detector, ADM's
Inception Score chunks, the classifier weights found where other FID tools keep them (offline, fake detectors)."""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import repa.evaluation.inception_weights as inception_weights
from repa.cli.main import main as cli_main
from repa.errors import ReportedError
from repa.evaluation import (
    ADM_STATISTICS_DETECTOR,
    EvaluationInputError,
    NpzError,
    ReferenceStats,
    find_inception_classifier,
    image_batches,
    inception_classifier,
    inception_score,
    load_reference,
    reference_statistics,
    save_samples,
    score,
)
from repa.evaluation.reference import file_fingerprint, save_reference


class FakeDetector:
    """A fixed random projection of 4x4-pooled pixels (16-d pool, 6-d spatial, optional 10 logits)."""

    name = "fake"

    def __init__(self, *args, logits: bool = False, **kwargs) -> None:
        g = torch.Generator().manual_seed(0)
        self.w_pool = torch.randn(48, 16, generator=g)
        self.w_spatial = torch.randn(48, 6, generator=g)
        self.w_logits = torch.randn(16, 10, generator=g) if logits else None

    def features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = F.adaptive_avg_pool2d(images.float() / 255, 4).flatten(1)
        out = {"pool": x @ self.w_pool, "spatial": x @ self.w_spatial}
        if self.w_logits is not None:
            out["logits"] = out["pool"] @ self.w_logits
        return out


class AdmNamedDetector(FakeDetector):
    """The fake under the name of the detector ADM's precomputed statistics belong to."""

    name = ADM_STATISTICS_DETECTOR


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("REPA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(inception_weights, "_DOWNLOAD_ATTEMPT", None)

    def no_network(url, dest, timeout=60.0):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(inception_weights, "_fetch_url", no_network)


def _images(n: int, seed: int = 0, side: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, side, side, 3), dtype=np.uint8)


def _patch_cli_detector(monkeypatch, factory=FakeDetector) -> list:
    calls = []

    def make(*args, **kwargs):
        calls.append((args, kwargs))
        return factory()

    monkeypatch.setattr("repa.evaluation.make_detector", make)
    return calls


# ------------------------------------------------------------------------------------ 8. damaged inputs


def test_reference_statistics_with_nan_are_refused_naming_the_file(tmp_path, monkeypatch, capsys):
    """Was: `FID nan` and exit 0."""
    save_samples(tmp_path / "s.npz", _images(20, 1))
    good = reference_statistics(tmp_path / "s.npz", FakeDetector(), progress=False, cache=False)
    mu, sigma = good.stats["pool"]
    nan_mu = mu.copy()
    nan_mu[3] = np.nan
    bad = ReferenceStats({**good.stats, "pool": (nan_mu, sigma)}, good.pool, "images")
    save_reference(bad, tmp_path / "nan-stats.npz", "fake", "x")
    with pytest.raises(EvaluationInputError, match="nan-stats.npz.*NaN") as err:
        score(tmp_path / "s.npz", tmp_path / "nan-stats.npz", FakeDetector(), progress=False)
    assert isinstance(err.value, ValueError) and isinstance(err.value, ReportedError)
    _patch_cli_detector(monkeypatch)
    argv = ["eval", "score", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "nan-stats.npz"), "--no-progress"]
    assert cli_main(argv) == 2
    assert "nan-stats.npz" in capsys.readouterr().err
    # an ADM batch whose precomputed statistics are used (the ADM detector) and hold inf
    np.savez(tmp_path / "adm.npz", arr_0=_images(20, 2), mu=np.ones(16), sigma=np.full((16, 16), np.inf))
    with pytest.raises(EvaluationInputError, match="adm.npz: precomputed mu/sigma"):
        reference_statistics(tmp_path / "adm.npz", AdmNamedDetector(), progress=False)
    # a mean without its covariance
    np.savez(tmp_path / "half.npz", arr_0=_images(20, 2), mu=np.ones(16))
    with pytest.raises(EvaluationInputError, match="half.npz.*'mu' but not its pair"):
        reference_statistics(tmp_path / "half.npz", AdmNamedDetector(), progress=False)
    # in-memory statistics with NaN (no file to name) are refused too
    with pytest.raises(EvaluationInputError, match="reference pool statistics"):
        score(tmp_path / "s.npz", bad, FakeDetector(), progress=False)


def test_stats_file_without_a_detector_name_is_refused(tmp_path, monkeypatch, capsys):
    """Was: accepted for any detector."""
    save_samples(tmp_path / "s.npz", _images(20, 1))
    ref = reference_statistics(tmp_path / "s.npz", FakeDetector(), progress=False, cache=False)
    ref.save(tmp_path / "anonymous.npz")  # the arrays of a stats file, without `detector`
    with pytest.raises(EvaluationInputError, match="anonymous.npz does not say which detector"):
        score(tmp_path / "s.npz", tmp_path / "anonymous.npz", FakeDetector(), progress=False)
    assert load_reference(tmp_path / "anonymous.npz").pool.shape == (20, 16)  # no detector to check against: read
    _patch_cli_detector(monkeypatch)
    assert cli_main(["eval", "score", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "anonymous.npz")]) == 2
    assert "anonymous.npz" in capsys.readouterr().err


def _write_raw_npz(path: Path, header_shape: tuple[int, ...], payload: bytes) -> None:
    """An .npz whose arr_0 header claims `header_shape` uint8 but holds `payload` (stored, consistent CRC)."""
    header = {"descr": "|u1", "fortran_order": False, "shape": header_shape}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf, zf.open("arr_0.npy", "w") as f:
        np.lib.format.write_array_header_1_0(f, header)
        f.write(payload)


def test_truncated_or_non_zip_npz_names_the_file(tmp_path, monkeypatch, capsys):
    """Was: a bare `BadZipFile: File is not a zip file` (a traceback from the CLI)."""
    images = _images(20, 3)
    save_samples(tmp_path / "good.npz", images)
    data = (tmp_path / "good.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])  # truncated: no central directory
    (tmp_path / "text.npz").write_text("not an archive\n")
    for name in ("cut.npz", "text.npz"):
        with pytest.raises(NpzError, match=f"{name}: damaged or unreadable .npz") as err:
            list(image_batches(tmp_path / name))
        assert isinstance(err.value, ValueError) and isinstance(err.value, ReportedError)
        with pytest.raises(NpzError, match=name):  # as a reference: the stats-file check reads its keys
            score(tmp_path / "good.npz", tmp_path / name, FakeDetector(), progress=False)
        with pytest.raises(NpzError, match=name):  # as the samples
            score(tmp_path / name, tmp_path / "good.npz", FakeDetector(), progress=False)
    # the header promises 20 images, the member holds 5: read until the data runs out
    _write_raw_npz(tmp_path / "short.npz", (20, 8, 8, 3), images[:5].tobytes())
    with pytest.raises(NpzError, match="short.npz:arr_0: truncated array"):
        list(image_batches(tmp_path / "short.npz", batch_size=4))
    # a flipped byte in the stored image data: the zip CRC check fails at the end of the member
    raw = bytearray(data)
    raw[raw.index(images[:1].tobytes()[:64]) + 10] ^= 0xFF
    (tmp_path / "flipped.npz").write_bytes(bytes(raw))
    with pytest.raises(NpzError, match="flipped.npz:arr_0: damaged.*CRC"):
        list(image_batches(tmp_path / "flipped.npz", batch_size=7))
    _patch_cli_detector(monkeypatch)
    assert cli_main(["eval", "score", str(tmp_path / "cut.npz"), "--ref", str(tmp_path / "good.npz")]) == 2
    assert "cut.npz" in capsys.readouterr().err
    assert cli_main(["eval", "ref", str(tmp_path / "text.npz"), "--out", str(tmp_path / "o.npz")]) == 2
    assert "text.npz" in capsys.readouterr().err
    # `repa eval score` names a damaged or missing .npz in one line before building (or downloading) any detector
    calls = _patch_cli_detector(monkeypatch)
    good, cut, gone = (str(tmp_path / n) for n in ("good.npz", "cut.npz", "gone.npz"))
    for samples, ref, name in ((cut, good, "cut.npz"), (good, cut, "cut.npz"), (gone, good, "gone.npz")):
        assert cli_main(["eval", "score", samples, "--ref", ref]) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert name in line
    assert calls == []


def test_damaged_cached_reference_statistics_are_recomputed(tmp_path):
    save_samples(tmp_path / "r.npz", _images(20, 4))
    first = reference_statistics(tmp_path / "r.npz", FakeDetector(), progress=False)
    (cached,) = (tmp_path / "cache" / "eval").glob("ref-*.npz")
    cached.write_bytes(cached.read_bytes()[:100])
    with pytest.warns(UserWarning, match="damaged cached reference statistics"):
        again = reference_statistics(tmp_path / "r.npz", FakeDetector(), progress=False)
    np.testing.assert_array_equal(again.stats["pool"][1], first.stats["pool"][1])


# ------------------------------------------------------------------------------------ 11. precomputed statistics


def test_precomputed_statistics_are_only_used_for_the_adm_inception(tmp_path):
    """Was: the file's mu/sigma used whatever the detector (here a 16-d 'fake' network)."""
    np.savez(tmp_path / "ref.npz", arr_0=_images(30, 5), mu=np.ones(16), sigma=np.eye(16), mu_s=np.zeros(6),
             sigma_s=np.eye(6))  # fmt: skip
    with pytest.warns(UserWarning, match="not of detector 'fake'"):
        ref = reference_statistics(tmp_path / "ref.npz", FakeDetector(), progress=False)
    assert ref.source == "images" and ref.source_of("spatial") == "images"
    assert not np.allclose(ref.stats["pool"][0], 1.0) and "ADM's Inception" in ref.note
    with pytest.warns(UserWarning, match="not of detector 'fake'"):  # repeated when the cached result is reused
        m = score(tmp_path / "ref.npz", tmp_path / "ref.npz", FakeDetector(), progress=False)
    assert abs(m["fid"]) < 1e-6 and m["reference_stats"] == "images" and m["reference_stats_num"] == 30
    assert "not of detector 'fake'" in m["reference_note"]


def test_precomputed_statistics_of_other_dimensions_are_not_used(tmp_path):
    """Was: a shape-mismatch crash in the Fréchet distance (Inception's 2048-d statistics, a narrower detector)."""
    np.savez(tmp_path / "ref.npz", arr_0=_images(30, 6), mu=np.ones(2048), sigma=np.eye(2048), mu_s=np.zeros(6),
             sigma_s=np.eye(6))  # fmt: skip
    with pytest.warns(UserWarning, match=r"mu/sigma not used: shapes \(2048,\)/\(2048, 2048\)"):
        m = score(tmp_path / "ref.npz", tmp_path / "ref.npz", AdmNamedDetector(), progress=False)
    assert abs(m["fid"]) < 1e-6 and m["reference_stats"] == "images"
    assert m["reference_stats_sfid"] == "precomputed" and m["sfid"] > 0  # the 6-d spatial statistics do match


def test_metrics_say_which_reference_statistics_were_used(tmp_path):
    mu, sigma = np.full(16, 0.5), np.eye(16) * 3
    np.savez(tmp_path / "ref.npz", arr_0=_images(30, 7), mu=mu, sigma=sigma, mu_s=np.zeros(6), sigma_s=np.eye(6))
    save_samples(tmp_path / "s.npz", _images(12, 8))
    m = score(
        tmp_path / "s.npz", tmp_path / "ref.npz", AdmNamedDetector(), progress=False, out_json=tmp_path / "m.json"
    )
    saved = json.loads((tmp_path / "m.json").read_text())
    assert saved["reference_stats"] == "precomputed" and saved["reference_stats_sfid"] == "precomputed"
    assert saved["reference_stats_num"] is None and saved["reference_note"] is None and saved["num_reference"] == 30
    # --ref-num: statistics of the first N images, and the JSON and a warning say that the file's were not used
    with pytest.warns(UserWarning, match=r"mu/sigma/mu_s/sigma_s not used: .*first 20 images \(--ref-num"):
        limited = score(tmp_path / "s.npz", tmp_path / "ref.npz", AdmNamedDetector(), ref_limit=20, progress=False)
    assert limited["reference_stats"] == "images" and limited["reference_stats_num"] == 20
    assert "--ref-num" in limited["reference_note"]
    from repa.evaluation import summary_line

    assert "reference statistics: precomputed" in summary_line({**m, "detector": "d"})
    assert "reference statistics: 20 images" in summary_line({**limited, "detector": "d"})


def test_statistics_cached_by_earlier_versions_are_not_reused(tmp_path):
    """A v1 cache entry (keyed without a version) could hold Inception statistics chosen for any detector."""
    np.savez(tmp_path / "ref.npz", arr_0=_images(30, 9), mu=np.ones(16), sigma=np.eye(16))
    old_key = file_fingerprint(tmp_path / "ref.npz", "fake|precomputed=True")
    stale = ReferenceStats({"pool": (np.ones(16), np.eye(16))}, np.zeros((30, 16), np.float32), "precomputed")
    (tmp_path / "cache" / "eval").mkdir(parents=True)
    stale.save(tmp_path / "cache" / "eval" / f"ref-{old_key}.npz")
    with pytest.warns(UserWarning, match="not of detector 'fake'"):
        ref = reference_statistics(tmp_path / "ref.npz", FakeDetector(), progress=False)
    assert ref.source == "images" and ref.pool.any()


# ------------------------------------------------------------------------------------ 12. Inception Score chunks


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _is_by_definition(probs: np.ndarray, chunk: int) -> float:
    """exp of the mean KL(p(y|x) || p(y)) per consecutive chunk (the last may be shorter), averaged over chunks."""
    per_chunk = []
    for start in range(0, len(probs), chunk):
        p = probs[start : start + chunk]
        per_chunk.append(np.exp((p * np.log(p / p.mean(axis=0))).sum(axis=1).mean()))
    return float(np.mean(per_chunk))


def test_inception_score_uses_adm_chunks_of_5000():
    """Was: always 10 splits, so N = 2,000 samples spread over 1,000 classes scored 200 instead of ADM's 1,000."""
    one_hot = np.eye(1000)[np.tile(np.arange(1000), 2)]  # N = 2000: one ADM chunk holding every class twice
    assert inception_score(one_hot)[0] == pytest.approx(1000, rel=1e-12)
    assert inception_score(one_hot, num_splits=10)[0] == pytest.approx(200, rel=1e-12)  # the old convention
    # N = 12,000: chunks of 5000, 5000 and a last one of 2000 weighing as much as the others
    logits = np.random.default_rng(0).standard_normal((12_000, 10)) * 3
    mean, std = inception_score(torch.from_numpy(logits), logits=True)
    assert mean == pytest.approx(_is_by_definition(_softmax(logits), 5000), rel=1e-12) and std > 0
    # with 5000 * k samples ADM's chunks are the equal splits, bit for bit (FID-50K: 10 chunks)
    big = np.random.default_rng(1).standard_normal((50_000, 8))
    assert inception_score(big, logits=True) == inception_score(big, logits=True, num_splits=10)
    with pytest.raises(TypeError):
        inception_score(big, 10)  # the split argument is keyword-only: an old positional num_splits fails loudly


def test_metrics_json_records_the_is_split_size(tmp_path):
    save_samples(tmp_path / "s.npz", _images(40, 10))
    m = score(tmp_path / "s.npz", tmp_path / "s.npz", FakeDetector(logits=True), progress=False,
              out_json=tmp_path / "m.json")  # fmt: skip
    saved = json.loads((tmp_path / "m.json").read_text())
    assert saved["is_split_size"] == 5000 and saved["is_num_splits"] == 1 and saved["is_missing_reason"] is None
    assert m["is"] > 1


# ------------------------------------------------------------------------------------ 13. classifier weights


def _state_dict_file(path: Path, w: torch.Tensor) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"fc.weight": w.t().contiguous(), "fc.bias": torch.zeros(1008)}, path)
    return path


def test_classifier_is_found_where_other_fid_tools_keep_it(tmp_path):
    w = torch.randn(2048, 1008, generator=torch.Generator().manual_seed(0))
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    expected = [hub / inception_weights.PYTORCH_FID_FILE, hub / inception_weights.TORCH_FIDELITY_FILE]
    assert inception_weights.classifier_search_paths()[1:] == expected
    _state_dict_file(hub / inception_weights.TORCH_FIDELITY_FILE, w)  # torch-fidelity / torchmetrics
    _state_dict_file(hub / inception_weights.PYTORCH_FID_FILE, torch.zeros(2048, 1008))  # not pytorch-fid's hash
    found, why = find_inception_classifier("auto")
    assert why is None and torch.equal(found, w)
    assert inception_weights._DOWNLOAD_ATTEMPT is None  # nothing fetched


def test_classifier_download_is_tried_once_per_process(tmp_path, monkeypatch):
    """Was: a download (60 s timeout offline) on every detector construction and every rank."""
    calls = []

    def failing(url, dest, timeout=60.0):
        calls.append(url)
        raise OSError("no route to host")

    monkeypatch.setattr(inception_weights, "_fetch_url", failing)
    for _ in range(3):
        with pytest.warns(UserWarning, match="Inception Score is unavailable"):
            assert inception_classifier("auto") is None
    assert calls == [inception_weights.PYTORCH_FID_URL]
    _, why = find_inception_classifier("auto")
    assert "no route to host" in why and "tried once per process" in why and "--classifier PATH" in why
    assert str(tmp_path / "torch" / "hub" / "checkpoints") in why  # where it looked
    assert "switched off" in find_inception_classifier(None)[1]
    assert "downloading is off" in find_inception_classifier("auto", download=False)[1]
    # a file placed later (e.g. by another process) is still picked up
    w = torch.randn(2048, 1008)
    _state_dict_file(tmp_path / "torch" / "hub" / "checkpoints" / inception_weights.TORCH_FIDELITY_FILE, w)
    assert torch.equal(find_inception_classifier("auto")[0], w) and len(calls) == 1


def test_explicit_classifier_files_are_checked_naming_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.npy"):
        find_inception_classifier(tmp_path / "missing.npy")
    np.save(tmp_path / "w.npy", np.zeros((10, 10), np.float32))
    with pytest.raises(EvaluationInputError, match=r"w.npy is not a usable Inception classifier.*\(2048, 1008\)"):
        find_inception_classifier(tmp_path / "w.npy")
    (tmp_path / "cut.pth").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(EvaluationInputError, match="cut.pth is not a usable"):
        find_inception_classifier(tmp_path / "cut.pth")
    w = torch.randn(2048, 1008)
    assert torch.equal(find_inception_classifier(_state_dict_file(tmp_path / "pt.pth", w))[0], w)


def test_metrics_json_says_why_is_is_missing(tmp_path):
    from repa.evaluation import EncoderDetector

    save_samples(tmp_path / "s.npz", _images(20, 11))
    plain = score(tmp_path / "s.npz", tmp_path / "s.npz", FakeDetector(), progress=False)
    assert plain["is"] is None and plain["is_missing_reason"] == "the detector gives no classifier logits"

    class Offline(FakeDetector):
        is_missing_reason = "no Inception classifier weights in ...; pass --classifier PATH"

    m = score(tmp_path / "s.npz", tmp_path / "s.npz", Offline(), progress=False, out_json=tmp_path / "m.json")
    assert json.loads((tmp_path / "m.json").read_text())["is_missing_reason"] == Offline.is_missing_reason
    assert m["is_num_splits"] is None

    class Tokens(torch.nn.Module):
        name = "toy"

        def forward(self, images):
            return images.float().flatten(2).transpose(1, 2)

    assert "needs the Inception classifier" in EncoderDetector(Tokens(), resolution=4).is_missing_reason


def test_cli_classifier_flag_reaches_the_detector(tmp_path, monkeypatch):
    calls = _patch_cli_detector(monkeypatch)
    save_samples(tmp_path / "s.npz", _images(20, 12))
    base = ["eval", "score", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "s.npz"), "--no-progress"]
    assert cli_main([*base, "--classifier", str(tmp_path / "w.pth")]) == 0
    assert cli_main([*base, "--no-is"]) == 0
    assert cli_main(base) == 0
    assert [c[0][3] for c in calls] == [str(tmp_path / "w.pth"), None, "auto"]  # make_detector(name, device, inc, cls)
    with pytest.raises(SystemExit) as exc:
        cli_main([*base, "--no-is", "--classifier", "w.pth"])
    assert exc.value.code == 2
    seen = {}

    def fake_generate(*args, **kwargs):
        seen.update(kwargs)
        return {"json": "m.json", "num_samples": 1}

    monkeypatch.setattr("repa.evaluation.generation.generate_and_score", fake_generate)
    argv = ["eval", "generate", "ckpt", "--ref", "fashion-mnist:test", "--classifier", "w.npy", "--no-progress"]
    assert cli_main(argv) == 0 and seen["classifier"] == "w.npy"


def test_npz_struct_errors_are_wrapped(tmp_path):
    """A header whose length field is cut short (struct.error inside numpy) also names the file."""
    with zipfile.ZipFile(tmp_path / "h.npz", "w") as zf:
        zf.writestr("arr_0.npy", b"\x93NUMPY\x01\x00" + struct.pack("<H", 200)[:1])
    with pytest.raises(NpzError, match="h.npz"):
        list(image_batches(tmp_path / "h.npz"))
