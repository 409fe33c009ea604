"""Fault injection: SIGKILL anywhere (also mid-checkpoint), disk full / read-only output, NaN/inf steps, mixed
precision, impossible configs. The policy these tests prove is in docs/reliability.md."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import repa.checkpoint as C
from repa.checkpoint import (
    FAULT_POINTS,
    CheckpointError,
    list_checkpoints,
    load_checkpoint,
    load_latest_checkpoint,
    save_checkpoint,
)
from repa.config import load_config
from repa.training import train
from repa.training.batches import GlobalOrder
from repa.training.loop import NonFiniteError
from tests.helpers.tiny import PatchEncoder, metrics, tiny_overrides

ROOT = Path(__file__).parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
TIMING = ("images_per_s", "peak_memory_gb")  # the only metrics allowed to differ between two runs


pytestmark = pytest.mark.usefixtures("isolated_cache")


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, fmnist_root):
    """An uninterrupted in-process run of the tiny command (6 steps, checkpoints at 3 and 6)."""
    tmp = tmp_path_factory.mktemp("full")
    with pytest.MonkeyPatch.context() as m:
        m.setenv("REPA_CACHE", str(tmp / "cache"))
        m.setattr("repa.training.setup.build_encoders", lambda cfg, device: [PatchEncoder(98)])
        train(load_config(TINY, tiny_overrides(tmp / "run", fmnist_root)))
    return tmp / "run"


def assert_same_training_state(a: Path, b: Path) -> None:
    """The newest checkpoints of two runs hold bit-identical weights, EMA, optimizer and scheduler state, and the
    two metrics logs agree except for timings."""
    assert_same_checkpoints(a, b)
    ma, mb = metrics(a), metrics(b)
    strip = [{k: v for k, v in r.items() if k not in TIMING} for r in ma]
    assert strip == [{k: v for k, v in r.items() if k not in TIMING} for r in mb]


def assert_same_checkpoints(a: Path, b: Path) -> None:
    """The newest checkpoints of runs `a` and `b` hold the same step and bit-identical weights, EMA, optimizer and
    scheduler state."""
    ca, cb = (load_checkpoint(C.latest_checkpoint(r / "checkpoints")) for r in (a, b))
    assert ca["state"]["step"] == cb["state"]["step"]
    assert ca["state"]["nonfinite_steps"] == cb["state"]["nonfinite_steps"]
    for key in ("model", "ema"):
        assert ca[key].keys() == cb[key].keys()
        for name in ca[key]:
            assert torch.equal(ca[key][name], cb[key][name]), f"{key}.{name} differs"
    oa, ob = ca["optimizer"]["optimizer"], cb["optimizer"]["optimizer"]
    assert oa["param_groups"] == ob["param_groups"] and oa["state"].keys() == ob["state"].keys()
    for pid in oa["state"]:
        for k, v in oa["state"][pid].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(ob["state"][pid][k])), f"optimizer {pid}.{k}"
    assert ca["optimizer"]["scheduler"] == cb["optimizer"]["scheduler"]


def assert_checkpoints_sound(ckpt_root: Path) -> list[int]:
    """Every visible checkpoint loads completely and its step matches its name; returns the steps."""
    steps = []
    for path in list_checkpoints(ckpt_root):
        ck = load_checkpoint(path)
        assert ck["ema"] is not None and ck["optimizer"] is not None, path
        assert all(torch.isfinite(v).all() for v in ck["model"].values())
        steps.append(ck["state"]["step"])
    if steps:
        assert load_latest_checkpoint(ckpt_root)[0] == list_checkpoints(ckpt_root)[-1]
    return steps


# ------------------------------------------------------------------------ checkpoint writes killed at each point


class _Killed(BaseException):
    """Stands in for SIGKILL in-process: nothing below the fault point runs (no except/cleanup catches it)."""


def _state(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return {"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g)}


def _save(root: Path, step: int) -> None:
    opt = {"optimizer": {"state": {0: {"step": torch.tensor(float(step))}}, "param_groups": [{"lr": 1e-3}]}}
    save_checkpoint(root, step, model=_state(step), ema=_state(step + 100), optimizer=opt, meta={"k": step}, keep=2)


@pytest.mark.parametrize("point", FAULT_POINTS)
def test_killed_checkpoint_write_leaves_only_complete_checkpoints(tmp_path, monkeypatch, point):
    root = tmp_path / "ckpt"
    for step in (1, 2):
        _save(root, step)

    def die(pid, sig):
        assert pid == 4242424 and sig == signal.SIGKILL
        raise _Killed

    with monkeypatch.context() as m:  # the killed writer is another process (its leftovers carry its pid)
        m.setattr(C.os, "kill", die)
        m.setattr(C.os, "getpid", lambda: 4242424)
        m.setenv("REPA_FAULT_AFTER_FILE", f"{point}@{2 if point == 'old' else 3}")
        with pytest.raises(_Killed):
            _save(root, 2 if point == "old" else 3)  # "old": a same-step rewrite, the only path moving one aside
    visible = list_checkpoints(root)
    steps = [int(p.name[-8:]) if p.name.startswith("step_") else int(p.name.split("_")[2]) for p in visible]
    assert 2 in steps and set(steps) <= {1, 2, 3}, steps  # the last good checkpoint is kept
    for path, step in zip(visible, steps):
        ck = load_checkpoint(path)
        assert ck["state"]["step"] == step and torch.equal(ck["model"]["w"], _state(step)["w"])
    leftovers = [p.name for p in root.iterdir() if p.name.startswith(".")]
    assert leftovers or steps == [1, 2, 3], "the kill should leave something for the next save to clean"
    _save(root, 4)  # the next save restores or removes every leftover
    assert sorted(p.name for p in root.iterdir()) == [f"step_0000000{max(steps)}", "step_00000004"]


def test_torch_save_on_a_full_disk_is_reported_as_such(tmp_path, monkeypatch):
    root = tmp_path / "ckpt"
    _save(root, 1)

    def full(*a, **k):  # what torch.save raises when the disk fills: no errno, no hint
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    monkeypatch.setattr(C.torch, "save", full)
    monkeypatch.setattr(C.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, 0))
    with pytest.raises(CheckpointError, match=r"no space left on device \(0 bytes free; RuntimeError: .*unexpected "
                       r"pos.*step_00000001 is intact"):  # fmt: skip
        _save(root, 2)
    assert sorted(p.name for p in root.iterdir()) == ["step_00000001"]


def test_full_disk_is_reported_although_deleting_the_partial_checkpoint_frees_space(tmp_path, monkeypatch):
    """The free space is measured while the partial folder still fills the disk: once it is deleted, a realistic
    checkpoint leaves far more than the 1 MiB the reason checks for."""
    root = tmp_path / "ckpt"
    _save(root, 1)

    def full(*a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    def usage(path):  # full while the partial folder exists; 100 MB free once it is gone
        partial = any(p.name.startswith(".tmp_step_") for p in root.iterdir())
        return shutil._ntuple_diskusage(10**9, 10**9, 0 if partial else 10**8)

    monkeypatch.setattr(C.torch, "save", full)
    monkeypatch.setattr(C.shutil, "disk_usage", usage)
    with pytest.raises(CheckpointError, match=r"step_00000002: no space left on device \(0 bytes free; RuntimeError: "
                       r".*unexpected pos.*\); the previous checkpoint .*step_00000001 is intact"):  # fmt: skip
        _save(root, 2)
    assert sorted(p.name for p in root.iterdir()) == ["step_00000001"]


def test_full_disk_on_a_real_file_system_with_a_realistic_checkpoint(tmp_path):
    """A real ENOSPC in torch.save (a bare `unexpected pos` RuntimeError) on a 3.5 MiB tmpfs: the weights (2 MiB) fit,
    the optimizer state (2 MiB) does not; deleting the partial folder frees 2+ MiB."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    code = (f"import sys, torch; sys.path.insert(0, {str(ROOT)!r}); from repa.checkpoint import save_checkpoint; "
            "w = lambda: {'w': torch.randn(2**18)}; "
            f"save_checkpoint({str(mnt / 'ckpt')!r}, 1, model=w(), ema=w(), optimizer={{'m': torch.randn(2**19)}}, "
            "meta={})")  # fmt: skip
    prefix = _private_mounts(f'mount -t tmpfs -o size=3584k tmpfs "{mnt}" || exit 77; "$@"')
    res = subprocess.run([*prefix, sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    if res.returncode == 77:
        pytest.skip("tmpfs mount refused")
    last = res.stderr.strip().splitlines()[-1]
    assert "CheckpointError: could not write checkpoint" in last and "step_00000001: no space left on device" in last


def test_damaged_newest_checkpoint_stops_resume_with_clear_error(tmp_path):
    root = tmp_path / "ckpt"
    for step in (1, 2):
        _save(root, step)
    path = root / "step_00000002" / "model.safetensors"
    path.write_bytes(path.read_bytes()[:100])  # damage from outside repa (repa's own writes are atomic)
    with pytest.raises(CheckpointError, match=r"step_00000002.*Move .*step_00000001"):
        load_latest_checkpoint(root)
    meta = root / "step_00000001" / "state.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "step": 99}))  # metadata cannot redirect the resume
    with pytest.raises(CheckpointError, match="state.json says step 99 but the folder is step_00000001"):
        load_checkpoint(root / "step_00000001")


# ------------------------------------------------------------------- real SIGKILLs of a training subprocess

_SCRIPT = """
import json, sys
sys.path.insert(0, {root!r})
import repa.training.setup as S
from tests.helpers.tiny import PatchEncoder
S.build_encoders = lambda cfg, device: [PatchEncoder(98)]
from repa.config import load_config
from repa.training import train
train(load_config({cfg!r}, json.loads(sys.argv[1])))
"""


class Trainer:
    """Runs the same tiny training command in subprocesses (one thread each, a shared target cache)."""

    def __init__(self, tmp: Path, data_root: Path) -> None:
        self.tmp, self.data_root = tmp, data_root
        self.script = tmp / "run_train.py"
        self.script.write_text(_SCRIPT.format(root=str(ROOT), cfg=str(TINY)))
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "REPA_CACHE": str(tmp / "cache"), "PYTHONUNBUFFERED": "1"}
        self.env.pop("REPA_FAULT_AFTER_FILE", None)

    def command(self, run_dir: Path) -> list[str]:
        over = tiny_overrides(run_dir, self.data_root, "train.max_steps=12", "train.checkpoint_every=2",
                              "train.keep_checkpoints=2", "train.num_threads=1")  # fmt: skip
        return [sys.executable, str(self.script), json.dumps(over)]

    def run(self, run_dir: Path, fault: str | None = None, prefix: list[str] | None = None):
        env = {**self.env, **({"REPA_FAULT_AFTER_FILE": fault} if fault else {})}
        return subprocess.run([*(prefix or []), *self.command(run_dir)], env=env, capture_output=True, text=True,
                              timeout=300)  # fmt: skip

    def run_and_kill(self, run_dir: Path, at_step: int, delay: float) -> int:
        """Start the command and SIGKILL it `delay` s after it logged step `at_step` (a checkpoint save follows the
        log line of a checkpoint step, so such kills often land inside it); returns the exit code."""
        log = run_dir / "metrics.jsonl"
        stale = log.stat().st_ino if log.exists() else None  # a resumed run first rewrites it (new inode)
        proc = subprocess.Popen(self.command(run_dir), env=self.env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            deadline = time.monotonic() + 120
            while proc.poll() is None and time.monotonic() < deadline:
                try:
                    lines = log.read_text().splitlines() if log.stat().st_ino != stale else []
                except FileNotFoundError:
                    lines = []
                if any(line.startswith(f'{{"step": {at_step},') for line in lines):
                    break
                time.sleep(0.005)
            time.sleep(delay)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            return proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()


@pytest.fixture(scope="module")
def trainer(tmp_path_factory, fmnist_root):
    return Trainer(tmp_path_factory.mktemp("sub"), fmnist_root)


@pytest.fixture(scope="module")
def reference(trainer):
    """The uninterrupted run every interrupted one must equal bit for bit."""
    run = trainer.tmp / "reference"
    res = trainer.run(run)
    assert res.returncode == 0, res.stderr[-3000:]
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step_00000010", "step_00000012"]
    return run


def _visible(run: Path) -> list[int]:
    return [int(p.name[-8:]) for p in list_checkpoints(run / "checkpoints")]


@pytest.mark.slow
def test_sigkill_mid_checkpoint_and_at_random_times_then_resume_is_bit_exact(trainer, reference):
    run = trainer.tmp / "killed"
    # (fault point@step, checkpoints visible after the kill); the other points are killed in-process above
    chain = [
        ("model.safetensors@2", []),  # the first checkpoint never appears ...
        ("optimizer.pt@2", []),
        ("fsync@2", []),  # ... even complete and on disk, until renamed into place
        ("rename@2", [2]),  # in place, killed before pruning
        ("prune@6", [4, 6]),  # killed between renaming step 2 away and deleting it
    ]
    for fault, visible in chain:
        res = trainer.run(run, fault)
        assert res.returncode == -signal.SIGKILL, (fault, res.returncode, res.stderr[-2000:])
        assert assert_checkpoints_sound(run / "checkpoints") == visible, fault
        hidden = [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
        assert hidden, f"{fault}: expected the leftovers of the killed write"
    rng = random.Random(20250107)  # then SIGKILLs at random instants of the steps (and checkpoint writes) left
    codes = []
    for _ in range(2):
        resumed = max(_visible(run))
        if resumed >= 11:
            break
        at_step, delay = rng.randint(resumed + 1, 11), rng.uniform(0.0, 0.05)
        codes.append((at_step, round(delay, 3), trainer.run_and_kill(run, at_step, delay)))
        assert_checkpoints_sound(run / "checkpoints")
    print(f"random kills (at step, delay s, exit code): {codes}")
    assert any(c[-1] == -signal.SIGKILL for c in codes), codes
    res = trainer.run(run)  # the same command, no fault: resumes and finishes
    assert res.returncode == 0, res.stderr[-3000:]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000010", "step_00000012"]
    assert_same_training_state(reference, run)


@pytest.mark.slow
def test_rerun_of_a_finished_run_killed_before_pruning_prunes(trainer, reference):
    """Killed after renaming its last checkpoint into place but before pruning, a run leaves keep + 1 checkpoints;
    the rerun has no step left to train (so no save that would prune): it prunes on resuming."""
    run = trainer.tmp / "killed_before_prune"
    res = trainer.run(run, "rename@12")
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    assert _visible(run) == [8, 10, 12]
    res = trainer.run(run)
    assert res.returncode == 0, res.stderr[-3000:]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000010", "step_00000012"]
    assert_same_training_state(reference, run)


def _private_mounts(script: str) -> list[str]:
    """`unshare -m sh -c script "$@"`: mounts private to the child. Skips the test where mounts are not allowed
    (not root, no CAP_SYS_ADMIN, no unshare); the monkeypatched tests cover those machines."""
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("private mounts need root and unshare")
    probe = 'd=$(mktemp -d) && mount -t tmpfs -o size=4k tmpfs "$d" && umount "$d" && rmdir "$d"'
    if subprocess.run(["unshare", "-m", "sh", "-c", probe], capture_output=True).returncode != 0:
        pytest.skip("mounting is not permitted here")
    return ["unshare", "-m", "sh", "-c", script, "sh"]


@pytest.mark.slow
def test_full_disk_keeps_previous_checkpoint(trainer, reference):
    """A real ENOSPC: the checkpoints folder is a tmpfs with room for two checkpoints and a bit."""
    run = trainer.tmp / "full"
    ckpts, saved = run / "checkpoints", trainer.tmp / "full-saved"
    ckpts.mkdir(parents=True)
    saved.mkdir()
    size = sum(f.stat().st_size for f in (reference / "checkpoints" / "step_00000012").iterdir())
    kib = int(2.5 * size / 1024) + 8
    # run training, then copy out what the tmpfs holds before the namespace (and the tmpfs) goes away
    prefix = _private_mounts(f'mount -t tmpfs -o size={kib}k tmpfs "{ckpts}" || exit 77; "$@"; rc=$?; '
                             f'cp -a "{ckpts}/." "{saved}/"; exit $rc')  # fmt: skip
    res = trainer.run(run, prefix=prefix)
    if res.returncode == 77:
        pytest.skip("tmpfs mount refused")
    assert res.returncode == 1, res.stderr[-3000:]
    assert "CheckpointError: could not write checkpoint" in res.stderr and "no space left on device" in res.stderr
    assert "step_00000004 is intact" in res.stderr
    assert sorted(p.name for p in saved.iterdir()) == ["step_00000002", "step_00000004"]  # no partial leftovers
    assert assert_checkpoints_sound(saved) == [2, 4]


@pytest.mark.slow
def test_read_only_run_dir_fails_before_any_work(trainer, reference):
    """A real read-only bind mount of a run folder holding checkpoints: one clear error, nothing computed."""
    run = trainer.tmp / "readonly"
    shutil.copytree(reference, run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    prefix = _private_mounts(f'mount --bind "{run}" "{run}" && mount -o remount,ro,bind "{run}" || exit 77; exec "$@"')
    env_cache = trainer.tmp / "ro-cache"
    trainer.env["REPA_CACHE"], old = str(env_cache), trainer.env["REPA_CACHE"]
    try:
        res = trainer.run(run, prefix=prefix)
    finally:
        trainer.env["REPA_CACHE"] = old
    if res.returncode == 77:
        pytest.skip("read-only bind mount refused")
    assert res.returncode == 1, res.stderr[-3000:]
    assert f"CheckpointError: run directory {run} is not writable: Read-only file system" in res.stderr
    assert not env_cache.exists()  # failed before loading data or computing targets
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


# --------------------------------------------------------------------- disk full / read-only, in process


def test_full_disk_mid_checkpoint_keeps_previous_and_resume_is_exact(tmp_path, fmnist_root, test_encoder,
                                                                      monkeypatch, full_run):  # fmt: skip
    run = tmp_path / "run"
    real_save_file = C.save_file

    def failing_save_file(tensors, filename, *a, **k):
        if "step_00000006" in filename and filename.endswith("ema.safetensors"):
            real_save_file(tensors, filename, *a, **k)
            with open(filename, "r+b") as f:  # the disk fills halfway through the file
                f.truncate(os.path.getsize(filename) // 2)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
        return real_save_file(tensors, filename, *a, **k)

    monkeypatch.setattr(C, "save_file", failing_save_file)
    with pytest.raises(CheckpointError, match="step_00000006: no space left on device; the previous checkpoint .*"
                       "step_00000003 is intact"):  # fmt: skip
        train(load_config(TINY, tiny_overrides(run, fmnist_root)))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000003"]
    monkeypatch.setattr(C, "save_file", real_save_file)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "denoise": 0.')  # and a kill in the middle of a metrics line
    train(load_config(TINY, tiny_overrides(run, fmnist_root)))  # the same command, after the disk is fixed
    assert [r["step"] for r in metrics(run)] == [1, 2, 3, 4, 5, 6]  # replayed steps logged once, torn line gone
    assert_same_training_state(full_run, run)


def test_read_only_file_system_mid_checkpoint_keeps_previous(tmp_path, monkeypatch):
    root = tmp_path / "ckpt"
    _save(root, 1)

    def read_only(obj, f, *a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(f))

    monkeypatch.setattr(C.torch, "save", read_only)
    with pytest.raises(CheckpointError, match="step_00000002: read-only file system; the previous .*step_00000001"):
        _save(root, 2)
    assert sorted(p.name for p in root.iterdir()) == ["step_00000001"]


def test_unwritable_run_dir_fails_before_loading_data(tmp_path, fmnist_root, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("no work may start before the run directory is known writable")

    monkeypatch.setattr("repa.training.loop.load_train_images", boom)
    (tmp_path / "file").write_text("a file, not a folder")
    with pytest.raises(CheckpointError, match="run directory .*file/run is not writable"):
        train(load_config(TINY, tiny_overrides(tmp_path / "file" / "run", fmnist_root)))


# ------------------------------------------------------------------------------------ NaN / inf steps


def _poison_loss(monkeypatch, calls: dict[int, str]) -> None:
    """At loss call i (= optimizer step i with no accumulation), make the loss ("loss") or only the gradients
    ("grad") non-finite."""
    import repa.training.setup as S

    real = S.build_loss
    counter = {"n": 0}

    def build(cfg):
        inner = real(cfg)

        def loss(model, *a, **k):
            terms = inner(model, *a, **k)
            i, counter["n"] = counter["n"], counter["n"] + 1
            if i in calls:
                if calls[i] == "loss":
                    terms = {**terms, "total": terms["total"] * float("nan")}
                else:  # finite value, NaN gradient: d/dp 0 * sqrt(p - p) = 0 * inf
                    p = next(model.parameters()).sum()
                    terms = {**terms, "total": terms["total"] + 0.0 * torch.sqrt(p - p.detach())}
            return terms

        return loss

    monkeypatch.setattr(S, "build_loss", build)


def test_nonfinite_loss_or_gradient_step_is_skipped_and_counted(tmp_path, fmnist_root, test_encoder,
                                                                  monkeypatch):  # fmt: skip
    run = tmp_path / "run"
    _poison_loss(monkeypatch, {2: "loss", 4: "grad"})  # optimizer steps 3 (NaN loss) and 5 (NaN gradients only)
    train(load_config(TINY, tiny_overrides(run, fmnist_root, "train.checkpoint_every=1", "train.keep_checkpoints=0")))
    ck = {s: load_checkpoint(run / "checkpoints" / f"step_{s:08d}") for s in range(1, 7)}
    for bad in (3, 5):  # a skipped step changes neither weights, EMA, optimizer nor schedule
        for key in ("model", "ema"):
            assert all(torch.equal(ck[bad][key][n], ck[bad - 1][key][n]) for n in ck[bad][key]), (bad, key)
        opt_a, opt_b = ck[bad]["optimizer"]["optimizer"]["state"], ck[bad - 1]["optimizer"]["optimizer"]["state"]
        assert all(torch.equal(opt_a[i]["step"], opt_b[i]["step"]) for i in opt_a)
        assert ck[bad]["optimizer"]["scheduler"] == ck[bad - 1]["optimizer"]["scheduler"]
    assert not torch.equal(ck[4]["model"]["final_layer.linear.weight"], ck[3]["model"]["final_layer.linear.weight"])
    m = metrics(run)
    assert [r["nonfinite_steps"] for r in m] == [0, 0, 1, 1, 2, 2] and ck[6]["state"]["nonfinite_steps"] == 2
    assert all(torch.isfinite(torch.tensor(r["total"])) for r in m)  # NaN never reaches the log
    assert m[2]["total"] == 0.0 and m[3]["total"] > 0  # a window made only of skipped steps logs zeros


def test_inf_in_one_data_point_skips_exactly_its_steps(tmp_path, fmnist_root, test_encoder, monkeypatch):
    import repa.training.setup as S

    real = S.prepare_targets

    def poisoned(cfg, data, encoders):
        real(cfg, data, encoders)
        data.targets = [t.clone() for t in data.targets]
        data.targets[0][:, 7] = float("inf")  # item 7's cached encoder targets

    monkeypatch.setattr(S, "prepare_targets", poisoned)
    run = tmp_path / "run"
    train(load_config(TINY, tiny_overrides(run, fmnist_root, "train.max_nonfinite_steps=5")))
    order = GlobalOrder(40, 0, False)
    expected = sum(int(7 in order.take(step * 8, 8)[0]) for step in range(6))
    assert expected >= 1
    assert metrics(run)[-1]["nonfinite_steps"] == expected


def test_too_many_nonfinite_steps_stop_with_a_usable_checkpoint(tmp_path, fmnist_root, test_encoder, monkeypatch):
    run = tmp_path / "run"
    _poison_loss(monkeypatch, dict.fromkeys((1, 2, 3), "loss"))
    over = tiny_overrides(run, fmnist_root, "train.max_nonfinite_steps=2")
    with pytest.raises(NonFiniteError, match=r"3 steps had non-finite .*max_nonfinite_steps=2.*stopped at step 4"):
        train(load_config(TINY, over))
    ck = load_checkpoint(run / "checkpoints" / "step_00000004")
    assert ck["state"]["nonfinite_steps"] == 3
    assert all(torch.isfinite(v).all() for part in ("model", "ema") for v in ck[part].values())
    monkeypatch.undo()  # the data / settings are fixed: the same command resumes with a fresh allowance
    monkeypatch.setenv("REPA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("repa.training.setup.build_encoders", lambda cfg, device: [PatchEncoder(98)])
    out = train(load_config(TINY, over))
    assert out["step"] == 6 and metrics(run)[-1]["nonfinite_steps"] == 0


def _same_step_state(a: dict, b: dict) -> bool:
    """Two loaded checkpoints hold bit-identical weights, EMA, optimizer and scheduler state."""
    same = all(torch.equal(a[k][n], b[k][n]) for k in ("model", "ema") for n in a[k])
    sa, sb = a["optimizer"]["optimizer"]["state"], b["optimizer"]["optimizer"]["state"]
    same &= sa.keys() == sb.keys() and all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])
    return same and a["optimizer"]["scheduler"] == b["optimizer"]["scheduler"]


@pytest.mark.parametrize("setting, value", [("eps", 0.0), ("lr", 1e39)], ids=["eps=0", "lr=1e39"])
def test_update_that_makes_weights_nonfinite_is_undone_and_stops_cleanly(tmp_path, fmnist_root, test_encoder,
                                                                          monkeypatch, setting, value):  # fmt: skip
    """optim.eps=0 divides 0 by 0 where a gradient is 0; lr=1e39 overflows float32: finite loss and gradients, NaN/inf
    weights after the update. Config validation refuses both, so they come in past it (a Config built or changed in
    code); every such update is undone and counted, the run stops as for NaN losses, and nothing non-finite is kept."""
    monkeypatch.setattr("repa.training.loop.validate", lambda cfg, world_size=1: None)
    run = tmp_path / "run"
    over = tiny_overrides(run, fmnist_root, "train.max_nonfinite_steps=2", "train.checkpoint_every=1")
    cfg = load_config(TINY, over)
    setattr(cfg.optim, setting, value)
    with pytest.raises(NonFiniteError, match=r"3 steps had non-finite loss, gradients or updates.*stopped at step 3"):
        train(cfg)
    assert [r["nonfinite_steps"] for r in metrics(run)] == [1, 2, 3]
    ck = load_checkpoint(run / "checkpoints" / "step_00000003")
    assert C.nonfinite_tensors(ck) == [] and ck["state"]["nonfinite_steps"] == 3
    assert all(torch.equal(ck["model"][n], ck["ema"][n]) for n in ck["ema"])  # never updated: still the initial weights
    assert ck["optimizer"]["optimizer"]["state"] == {} and ck["optimizer"]["scheduler"]["last_epoch"] == 0
    out = train(load_config(TINY, over), allow_config_change=True)  # fixed: resumes from finite weights and trains
    assert [(r["key"], r["old"]) for r in map(json.loads, (run / "config_changes.jsonl").open())] == [
        (f"optim.{setting}", value)
    ]
    ck = load_checkpoint(run / "checkpoints" / "step_00000006")
    assert out["step"] == 6 and C.nonfinite_tensors(ck) == [] and metrics(run)[-1]["nonfinite_steps"] == 0
    assert not torch.equal(ck["model"]["final_layer.linear.weight"], ck["ema"]["final_layer.linear.weight"])


def test_inf_in_the_optimizer_state_stops_the_run_before_anything_is_saved(tmp_path, fmnist_root, test_encoder,
                                                                          monkeypatch):  # fmt: skip
    """An inf moment (a bug, memory corruption) makes an update that cannot overflow inf; it cannot be undone (no
    copies are taken for such updates, and copies taken before the step would hold the inf too): the run stops at
    once, the checkpoints are finite, and rerunning resumes from the newest."""
    calls = []

    class PoisonedAdamW(torch.optim.AdamW):
        def step(self, closure=None):
            calls.append(1)
            if len(calls) == 3:  # the update of step 3
                next(iter(self.state.values()))["exp_avg"].fill_(float("inf"))
            return super().step(closure)

    run = tmp_path / "run"
    over = tiny_overrides(run, fmnist_root, "train.checkpoint_every=1", "train.keep_checkpoints=0")
    with monkeypatch.context() as m:
        m.setattr(torch.optim, "AdamW", PoisonedAdamW)
        with pytest.raises(NonFiniteError, match="the optimizer state holds NaN/inf .*Nothing was saved since the "
                           "newest checkpoint; rerun the same command"):  # fmt: skip
            train(load_config(TINY, over))
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step_00000001", "step_00000002"]
    assert all(C.nonfinite_tensors(load_checkpoint(p)) == [] for p in list_checkpoints(run / "checkpoints"))
    assert [r["step"] for r in metrics(run)] == [1, 2]
    assert train(load_config(TINY, over))["step"] == 6
    assert [r["nonfinite_steps"] for r in metrics(run)] == [0] * 6


def test_update_guard_undoes_nonfinite_updates_bit_for_bit():
    from repa.training.guard import UpdateGuard

    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 3)
    params = list(lin.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, eps=0.0, fused=True)
    guard = UpdateGuard(opt, params)

    def grads(zero_at: int | None = None) -> float:
        for p in params:
            p.grad = torch.randn_like(p)
        if zero_at is not None:
            lin.weight.grad[0, zero_at] = 0.0  # 0 / (sqrt(0) + eps=0) = NaN
        return float(torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in params])))

    def snapshot() -> tuple[list[torch.Tensor], dict]:
        state = {p: {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
        return [p.detach().clone() for p in params], state

    def unchanged(snap) -> bool:
        weights, state = snap
        same = all(torch.equal(a, b) for a, b in zip(weights, params)) and state.keys() == opt.state.keys()
        return same and all(torch.equal(state[p][k], opt.state[p][k]) for p in state for k in state[p])

    before = snapshot()
    assert not guard.step(grads(zero_at=1)) and unchanged(before) and len(opt.state) == 0  # first step's state removed
    opt.param_groups[0]["eps"] = 1e-8
    assert guard.step(grads()) and guard.step(grads())
    assert len(guard._buffers) == len(params)  # the eps=0 step's copies: updates that cannot overflow are not copied
    for keep_buffers in (True, False):  # CPU: copies in buffers kept between steps; CUDA: copies allocated per step
        guard.keep_buffers = keep_buffers
        opt.param_groups[0]["lr"] = 1e39  # overflows float32
        before = snapshot()
        assert not guard.step(grads()) and unchanged(before)
        opt.param_groups[0]["lr"] = 1e-3
        assert guard.step(grads()) and all(torch.isfinite(p).all() for p in params)

    def poison(optimizer, args, kwargs):
        optimizer.state[lin.bias]["exp_avg"][1] = float("nan")

    opt.register_step_pre_hook(poison)
    with pytest.raises(NonFiniteError, match="the optimizer state holds NaN/inf"):
        guard.step(grads())


def test_checkpoints_never_hold_nonfinite_values(tmp_path, fmnist_root, test_encoder):
    """A checkpoint with NaN weights (written before repa refused such updates) is not resumed from: the error names
    it and the checkpoint before; and none is ever written with NaN/inf."""
    from safetensors.torch import save_file

    run = tmp_path / "run"
    train(load_config(TINY, tiny_overrides(run, fmnist_root)))
    path = run / "checkpoints" / "step_00000006"
    weights = load_checkpoint(path)["model"]
    save_file({**weights, "pos_embed": weights["pos_embed"] * float("nan")}, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"step_00000006 holds NaN/inf values in 1 tensors \(e.g. model.pos_embed"
                       r"\).*Move .*step_00000006 out .*step_00000003"):  # fmt: skip
        train(load_config(TINY, tiny_overrides(run, fmnist_root, "train.max_steps=9")))
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    with torch.no_grad():
        model.bias[0] = float("inf")
    with pytest.raises(CheckpointError, match=r"refusing to write checkpoint step 7: NaN/inf in 2 tensors \(e.g. "
                       r"model.bias\); the previous checkpoint .*step_00000006 is intact"):  # fmt: skip
        C.save_training_checkpoint(run / "checkpoints", 7, model=model, ema=model, optimizer=opt, scheduler=sched,
                                   meta={})  # fmt: skip
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_00000003", "step_00000006"]


# ------------------------------------------------------------------------------------- mixed precision


@pytest.fixture
def fresh_accelerator():
    """Accelerate keeps one process-wide state (mixed precision included): reset it around the test."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


def test_bf16_autocast_on_cpu_trains_with_finite_losses(tmp_path, fmnist_root, test_encoder, fresh_accelerator):
    run = tmp_path / "run"
    train(load_config(TINY, tiny_overrides(run, fmnist_root, "train.mixed_precision=bf16", "train.max_steps=3")))
    m = metrics(run)
    assert len(m) == 3 and all(r["nonfinite_steps"] == 0 for r in m)
    assert all(torch.isfinite(torch.tensor([r["denoise"], r["align"], r["grad_norm"]])).all() for r in m)
    assert -1 <= m[-1]["align"] <= 1


def test_fp16_on_cpu_is_refused_before_any_work(tmp_path, fmnist_root, monkeypatch, fresh_accelerator):
    if torch.cuda.is_available():
        pytest.skip("CUDA present: fp16 is allowed")

    def boom(*a, **k):
        raise AssertionError("no work may start")

    monkeypatch.setattr("repa.training.loop.load_train_images", boom)
    with pytest.raises(ValueError, match="fp16 needs a GPU; on CPU use bf16"):
        train(load_config(TINY, tiny_overrides(tmp_path / "run", fmnist_root, "train.mixed_precision=fp16")))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_alignment_loss_is_finite_in_half_precision(dtype):
    from repa.losses import alignment_loss

    g = torch.Generator().manual_seed(0)
    preds = torch.randn(2, 49, 768, generator=g) * 300  # |x|^2 ~ 7e7: overflows fp16 if squared in fp16
    targets = torch.randn(2, 64, 768, generator=g) * 300  # another token grid: resampled
    ref = alignment_loss([preds], [targets])
    for kind in ("cos", "ntxent"):
        out = alignment_loss([preds.to(dtype)], [targets.to(dtype)], kind)
        assert out.dtype == torch.float32 and torch.isfinite(out), kind
    out = alignment_loss([preds.to(dtype)], [targets.to(dtype)])
    assert out.item() == pytest.approx(ref.item(), abs=2e-3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(alignment_loss([preds.to(dtype)], [targets.to(dtype)]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (fp16 loss scaling)")
def test_fp16_overflow_is_skipped_by_the_scaler_and_its_state_saved(tmp_path, fmnist_root, test_encoder, monkeypatch,
                                                            fresh_accelerator):  # fmt: skip
    run, part = tmp_path / "run", tmp_path / "part"
    _poison_loss(monkeypatch, {1: "grad"})  # step 2: finite loss, inf/NaN gradients = an fp16 overflow
    train(load_config(TINY, tiny_overrides(run, fmnist_root, "train.mixed_precision=fp16")))
    m = metrics(run)
    overflows = m[-1]["fp16_overflow_steps"]  # the poisoned step, and any natural overflow of the first steps
    assert overflows >= 1 and m[-1]["nonfinite_steps"] == 0
    ck = load_checkpoint(run / "checkpoints" / "step_00000006")
    assert ck["optimizer"]["scaler"]["scale"] == 2.0 ** (16 - overflows)  # halved once per skipped update
    assert all(torch.isfinite(v).all() for v in ck["model"].values())
    _poison_loss(monkeypatch, {1: "grad"})  # the same run interrupted at step 3: the scale is resumed
    train(load_config(TINY, tiny_overrides(part, fmnist_root, "train.mixed_precision=fp16", "train.max_steps=3")))
    train(load_config(TINY, tiny_overrides(part, fmnist_root, "train.mixed_precision=fp16")))
    resumed = load_checkpoint(part / "checkpoints" / "step_00000006")["optimizer"]["scaler"]
    assert resumed == ck["optimizer"]["scaler"]


# ------------------------------------------------------------------------------ impossible configurations


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.align_depth=7"], r"model.align_depth=7 must be in \[1, 6\] \(the depth of SiT-T/4"),
        (["model.depth=1"], r"align_depth=2 exceeds model.depth=1"),
        (["model.name=SiT-T/3"], r"model.name='SiT-T/3' is not a registered model \(did you mean .*SiT-T/4"),
        (["train.checkpoint_every=0"], r"train.checkpoint_every must be >= 1"),
        (["train.global_batch_size=8", "train.grad_accum_steps=3"], "not divisible"),
        (["train.unknown=1"], "unknown config key 'train.unknown'"),
        (["train.max_steps=ten"], "train.max_steps: expected an integer"),
    ],
)
def test_impossible_config_fails_at_load(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(TINY, overrides)


def test_registry_default_align_depth_is_checked_against_an_overridden_depth():
    with pytest.raises(ValueError, match=r"SiT-XL/2's default align_depth=8 must be in \[1, 4\]"):
        load_config(None, ["model.depth=4"])
    load_config(None, ["model.depth=4", "repa.encoders=[]"])  # vanilla: no projector, nothing to check


def test_token_grid_mismatch_fails_before_targets_are_computed(tmp_path, fmnist_root, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("targets must not be computed for an impossible run")

    monkeypatch.setattr("repa.training.setup.build_encoders", lambda cfg, device: [PatchEncoder(112)])  # 8x8 grid
    monkeypatch.setattr("repa.training.setup.prepare_targets", boom)
    over = tiny_overrides(tmp_path / "run", fmnist_root, "repa.resample_tokens=false")
    with pytest.raises(ValueError, match=r"token-grid mismatch: .*\(8, 8\) grid but the model has 7x7 patches"):
        train(load_config(TINY, over))


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
@pytest.mark.parametrize("target", ["metrics.jsonl", "samples/step_00000004.png"])
def test_full_disk_on_a_log_or_sample_names_the_file(tmp_path, fmnist_root, test_encoder, target):
    """Writes to /dev/full fail with ENOSPC: the error names the file and the reason, and the checkpoint written
    before it (step 3) stays complete, so the same command resumes."""
    run = tmp_path / "run"
    (run / "samples").mkdir(parents=True)
    overrides = tiny_overrides(run, fmnist_root, "train.sample_every=4", "train.log_every=4")
    (run / target).symlink_to("/dev/full")
    with pytest.raises(OSError, match=f"could not write .*{target}: no space left on device") as info:
        train(load_config(TINY, overrides))
    assert info.value.errno == errno.ENOSPC and "rerun the same command to resume" in str(info.value)
    assert assert_checkpoints_sound(run / "checkpoints") == [3]
