"""Training-step benchmark: official-like vs our step modes, interleaved, as a markdown table and JSON.

    python -m benchmarks.step --models SiT-S/2,SiT-B/2 --steps 10 --json bench-step.json
    repa bench step --models SiT-S/2 --steps 3          # the same, through the CLI

Every mode runs in its own worker process (so each has its own peak RSS); with the interleaved schedule all
workers stay alive and the parent runs one step of each mode per round, in rotating order, so load from other
processes hits every mode alike. After every measured step the worker also times a GEMM of the model's dominant
shape; MFU = (step FLOPs / step time) / that GEMM rate. On the CPU each time is given on two clocks: wall and
the main thread's CPU time (the latter barely moves when other jobs share the cores).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchmarks.common import temporary_environ
from benchmarks.harness import PHASE_HELP, PHASES, BenchConfig, median_phases, parse_mode
from repa.fileio import write_json
from repa.hardware import cpu_bf16

DEFAULT_MODES = "official-like,ours-online,ours-cached,vanilla"
TINY = dict(
    model_overrides={"input_size": 8, "projector_dim": 64},
    encoder="dinov2-vit-s",
    encoder_overrides={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2},
    encoder_resolution=56,
    image_size=32,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `repa bench step` / `python -m benchmarks.step`."""
    p.add_argument("--models", default="SiT-S/2,SiT-B/2", help="comma-separated MODELS names")
    p.add_argument("--modes", default=DEFAULT_MODES,
                   help="comma-separated modes: official-like, ours-online, ours-cached, vanilla, official-vanilla; "
                        "'+modifier' suffixes, e.g. ours-cached+compile (see benchmarks/README.md)")  # fmt: skip
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=10, help="measured steps per mode (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured steps per mode first (compilation, caches)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in each worker")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32",
                   help="fp32, bf16 (autocast) or fp32,bf16: every mode in each precision, interleaved in one run "
                        "(speed-ups against official-like of the same precision)")  # fmt: skip
    p.add_argument("--encoder", default="dinov2-vit-b", help="ENCODERS name (random weights of the architecture)")
    p.add_argument("--encoder-resolution", type=int, default=224)
    p.add_argument("--schedule", choices=["auto", "interleaved", "sequential"], default="auto",
                   help="interleaved: all workers alive, one step each per round; sequential: one mode at a time "
                        "(less memory); auto: interleaved when the estimated memory fits")  # fmt: skip
    p.add_argument("--gemm-reps", type=int, default=3, help="GEMM timings per measured step")
    p.add_argument("--tiny", action="store_true", help="tiny shapes for smoke tests (model 4x8x8, 2-layer encoder)")
    p.add_argument("--json", default="bench-step.json", help="where to write the results ('' for none)")


def run(args: argparse.Namespace) -> int:
    """Run the suite for every model; print a markdown table per model and write the JSON record."""
    if args.steps < 1 or args.warmup < 0 or args.batch < 1:
        raise ValueError("--steps and --batch must be >= 1 and --warmup >= 0")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    precisions = [p.strip() for p in str(args.precision).split(",") if p.strip()]
    if not precisions or any(p not in ("fp32", "bf16") for p in precisions):
        raise ValueError(f"--precision {args.precision!r}: expected fp32, bf16 or fp32,bf16")
    if len(precisions) > 1:  # the first precision is the run's; the others become +<precision> modes
        modes = [m if p == precisions[0] else f"{m}+{p}" for p in precisions for m in modes]
    for m in modes:
        parse_mode(m)  # fail fast on typos
    record: dict[str, Any] = {"meta": _meta(args), "results": {}}
    for model in [m.strip() for m in args.models.split(",") if m.strip()]:
        kwargs = dict(encoder=args.encoder, encoder_resolution=args.encoder_resolution) | (TINY if args.tiny else {})
        cfg = BenchConfig(model=model, batch=args.batch, device=args.device, precision=precisions[0],  # type: ignore[arg-type]
                          threads=args.threads, **kwargs)  # fmt: skip
        schedule = _choose_schedule(args.schedule, cfg, modes)
        print(f"[bench] {model}: batch {cfg.batch}, {cfg.precision}, {args.threads} threads, {len(modes)} modes, "
              f"{args.warmup} warm-up + {args.steps} measured steps each, {schedule} schedule", flush=True)  # fmt: skip
        raw = measure(cfg, modes, args.steps, args.warmup, schedule, args.gemm_reps)
        rows = [summarize(name, r, cfg.batch) for name, r in raw.items()]
        add_ratios(rows)
        record["results"][model] = {"config": dataclasses.asdict(cfg), "schedule": schedule, "modes": rows}
        print(f"\n### {model}, batch {cfg.batch}, {cfg.precision}, {args.threads} threads, {len(rows[0]['wall']['per_step'])} "
              f"steps ({schedule}); wall clock, speed-ups vs {rows[0]['reference']}\n")  # fmt: skip
        print(markdown_table(rows, "wall", "peak RSS GB" if cfg.device == "cpu" else "peak CUDA GB"))
        print(flush=True)
    record["meta"]["loadavg_end"] = _loadavg()
    record["meta"]["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    if args.json:
        write_json(record, args.json, indent=1)
        print(f"[bench] wrote {args.json}")
    return 0


# ---------------------------------------------------------------- measurement


class _Worker:
    """Handle on one mode's worker process."""

    def __init__(self, ctx: Any, cfg: BenchConfig, mode: str, gemm_reps: int) -> None:
        from benchmarks.harness import worker_main

        self.mode = mode
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=worker_main, args=(child, dataclasses.asdict(cfg), mode, gemm_reps),
                                daemon=True, name=f"bench-{mode}")  # fmt: skip
        with temporary_environ(parse_mode(mode).environment()):  # a spawned child starts with the parent's environment
            self.proc.start()
        child.close()

    def recv(self) -> Any:
        try:
            status, payload = self.conn.recv()
        except EOFError:
            self.proc.join(timeout=5)
            raise RuntimeError(f"the worker of mode {self.mode!r} died (exit code {self.proc.exitcode}); if it ran "
                               "out of memory, rerun with --schedule sequential") from None  # fmt: skip
        if status == "error":
            raise RuntimeError(f"mode {self.mode!r} failed in its worker:\n{payload}")
        return payload

    def run(self, steps: int, gemm: bool) -> dict[str, Any]:
        self.conn.send(("run", steps, gemm))
        return self.recv()

    def finish(self) -> dict[str, Any]:
        self.conn.send(("finish",))
        out = self.recv()
        self.proc.join(timeout=60)
        return out


def measure(
    cfg: BenchConfig,
    modes: list[str],
    steps: int,
    warmup: int,
    schedule: str,
    gemm_reps: int = 3,
) -> dict[str, dict[str, Any]]:
    """Raw measurements per mode: describe() facts, per-step rows, per-step GEMM rates, peak memory, final loss."""
    ctx = multiprocessing.get_context("spawn")
    chunk = steps if cfg.device.startswith("cuda") else 1  # GPU: no sync between measured steps
    out: dict[str, dict[str, Any]] = {}
    groups = [modes] if schedule == "interleaved" else [[m] for m in modes]
    for group in groups:
        workers = [_Worker(ctx, cfg, m, gemm_reps) for m in group]
        try:
            for w in workers:
                out[w.mode] = {"describe": w.recv(), "rows": [], "gemm": []}
            rounds = warmup + (steps + chunk - 1) // chunk
            for rnd in range(rounds):
                k, record = rnd % len(workers), rnd >= warmup
                for w in workers[k:] + workers[:k]:  # rotate the order so no mode always follows another
                    res = w.run(chunk if record else 1, gemm=record)
                    if record:
                        out[w.mode]["rows"] += res["rows"]
                        out[w.mode]["gemm"].append(res["gemm"])
                last = ", ".join(f"{w.mode} {out[w.mode]['rows'][-1]['wall']['total']:.2f}s"
                                 for w in workers if out[w.mode]["rows"])  # fmt: skip
                print(f"[bench]   round {rnd + 1}/{rounds} ({'measured' if record else 'warm-up'})"
                      + (f": {last}" if record else ""), flush=True)  # fmt: skip
            for w in workers:
                out[w.mode].update(w.finish())
        finally:
            for w in workers:
                if w.proc.is_alive():
                    w.proc.terminate()
    return out


def summarize(name: str, raw: dict[str, Any], batch: int) -> dict[str, Any]:
    """Per clock: median and best step (with its phases), images/s, GEMM rate, MFU; peak memory and FLOPs.

    `mfu` = (step FLOPs / best step time) / best GEMM rate: both taken at the machine's least loaded moments;
    `mfu_median` uses the medians of both instead.
    """
    d = raw["describe"]
    row: dict[str, Any] = {"mode": name, **{k: d[k] for k in d if k != "mode"}, "settings": d["mode"],
                           "steps": len(raw["rows"]), "peak_memory_bytes": raw["peak_memory_bytes"],
                           "steady_peak_memory_bytes": raw.get("steady_peak_memory_bytes"),
                           "final_loss": raw["final_loss"]}  # fmt: skip
    for clock in raw["rows"][0]:
        per_step = [r[clock] for r in raw["rows"]]
        med = median_phases(per_step)
        best = min(per_step, key=lambda r: r["total"])
        gemms = [g[clock] for g in raw["gemm"]]
        row[clock] = {
            "step_s": med["total"], "images_per_s": batch / med["total"], "phases_s": {k: med[k] for k in PHASES},
            "best_step_s": best["total"], "best_images_per_s": batch / best["total"],
            "best_phases_s": {k: best.get(k, 0.0) for k in PHASES},
            "gemm_flops_per_s": max(gemms), "gemm_flops_per_s_median": statistics.median(gemms),
            "achieved_flops_per_s": d["step_flops"] / best["total"],
            "mfu": d["step_flops"] / best["total"] / max(gemms),
            "mfu_median": d["step_flops"] / med["total"] / statistics.median(gemms),
            "per_step": per_step,
        }  # fmt: skip
    return row


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Images/s (median and best) and peak memory relative to the official-like mode of the same precision (or the
    first mode of that precision)."""
    for r in rows:
        same = [q for q in rows if q["settings"].get("precision") == r["settings"].get("precision")]
        ref = next((q for q in same if q["mode"].split("+")[0] == "official-like"), same[0])
        r["reference"] = ref["mode"]
        r["memory_vs_reference"] = r["peak_memory_bytes"] / ref["peak_memory_bytes"]
        for clock in ("wall", "cpu"):
            if clock in r:
                c, rc = r[clock], ref[clock]
                c["speedup_vs_reference"] = c["images_per_s"] / rc["images_per_s"]
                c["best_speedup_vs_reference"] = c["best_images_per_s"] / rc["best_images_per_s"]


TABLE_COLUMNS = ["mode", "s/step", "img/s", "x ref", "best s/step", "x ref (best)", *[f"{p} s" for p in PHASES]]


def markdown_table(rows: list[dict[str, Any]], clock: str = "wall", mem: str = "peak RSS GB") -> str:
    """One line per mode: median and best step time, images/s and speed-up vs the reference, median phases,
    peak memory of the whole run and of the measured steps only (GB = 1e9 B), FLOPs per step, best GEMM rate,
    MFU (best step vs best GEMM)."""
    head = [*TABLE_COLUMNS, mem, "steady GB", "GFLOP/step", "GEMM GFLOP/s", "MFU"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        c = r[clock]
        cells = [r["mode"], f"{c['step_s']:.3f}", f"{c['images_per_s']:.3f}", f"{c['speedup_vs_reference']:.2f}",
                 f"{c['best_step_s']:.3f}", f"{c['best_speedup_vs_reference']:.2f}",
                 *[f"{c['phases_s'][p]:.3f}" for p in PHASES], f"{r['peak_memory_bytes'] / 1e9:.2f}",
                 "-" if r.get("steady_peak_memory_bytes") is None else f"{r['steady_peak_memory_bytes'] / 1e9:.2f}",
                 f"{r['step_flops'] / 1e9:.0f}", f"{c['gemm_flops_per_s'] / 1e9:.1f}", f"{100 * c['mfu']:.0f}%"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------- scheduling and metadata


def estimate_memory_bytes(cfg: BenchConfig, mode: str) -> int:
    """Rough peak RSS of one worker: interpreter and torch (0.25 GB), 4 fp32 copies of the model (weights, EMA,
    Adam m and v), activations (~21 (B, N, D) fp32 tensors per block, gradients filling in as they are freed),
    encoder weights + transformers (online), and 10% for allocator fragmentation (calibrated on SiT-B/2)."""
    import torch

    from benchmarks.harness import encoder_geometry
    from repa.models import build_model, count_params

    m = parse_mode(mode)
    dim = encoder_geometry(cfg)[0] if m.targets != "none" else 0
    with torch.device("meta"):
        model = build_model(cfg.model, encoder_dims=[dim] if dim else [], **cfg.model_overrides)
    params = count_params(model, include_projectors=True)
    acts = 4 * 21 * cfg.batch * model.num_patches * model.hidden_size * model.depth
    enc = 4 * 12 * dim * dim * 12 + 2.6e8 if m.targets == "online" else 0  # ViT-B-like weights, transformers
    return int(1.1 * (2.5e8 + 16 * params + acts + enc))


def _mem_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _choose_schedule(requested: str, cfg: BenchConfig, modes: list[str]) -> str:
    """`auto`: interleaved when every worker fits in memory at once (CPU), else sequential. An explicit
    `interleaved` that does not fit is refused before any worker starts (the OOM killer would end one mid-run)."""
    if requested == "sequential" or (requested == "auto" and cfg.device.startswith("cuda")):
        return "sequential"  # one GPU: modes must not share its memory
    need = sum(estimate_memory_bytes(cfg, m) for m in modes)
    fits = cfg.device.startswith("cuda") or need + 3e9 < _mem_available()
    if requested == "interleaved" and not fits:
        raise SystemExit(f"[bench] --schedule interleaved: {len(modes)} workers of {cfg.model} need about "
                         f"{need / 1e9:.1f} GB at once (+3 GB headroom), {_mem_available() / 1e9:.1f} GB is "
                         "available; run fewer modes per call or --schedule sequential")  # fmt: skip
    return requested if requested != "auto" else ("interleaved" if fits else "sequential")


def _loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def _meta(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(
            ["python -m benchmarks.step" if sys.argv[0].endswith("step.py") else sys.argv[0], *sys.argv[1:]]
        ),
        "args": {k: v for k, v in vars(args).items() if not k.startswith("_")},
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": cpu_bf16().cpu,
        "cpu_bf16": cpu_bf16().describe(),
        "cpu_count": os.cpu_count(),
        "loadavg_start": _loadavg(),
        "mem_available_gb": round(_mem_available() / 1e9, 1),
        "git_commit": commit,
        "phases": {p: PHASE_HELP[p] for p in PHASES},
    }


def main(argv: list[str] | None = None) -> int:
    """`python -m benchmarks.step`."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.step", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
