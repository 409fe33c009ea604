"""`train.fsdp`: FSDP2 (fully_shard) on 2 gloo CPU processes gives the weights DDP gives, bit for bit (gradient
clipping inactive; with clipping active the sharded norm is summed in another order: a few float32 ulps), one process
gives the plain loop's weights bit for bit, a killed and resumed FSDP run equals an uninterrupted one bit for bit, and
its checkpoints are the ordinary full files (`repa sample` reads them)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from repa.checkpoint import latest_checkpoint, load_checkpoint
from repa.cli.main import main as cli_main
from repa.config import ConfigError, load_config
from repa.training import train
from tests.helpers.tiny import launch_training, metrics, tiny_overrides
from tests.test_faults import assert_same_checkpoints

ROOT = Path(__file__).parents[1]
# the REPA family's extra model calls go through the sharded model too: SRA's EMA teacher (`forward_hidden` on the
# sharded EMA) and REG's class token (`velocity_joint` in the sample grid)
FAMILY = ["repa.self_align=true", "repa.self_align_blocks=[1,2]", "repa.class_token=true"]
# accumulation: the gradient sync is held back once per step; no clipping: an active clip scales the gradients by
# max_norm / norm, and the sharded norm is summed in another order (measured: weights within 3e-8 after 4 steps)
STEPS = ["train.max_steps=4", "train.grad_accum_steps=2", "optim.grad_clip=0"]

pytestmark = pytest.mark.usefixtures("isolated_cache")


def _final(run: Path) -> dict:
    return load_checkpoint(latest_checkpoint(run / "checkpoints"))


def _losses(run: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("images_per_s", "peak_memory_gb", "grad_norm")}
            for r in metrics(run)]  # fmt: skip


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory, fmnist_root) -> Path:
    """4 steps of SRA + REG on 2 FSDP processes (the reference of the tests below)."""
    tmp = tmp_path_factory.mktemp("fsdp")
    run = tmp / "fsdp"
    launch_training(tmp, 2, tiny_overrides(run, fmnist_root, *STEPS, *FAMILY, "train.fsdp=true"))
    return run


@pytest.mark.multiproc
def test_fsdp_on_two_processes_gives_ddp_weights_bit_for_bit(tmp_path, fmnist_root, fsdp_run):
    ddp = tmp_path / "ddp"
    launch_training(tmp_path, 2, tiny_overrides(ddp, fmnist_root, *STEPS, *FAMILY))
    assert_same_checkpoints(fsdp_run, ddp)
    assert _losses(fsdp_run) == _losses(ddp)
    # the gradient norm sums the shards' norms: equal up to float32 rounding
    for a, b in zip(metrics(fsdp_run), metrics(ddp)):
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-6)
    assert (fsdp_run / "samples" / "step_00000004.png").exists()  # sampled by every rank, written by rank 0


@pytest.mark.multiproc
def test_fsdp_resume_equals_uninterrupted(tmp_path, fmnist_root, fsdp_run):
    run = tmp_path / "resumed"
    launch_training(tmp_path, 2, tiny_overrides(run, fmnist_root, *STEPS, *FAMILY, "train.fsdp=true",
                                                "train.max_steps=2"))  # fmt: skip
    out = launch_training(tmp_path, 2, tiny_overrides(run, fmnist_root, *STEPS, *FAMILY, "train.fsdp=true"))
    assert "resuming from" in out and "returned a view tensor" not in out
    assert_same_checkpoints(run, fsdp_run)
    assert _losses(run) == _losses(fsdp_run)


@pytest.mark.multiproc
def test_fsdp_checkpoints_are_the_ordinary_files(tmp_path, fmnist_root, fsdp_run):
    """Full tensors under the unsharded names: a 1-process resume without FSDP and `repa sample` read them."""
    ck = _final(fsdp_run)
    assert ck["model"]["blocks.0.attn.qkv.weight"].shape == (3 * 32, 32)  # full, not a shard
    assert not any("_fsdp" in k or "_orig_mod" in k for k in ck["model"])
    out = tmp_path / "samples"
    assert cli_main(["sample", str(fsdp_run), "--num", "4", "--steps", "2", "--out", str(out)]) == 0
    x = np.load(next(out.glob("*.npz")), allow_pickle=False)["arr_0"]
    assert x.shape == (4, 28, 28, 3) and x.dtype == np.uint8


def test_fsdp_on_one_process_equals_the_plain_loop_bit_for_bit(tmp_path, fmnist_root, test_encoder):
    """World size 1 (a private process group, destroyed afterwards): sharding over one rank changes nothing, with
    the gradient clipped at every step."""
    runs = {}
    for name, extra in (("plain", ["optim.grad_clip=0.05"]), ("fsdp", ["optim.grad_clip=0.05", "train.fsdp=true"])):
        runs[name] = tmp_path / name
        train(load_config(ROOT / "configs/tiny.yaml", tiny_overrides(runs[name], fmnist_root, *STEPS, *extra)))
        assert not dist.is_initialized()
    assert_same_checkpoints(runs["fsdp"], runs["plain"])
    assert metrics(runs["fsdp"])[-1]["grad_norm"] == pytest.approx(metrics(runs["plain"])[-1]["grad_norm"], rel=1e-6)
    # the same files either way: a plain run resumed with FSDP on (a harmless config change) ends where both end
    switched = tmp_path / "switched"
    clip = "optim.grad_clip=0.05"
    train(
        load_config(
            ROOT / "configs/tiny.yaml", tiny_overrides(switched, fmnist_root, *STEPS, clip, "train.max_steps=2")
        )
    )
    train(
        load_config(ROOT / "configs/tiny.yaml", tiny_overrides(switched, fmnist_root, *STEPS, clip, "train.fsdp=true"))
    )
    assert_same_checkpoints(switched, runs["plain"])


def test_fsdp_refuses_what_it_does_not_support(tmp_path, fmnist_root):
    with pytest.raises(ConfigError, match="train.fsdp=true does not support fp16"):
        load_config(ROOT / "configs/tiny.yaml", tiny_overrides(tmp_path, fmnist_root, "train.fsdp=true",
                                                               "train.mixed_precision=fp16"))  # fmt: skip


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fsdp_world_size_one_on_the_gpu(tmp_path, fmnist_root, test_encoder):
    """The same contract on one GPU (NCCL group of one): equal to the plain loop up to CUDA's float rounding."""
    runs = {}
    for name, extra in (("plain", []), ("fsdp", ["train.fsdp=true"])):
        runs[name] = tmp_path / name
        train(load_config(ROOT / "configs/tiny.yaml", tiny_overrides(runs[name], fmnist_root, *STEPS, *extra)))
    a, b = _final(runs["fsdp"]), _final(runs["plain"])
    for name in b["ema"]:
        torch.testing.assert_close(a["ema"][name], b["ema"][name], rtol=1e-5, atol=1e-6)
