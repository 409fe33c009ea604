"""One training per run directory: a second process is refused naming the holder; a lock left by a killed process
(or by another machine, once its heartbeat stops) does not block the next run."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import repa.training.rundir as R
from repa.cli.main import main as cli_main
from repa.config import load_config
from repa.training import train
from repa.training.rundir import RunDirLock, RunLockedError
from tests.helpers.tiny import metrics, tiny_overrides

ROOT = Path(__file__).parents[1]
TINY = ROOT / "configs" / "tiny.yaml"

pytestmark = pytest.mark.usefixtures("isolated_cache")

_HOLDER = """
import sys, time
sys.path.insert(0, {root!r})
from repa.training.rundir import RunDirLock
with RunDirLock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(600)
"""


def _hold(run: Path) -> subprocess.Popen:
    """Another process holding the run directory's lock, like a `repa train` in progress."""
    run.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER.format(root=str(ROOT)), str(run)], stdout=subprocess.PIPE,
                            text=True)  # fmt: skip
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_process_is_refused_then_a_killed_holders_lock_is_taken_over(tmp_path, fmnist_root, test_encoder,
                                                                             capsys):  # fmt: skip
    run = tmp_path / "run"
    holder = _hold(run)
    try:
        over = tiny_overrides(run, fmnist_root)
        assert cli_main(["train", str(TINY), *over]) == RunLockedError.exit_code == 20
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert f"run directory {run} is in use: pid {holder.pid} on host {socket.gethostname()}, started " in line
        assert sorted(p.name for p in run.iterdir()) == ["train.lock"]  # refused before writing anything
        holder.send_signal(signal.SIGKILL)  # the holder dies without releasing: its lock file stays
        holder.wait(timeout=60)
        assert json.loads((run / "train.lock").read_text())["pid"] == holder.pid
        train(load_config(TINY, over))
    finally:
        holder.kill()
    assert f"taking over {run / 'train.lock'} from pid {holder.pid} on host" in capsys.readouterr().out
    assert len(metrics(run)) == 6 and not (run / "train.lock").exists()  # released at the end


def _foreign_lock(run: Path, age_s: float) -> None:
    run.mkdir(parents=True, exist_ok=True)
    lock = run / "train.lock"
    lock.write_text(json.dumps({"pid": 4242, "host": "gpu-node-17", "boot_id": "another-machine",
                                "started": "2026-01-01T00:00:00+00:00", "command": "repa train ..."}))  # fmt: skip
    os.utime(lock, (time.time() - age_s, time.time() - age_s))


def test_a_lock_from_another_machine_blocks_while_its_heartbeat_is_recent(tmp_path, fmnist_root, test_encoder,
                                                                         capsys):  # fmt: skip
    """On a shared file system the holder may run elsewhere (flock may not reach across machines): it is alive
    while it refreshes the lock file; a lock whose heartbeat stopped is taken over."""
    run = tmp_path / "run"
    _foreign_lock(run, age_s=20)
    with pytest.raises(RunLockedError, match=r"pid 4242 on host gpu-node-17, started 2026-01-01T00:00:00\+00:00 holds "
                       r"it \(its heartbeat is 2\d s old; a holder is taken for gone after 300 s\)"):  # fmt: skip
        train(load_config(TINY, tiny_overrides(run, fmnist_root)))
    _foreign_lock(run, age_s=R.STALE_AFTER_S + 5)
    train(load_config(TINY, tiny_overrides(run, fmnist_root, "train.max_steps=2")))
    assert "from pid 4242 on host gpu-node-17, started 2026-01-01T00:00:00+00:00: no longer running" in (
        capsys.readouterr().out
    )


def test_the_holder_refreshes_its_heartbeat_and_releases_the_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(R, "HEARTBEAT_S", 0.05)
    lock = tmp_path / "train.lock"
    with RunDirLock(tmp_path):
        os.utime(lock, (0, 0))
        deadline = time.monotonic() + 10
        while lock.stat().st_mtime == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert time.time() - lock.stat().st_mtime < 5
        held = json.loads(lock.read_text())
        assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
        with pytest.raises(RunLockedError, match=f"pid {os.getpid()} on host"):  # also within one process
            RunDirLock(tmp_path).acquire()
    assert not lock.exists()
    with RunDirLock(tmp_path):  # and it can be taken again
        pass


def test_an_empty_or_torn_lock_file_without_holder_does_not_block(tmp_path):
    (tmp_path / "train.lock").write_text('{"pid": 12')  # a holder killed while writing it
    with RunDirLock(tmp_path) as lock:
        assert lock.took_over is None


_SLOW_TRAINING = """
import json, sys, time
sys.path.insert(0, {root!r})
import repa.training.setup as S
from tests.helpers.tiny import PatchEncoder
S.build_encoders = lambda cfg, device: [PatchEncoder(98)]
real = S.build_loss
def slow(cfg):
    loss = real(cfg)
    def step(*a, **k):
        time.sleep(0.4)  # a step long enough for the second command to start meanwhile
        return loss(*a, **k)
    return step
S.build_loss = slow
from repa.config import load_config
from repa.training import train
train(load_config({cfg!r}, json.loads(sys.argv[1])))
"""


@pytest.mark.slow
def test_two_real_trainings_in_one_run_dir(tmp_path, fmnist_root):
    """The issue's case: a second `repa train` on a running one's folder is refused (before it could prune the
    first one's checkpoints or append to its log); the first finishes intact."""
    script = tmp_path / "train.py"
    script.write_text(_SLOW_TRAINING.format(root=str(ROOT), cfg=str(TINY)))
    run = tmp_path / "run"
    over = tiny_overrides(run, fmnist_root, "train.max_steps=40", "train.checkpoint_every=2", "train.num_threads=1")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen([sys.executable, str(script), json.dumps(over)], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (run / "metrics.jsonl").exists() and time.monotonic() < deadline and first.poll() is None:
            time.sleep(0.05)
        second = subprocess.run([sys.executable, "-m", "repa", "train", str(TINY), *over], env=env,
                                capture_output=True, text=True, timeout=300)  # fmt: skip
        assert first.poll() is None, "the first training ended before the second started: the test proves nothing"
        assert second.returncode == 20, second.stderr[-3000:]
        assert f"repa train: error: run directory {run} is in use: pid {first.pid} on host" in second.stderr
        assert first.wait(timeout=300) == 0, first.stderr.read()[-3000:]
    finally:
        first.kill()
    assert [r["step"] for r in metrics(run)] == list(range(1, 41))  # logged once each
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == ["step_00000038", "step_00000040"]
