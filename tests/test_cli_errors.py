"""The `repa` command reports every documented user-facing fault in one or two lines with a distinct exit code;
`--debug` / `REPA_DEBUG=1` show the traceback, and a bug always keeps its own."""

from __future__ import annotations

import errno
import gzip
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from repa import errors
from repa.assets import AssetError
from repa.checkpoint import CheckpointError
from repa.cli.main import main
from repa.config import ConfigError
from repa.data.fashion_mnist import IDXFormatError
from repa.data.features import TargetCacheMismatch
from repa.data.folder import CorruptImageError
from repa.data.shards import ShardError
from repa.encoders.registry import EncoderWeightsError
from repa.training.loop import NonFiniteError
from tests.helpers.tiny import tiny_overrides

ROOT = Path(__file__).parents[1]
TINY = ROOT / "configs" / "tiny.yaml"

pytestmark = pytest.mark.usefixtures("isolated_cache")


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
    monkeypatch.delenv("REPA_DEBUG", raising=False)


def _err_lines(capsys) -> list[str]:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return err.splitlines()


def _raise_from_train(monkeypatch, err: BaseException) -> None:
    """`repa train CONFIG` loads the config for real, then the training itself raises `err`."""

    def train(cfg):
        raise err

    monkeypatch.setattr("repa.training.train", train)


# ---------------------------------------------------------------------------------------- the exit-code table


FAULTS = [
    (CheckpointError("could not read checkpoint runs/x/checkpoints/step_00000010: truncated"), 4),
    (NonFiniteError("11 steps had non-finite loss or gradients; stopped at step 40 with a checkpoint in runs/x"), 5),
    (ShardError("shard file /d/shard_00000.safetensors is truncated"), 6),
    (CorruptImageError("/d/cat/1.png", "file is empty (0 bytes)"), 7),
    (IDXFormatError("/d/train-images-idx3-ubyte.gz: 2 bytes is shorter than an IDX header"), 8),
    (TargetCacheMismatch("target cache /c/t.safetensors does not match (layer); delete it or rebuild"), 9),
    (EncoderWeightsError("dinov2-vit-b: weights not found; pass repa.encoder_weights"), 10),
    (AssetError("`pip download --no-deps x` failed; put the wheel in /c/wheels"), 11),
    (ConfigError("optim.eps must be > 0"), 2),
    (ValueError("data.kind=folder needs data.root"), 2),
    (KeyError("no such stat 'mu'"), 2),
    (FileNotFoundError("/d/ref.npz does not exist"), 2),
    (yaml.YAMLError("bad\n  YAML"), 2),
    (OSError(errno.ENOSPC, "No space left on device", "/runs/x/metrics.jsonl"), 12),
    (OSError(errno.EROFS, "Read-only file system", "/runs/x/samples/step_1.png"), 12),
    (PermissionError(errno.EACCES, "Permission denied", "/runs/x"), 12),
    (OSError(errno.EDQUOT, "Disk quota exceeded", "/runs/x/config.yaml"), 12),
    (ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"), 13),
]


@pytest.mark.parametrize("err, code", FAULTS, ids=[f"{type(e).__name__}-{c}" for e, c in FAULTS])
def test_each_documented_fault_is_one_line_with_its_exit_code(err, code, monkeypatch, capsys):
    _raise_from_train(monkeypatch, err)
    assert main(["train", str(TINY)]) == code
    lines = _err_lines(capsys)
    assert len(lines) == 1 and lines[0].startswith("repa train: error: "), lines


def test_the_exit_codes_are_distinct():
    codes = [c for e, c in FAULTS if isinstance(e, errors.ReportedError) and not isinstance(e, ConfigError)]
    codes += [errors.EXIT_USAGE, errors.EXIT_DISK, errors.EXIT_OS, errors.EXIT_INTERRUPTED, 1]
    assert len(codes) == len(set(codes)), codes


def test_disk_faults_name_the_file_the_reason_and_what_to_do(monkeypatch, capsys):
    _raise_from_train(monkeypatch, OSError(errno.ENOSPC, "No space left on device", "/runs/x/metrics.jsonl"))
    assert main(["train", str(TINY)]) == errors.EXIT_DISK
    (line,) = _err_lines(capsys)
    assert "/runs/x/metrics.jsonl: no space left on device; free some space, then rerun the same command" in line
    _raise_from_train(monkeypatch, OSError(errno.EROFS, "Read-only file system", "/mnt/ro/run"))
    assert main(["train", str(TINY)]) == errors.EXIT_DISK
    assert "/mnt/ro/run: read-only file system; choose a writable location" in _err_lines(capsys)[0]


def test_any_reported_error_subclass_is_handled_with_its_own_code(monkeypatch, capsys):
    class RunDirLocked(errors.ReportedError, RuntimeError):  # what another module may add later
        exit_code = 42

    class Plain(errors.ReportedError):
        pass

    _raise_from_train(monkeypatch, RunDirLocked("runs/x is used by process 123; wait for it or kill it"))
    assert main(["train", str(TINY)]) == 42
    assert _err_lines(capsys) == ["repa train: error: runs/x is used by process 123; wait for it or kill it"]
    _raise_from_train(monkeypatch, Plain("something documented"))
    assert main(["train", str(TINY)]) == Plain.exit_code == 3


def test_a_long_message_is_cut_to_two_lines(monkeypatch, capsys):
    _raise_from_train(monkeypatch, CheckpointError("first\nsecond\nthird\nfourth"))
    assert main(["train", str(TINY)]) == 4
    lines = _err_lines(capsys)
    assert len(lines) == 2 and lines[0] == "repa train: error: first" and "2 more lines: --debug" in lines[1]


def test_ctrl_c_is_one_line_and_130(monkeypatch, capsys):
    _raise_from_train(monkeypatch, KeyboardInterrupt())
    assert main(["train", str(TINY)]) == 130
    assert _err_lines(capsys) == [
        "repa train: interrupted; rerun the same command to resume from the newest checkpoint"
    ]


@pytest.mark.parametrize("bug", [TypeError("unsupported operand"), AttributeError("x"), ZeroDivisionError()])
def test_a_bug_keeps_its_traceback(bug, monkeypatch):
    _raise_from_train(monkeypatch, bug)
    with pytest.raises(type(bug)):
        main(["train", str(TINY)])


@pytest.mark.parametrize(
    "argv",
    [
        ["--debug", "train", str(TINY)],
        ["train", str(TINY), "--debug"],
        ["train", "--debug", str(TINY), "train.max_steps=3"],
    ],
)
def test_debug_flag_reraises(argv, monkeypatch):
    _raise_from_train(monkeypatch, NonFiniteError("stopped"))
    with pytest.raises(NonFiniteError):
        main(argv)


@pytest.mark.parametrize("value, raises", [("1", True), ("yes", True), ("0", False), ("", False)])
def test_repa_debug_environment_variable(value, raises, monkeypatch, capsys):
    monkeypatch.setenv("REPA_DEBUG", value)
    _raise_from_train(monkeypatch, CheckpointError("damaged"))
    if raises:
        with pytest.raises(CheckpointError):
            main(["train", str(TINY)])
    else:
        assert main(["train", str(TINY)]) == 4


def test_nested_commands_accept_debug(tmp_path, capsys):
    argv = ["eval", "generate", str(tmp_path / "run"), "--ref", str(tmp_path / "ref.npz")]
    assert main(argv) == 2
    assert _err_lines(capsys)[0].startswith(f"repa eval: error: reference {tmp_path / 'ref.npz'} does not exist")
    with pytest.raises(FileNotFoundError):
        main([*argv, "--debug"])


# ------------------------------------------------------------------------------------------ real triggers


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["optim.eps=0"], "optim.eps"),
        (["optim.lr=nan"], "optim.lr"),
        (["model.num_heads=0"], "model.num_heads"),
        (["model.projector_dim=0"], "model.projector_dim"),
        (["train.fsdp=true", "train.mixed_precision=fp16"], "train.fsdp=true does not support fp16"),
    ],
)
def test_bad_config_values_are_one_line_naming_the_key(overrides, key, tmp_path, fmnist_root, capsys):
    cheap = tiny_overrides(tmp_path / "run", fmnist_root, "repa.encoders=[]", "train.max_steps=1")  # if it ran
    assert main(["train", str(TINY), *cheap, *overrides]) == 2
    (line,) = _err_lines(capsys)
    assert line.startswith("repa train: error: ") and key in line


def test_broken_preset_files_are_one_line_naming_the_file(tmp_path, capsys):
    files = {
        "latin1.yaml": b"train:\n  run_dir: caf\xe9\n",
        "syntax.yaml": b"train: [1\n",
        "self.yaml": b"base: self.yaml\n",
        "tag.yaml": b"train: !!python/object/apply:os.system ['true']\n",
    }
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
        assert main(["train", str(tmp_path / name)]) == 2, name
        (line,) = _err_lines(capsys)
        assert line.startswith(f"repa train: error: {tmp_path / name}"), line


def test_damaged_fashion_mnist_files_stop_training_in_one_line(tmp_path, capsys):
    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):
        with gzip.open(tmp_path / f"{stem}.gz", "wb") as f:
            f.write(b"xx")
    over = tiny_overrides(tmp_path / "run", tmp_path, "repa.encoders=[]")
    assert main(["train", str(TINY), *over]) == IDXFormatError.exit_code == 8
    (line,) = _err_lines(capsys)
    assert "train-images-idx3-ubyte.gz" in line


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_full_disk_during_training_is_one_line(tmp_path, fmnist_root, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").symlink_to("/dev/full")  # every write fails with ENOSPC
    over = tiny_overrides(run, fmnist_root, "repa.encoders=[]", "train.max_steps=2")
    assert main(["train", str(TINY), *over]) == errors.EXIT_DISK
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("repa train:")]
    assert "metrics.jsonl: no space left on device" in line and "rerun the same command to resume" in line


# -------------------------------------------------------------------------------------- real subprocesses


def _repa(*args: str, cwd: Path, repa_debug: str | None = None) -> subprocess.CompletedProcess:
    """`python -m repa ARGS` in a fresh process."""
    env = {k: v for k, v in os.environ.items() if k != "REPA_DEBUG"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH")) if p)
    if repa_debug is not None:
        env["REPA_DEBUG"] = repa_debug
    return subprocess.run([sys.executable, "-m", "repa", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip


def test_subprocess_refused_yaml_tag_exit_code_and_debug(tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / "evil.yaml").write_text(f"train: !!python/object/apply:os.system ['touch {marker}']\n")
    res = _repa("train", "evil.yaml", cwd=tmp_path)
    assert res.returncode == 2 and res.stdout == ""
    assert "Traceback" not in res.stderr and len(res.stderr.splitlines()) == 1, res.stderr
    assert res.stderr.startswith("repa train: error: evil.yaml: refused YAML at line 1")
    for debug in (["--debug", "train", "evil.yaml"], ["train", "evil.yaml", "--debug"]):
        res = _repa(*debug, cwd=tmp_path)
        assert res.returncode == 1 and "Traceback (most recent call last)" in res.stderr
        assert "ConfigError" in res.stderr
    res = _repa("train", "evil.yaml", cwd=tmp_path, repa_debug="1")
    assert res.returncode == 1 and "Traceback (most recent call last)" in res.stderr
    assert not marker.exists()


def test_subprocess_damaged_checkpoint_exit_code(tmp_path):
    step = tmp_path / "run" / "checkpoints" / "step_00000001"
    step.mkdir(parents=True)
    (step / "state.json").write_text('{"step": 1')
    (step / "model.safetensors").write_bytes(b"garbage")
    res = _repa("sample", "run", cwd=tmp_path)
    assert res.returncode == CheckpointError.exit_code == 4, res.stderr
    assert "Traceback" not in res.stderr and 1 <= len(res.stderr.splitlines()) <= 2, res.stderr
    assert res.stderr.startswith("repa sample: error: could not read checkpoint run/checkpoints/step_00000001")
