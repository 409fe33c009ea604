"""Smoke tests of the training-step benchmarks at tiny size: structure and sanity of the numbers, no timings."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from benchmarks import gpu_step, step
from benchmarks.harness import (
    BASE_MODES,
    PHASES,
    BenchConfig,
    StepRunner,
    encoder_forward_flops,
    parse_mode,
)

from repa.cli.main import main as cli_main

TINY = BenchConfig(model="SiT-T/2", batch=2, threads=None, **step.TINY)
COLUMNS = [*step.TABLE_COLUMNS, "peak RSS GB", "steady GB", "GFLOP/step", "GEMM GFLOP/s", "MFU"]


def _positive_finite(x: float) -> bool:
    return math.isfinite(x) and x > 0


def test_parse_mode_applies_modifiers_and_rejects_typos():
    m = parse_mode("ours-cached+compile+foreach-adamw")
    assert (m.targets, m.compile, m.optimizer, m.ema, m.sync) == ("cached", True, "foreach", "foreach", False)
    official = parse_mode("official-like")
    assert (official.optimizer, official.ema, official.sync, official.targets) == ("loop", "loop", True, "online")
    with pytest.raises(ValueError, match="unknown mode"):
        parse_mode("ours-cahced")
    with pytest.raises(ValueError, match="modifier"):
        parse_mode("ours-cached+compiled")


def test_encoder_flops_match_the_flop_counter():
    from benchmarks.harness import _build_encoder
    from torch.utils.flop_counter import FlopCounterMode

    enc = _build_encoder(TINY)
    with FlopCounterMode(display=False) as counter:
        enc(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    cfg = enc.model.config
    n = enc.num_tokens + enc.num_prefix
    attention = 2 * cfg.num_hidden_layers * 2 * n * n * cfg.hidden_size
    ours = encoder_forward_flops(enc, 1)
    assert counter.get_total_flops() in (ours, ours - attention)  # the CPU SDPA kernel may not be counted


def _train_two_steps(names: list[str]) -> list[StepRunner]:
    runs = [StepRunner(TINY, parse_mode(name)) for name in names]
    for r in runs:
        for _ in range(2):
            r.step()
        rows = r.timer.collect()
        assert len(rows) == 2 and all(_positive_finite(row["wall"]["total"]) for row in rows)
        assert set(rows[0]["wall"]) == {*PHASES, "total"}
    return runs


def _assert_same_training(a: StepRunner, b: StepRunner) -> None:
    assert a.final_loss() == pytest.approx(b.final_loss(), rel=1e-4)
    params_a = [*a.model.parameters(), *a.ema.model.parameters()]
    params_b = [*b.model.parameters(), *b.ema.model.parameters()]
    for pa, pb in zip(params_a, params_b):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-6)


def test_modes_share_the_maths():
    """Official-like (loop AdamW, loop EMA, no_grad encoder, `.item()` logging) and ours (fused AdamW, foreach EMA,
    inference-mode encoder, no host sync) train to the same weights and EMA."""
    a, b = _train_two_steps(["official-like", "ours-online+eager"])
    _assert_same_training(a, b)
    assert a.step_flops == b.step_flops > b.model_flops > 0


@pytest.mark.slow
def test_compiled_mode_shares_the_maths():
    """torch.compile with the 0.5 activation budget (recomputation in the backward) changes no result."""
    _assert_same_training(*_train_two_steps(["ours-online+eager", "ours-online+budget50"]))


def test_vanilla_and_cached_modes_run_no_encoder():
    for name in ("vanilla+eager", "ours-cached+eager"):
        r = StepRunner(TINY, parse_mode(name))
        r.step()
        assert r.encoder is None and r.encoder_flops == 0
        assert "encoder" in r.timer.collect()[0]["wall"]  # the phase is reported (its time is not asserted)
    assert not StepRunner(TINY, parse_mode("vanilla+eager")).model.projectors
    assert BASE_MODES["ours-cached"].compile and not BASE_MODES["official-like"].compile


@pytest.mark.slow
def test_step_suite_tiny_table_and_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    modes = "official-like,ours-online+eager,ours-cached+eager,vanilla+eager"  # eager: no compile time in tests
    rc = cli_main(["bench", "step", "--tiny", "--models", "SiT-T/2", "--modes", modes, "--steps", "2",
                   "--warmup", "1", "--batch", "2", "--json", str(out)])  # fmt: skip
    assert rc == 0
    text = capsys.readouterr().out
    tables = [block for block in text.split("\n\n") if block.startswith("| mode |")]
    assert len(tables) == 1
    lines = tables[0].strip().splitlines()
    assert [c.strip() for c in lines[0].strip("|").split("|")] == COLUMNS
    assert [ln.split("|")[1].strip() for ln in lines[2:]] == modes.split(",")
    for ln in lines[2:]:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        assert len(cells) == len(COLUMNS)
        numbers = [float(c.rstrip("%")) for c in cells[1:]]
        assert all(math.isfinite(x) and x >= 0 for x in numbers) and numbers[0] > 0 and numbers[1] > 0
    record = json.loads(out.read_text())
    rows = record["results"]["SiT-T/2"]["modes"]
    assert [r["mode"] for r in rows] == modes.split(",")
    for r in rows:
        assert r["steps"] == 2 and _positive_finite(r["peak_memory_bytes"]) and math.isfinite(r["final_loss"])
        for clock in ("wall", "cpu"):
            c = r[clock]
            for key in ("step_s", "images_per_s", "best_step_s", "gemm_flops_per_s", "achieved_flops_per_s", "mfu"):
                assert _positive_finite(c[key]), (r["mode"], clock, key)
            assert all(math.isfinite(v) and v >= 0 for v in c["phases_s"].values())
            if r["settings"]["targets"] == "online":  # other modes time an empty phase (clock overhead only)
                assert c["phases_s"]["encoder"] > 0
        assert (r["encoder_flops"] > 0) == (r["settings"]["targets"] == "online")
    assert rows[0]["wall"]["speedup_vs_reference"] == 1.0 and rows[0]["memory_vs_reference"] == 1.0


def test_gpu_script_runs_on_cpu_at_tiny_size(tmp_path, capsys):
    out = tmp_path / "gpu.json"
    rc = gpu_step.main(["--device", "cpu", "--tiny", "--models", "SiT-T/2", "--modes", "official-like,ours-cached+eager",
                        "--steps", "2", "--warmup", "1", "--json", str(out)])  # fmt: skip
    assert rc == 0
    assert "| official-like |" in capsys.readouterr().out
    rows = json.loads(out.read_text())["results"]["SiT-T/2"]["modes"]
    assert [r["mode"] for r in rows] == ["official-like", "ours-cached+eager"]
    assert all(_positive_finite(r["wall"]["step_s"]) and _positive_finite(r["wall"]["mfu"]) for r in rows)
    with pytest.raises(SystemExit) as exit_info:
        gpu_step.main(["--help"])
    assert exit_info.value.code == 0


def test_micro_benchmarks_print_one_row_per_implementation(capsys):
    from benchmarks import micro

    assert micro.main(["--model", "SiT-T/8", "--reps", "1", "--threads", "1"]) == 0
    rows = [line.split("|")[1:3] for line in capsys.readouterr().out.splitlines()[2:]]
    names = {name.strip() for name, _ in rows}
    assert {"adamw-loop", "adamw-foreach", "adamw-fused", "ema-loop", "ema-foreach", "sdpa-flash", "sdpa-math"} <= names
    assert all(_positive_finite(float(value)) for _, value in rows)


def test_step_suite_both_precisions_in_one_run(tmp_path, capsys):
    """`--precision fp32,bf16`: every mode in both precisions, each compared with official-like of its own."""
    assert parse_mode("ours-cached+bf16").precision == "bf16" and parse_mode("ours-cached").precision is None
    assert StepRunner(TINY, parse_mode("vanilla+eager+bf16")).cfg.precision == "bf16"
    out = tmp_path / "bench.json"
    rc = cli_main(["bench", "step", "--tiny", "--models", "SiT-T/2", "--modes", "official-like,vanilla+eager",
                   "--precision", "fp32,bf16", "--steps", "1", "--warmup", "0", "--batch", "2", "--gemm-reps", "1",
                   "--json", str(out)])  # fmt: skip
    assert rc == 0
    record = json.loads(out.read_text())
    assert record["meta"]["cpu_bf16"]
    rows = record["results"]["SiT-T/2"]["modes"]
    assert [r["mode"] for r in rows] == ["official-like", "vanilla+eager", "official-like+bf16", "vanilla+eager+bf16"]
    assert [r["reference"] for r in rows] == ["official-like"] * 2 + ["official-like+bf16"] * 2
    assert rows[0]["wall"]["speedup_vs_reference"] == 1.0 == rows[2]["wall"]["speedup_vs_reference"]
    assert [r["settings"]["precision"] for r in rows] == [None, None, "bf16", "bf16"]
    assert cli_main(["bench", "step", "--tiny", "--precision", "fp16", "--json", ""]) != 0
    assert "--precision 'fp16': expected fp32, bf16 or fp32,bf16" in capsys.readouterr().err


def test_the_guard_benchmark_times_both_update_paths_on_a_preset():
    from benchmarks import micro

    res = micro.guard_cost(str(Path(__file__).parents[1] / "configs" / "tiny.yaml"), reps=1, block=1)
    assert {"step with optimizer.step()", "update phase: UpdateGuard.step()"} <= res.keys()
    assert all(v > 0 for k, v in res.items() if not k.startswith("guard"))
    # the guard's phase includes the optimizer step and its finiteness pass
    overhead = res["update phase: UpdateGuard.step()"] - res["update phase: optimizer.step()"]
    assert res["guard overhead (extra update time / step)"] == pytest.approx(
        overhead / res["step with optimizer.step()"]
    )


def test_the_loop_benchmark_reads_the_median_of_windows_after_the_first(tmp_path):
    from benchmarks.loop import speed

    rows = [{"step": 25 * i, "images_per_s": v} for i, v in enumerate([5.0, 40.0, 42.0, 38.0], start=1)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert speed(tmp_path) == 40.0  # the first (warm-up) window is left out
