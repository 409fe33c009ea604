"""GPU training-step sweep (one H100, < 8 minutes): SiT-B/2 and SiT-XL/2 + REPA (DINOv2-B targets), bf16.

    python -m benchmarks.gpu_step                      # the sweep, a markdown table, bench-gpu.json
    repa bench gpu --budget-s 420                      # the same through the CLI
    python -m benchmarks.gpu_step --device cpu --tiny  # CPU smoke run of this script's code path

For each model: official-like (eager) and ours with online / cached targets, eager and `torch.compile`d.
Modes run one after another in this process (the GPU's memory is not shared between modes); each mode's peak is
`torch.cuda.max_memory_allocated` since the mode was built. Measured steps run back to back without host syncs;
s/step is the wall time of that block over the number of steps (every host stall included), the phases are
medians of CUDA-event intervals. A batch that does not fit is halved (and said so). The time budget skips
what would not finish. NOT YET RUN ON A GPU (see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from typing import Any

from benchmarks.harness import PHASES, BenchConfig, StepRunner, parse_mode
from benchmarks.step import TINY, add_ratios, markdown_table, summarize
from repa.fileio import write_json

DEFAULT_MODES = "official-like,ours-online,ours-online+compile,ours-cached,ours-cached+compile"
DEFAULT_BATCH = {"SiT-B/2": 256, "SiT-XL/2": 64}  # XL/2 at 256 needs ~85 GB of bf16 activations in eager mode


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `repa bench gpu` / `python -m benchmarks.gpu_step`."""
    p.add_argument("--models", default="SiT-B/2,SiT-XL/2")
    p.add_argument("--modes", default=DEFAULT_MODES, help="comma-separated modes (see benchmarks/README.md)")
    p.add_argument("--batch", default="", help="per-model batch, e.g. 'SiT-B/2=256,SiT-XL/2=64' (default as shown)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3, help="unmeasured steps (compiled modes compile here)")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke run of the script")
    p.add_argument("--budget-s", type=float, default=450.0, help="skip modes that would start after this many s")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (smoke run)")
    p.add_argument("--json", default="bench-gpu.json", help="where to write the results ('' for none)")


def _batches(text: str, models: list[str], tiny: bool) -> dict[str, int]:
    out = {m: (4 if tiny else DEFAULT_BATCH.get(m, 64)) for m in models}
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, _, value = item.partition("=")
        if name not in out or not value.isdigit():
            raise ValueError(f"--batch expects MODEL=INT for models in --models, got {item!r}")
        out[name] = int(value)
    return out


def _free(device: str) -> None:
    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def measure_mode(cfg: BenchConfig, mode: str, steps: int, warmup: int) -> dict[str, Any]:
    """Build the mode, warm up, time `steps` back-to-back steps; the raw record `benchmarks.step.summarize` takes."""
    import torch

    runner = StepRunner(cfg, parse_mode(mode))
    try:
        t0 = time.perf_counter()
        for _ in range(warmup):
            runner.step()
        runner.timer.collect()  # synchronises; discards the warm-up marks
        warm_s = time.perf_counter() - t0
        runner.start_measuring()
        start = time.perf_counter()
        for _ in range(steps):
            runner.step()
        if runner.device.type == "cuda":
            torch.cuda.synchronize(runner.device)
        block_s = (time.perf_counter() - start) / steps
        rows = runner.timer.collect()
        for row in rows:  # s/step from the block (host stalls included); the remainder of the phases is "other"
            wall = row["wall"]
            wall["other"] = max(0.0, block_s - sum(wall[p] for p in PHASES if p != "other"))
            wall["total"] = block_s
            row.pop("cpu", None)
        memory = runner.memory()  # before the GEMM timing allocates its operands
        return {"describe": runner.describe(), "rows": rows, "gemm": [runner.gemm_rate()], **memory,
                "final_loss": runner.final_loss(), "warmup_s": warm_s}  # fmt: skip
    finally:
        del runner
        _free(cfg.device)


def run(args: argparse.Namespace) -> int:
    """Sweep models x modes within the time budget; print one markdown table per model and write JSON."""
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("no CUDA device: this sweep is for a GPU (use --device cpu --tiny for a smoke run)")
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True  # only the fp32 loss terms; the model runs in bf16
        torch.backends.cudnn.allow_tf32 = True
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in modes:
        parse_mode(m)
    batches = _batches(args.batch, models, args.tiny)
    began = time.perf_counter()
    device = torch.cuda.get_device_name(torch.device(args.device)) if args.device.startswith("cuda") else args.device
    record: dict[str, Any] = {"meta": {"torch": torch.__version__, "device": device,
                                       "args": {k: v for k, v in vars(args).items() if not k.startswith("_")}},
                              "results": {}}  # fmt: skip
    for model in models:
        rows, notes = [], []
        for mode in modes:
            elapsed = time.perf_counter() - began
            if elapsed > args.budget_s:
                notes.append(f"{mode}: skipped (time budget {args.budget_s:.0f} s reached at {elapsed:.0f} s)")
                continue
            batch = batches[model]
            while True:
                cfg = BenchConfig(model=model, batch=batch, device=args.device, precision=args.precision,
                                  threads=None, **(TINY if args.tiny else {}))  # fmt: skip
                try:
                    raw = measure_mode(cfg, mode, args.steps, args.warmup)
                    break
                except RuntimeError as err:
                    if "out of memory" not in str(err).lower() or batch <= 8:
                        raise
                    notes.append(f"{mode}: batch {batch} ran out of memory, retried at {batch // 2}")
                    batch //= 2
                    _free(args.device)
            if "compile" in mode:
                torch._dynamo.reset()  # fresh compile caches for the next model object
            row = summarize(mode, raw, batch)
            row["batch"], row["warmup_s"] = batch, raw["warmup_s"]
            rows.append(row)
            print(f"[bench-gpu] {model} {mode} batch {batch}: {row['wall']['step_s']:.3f} s/step, "
                  f"{row['wall']['images_per_s']:.1f} img/s, peak {row['peak_memory_bytes'] / 1e9:.1f} GB "
                  f"(warm-up {raw['warmup_s']:.0f} s)", flush=True)  # fmt: skip
        if rows:
            add_ratios(rows)
            mem = "peak CUDA GB" if args.device.startswith("cuda") else "peak RSS GB"
            print(f"\n### {model}, {args.precision}, batch {batches[model]}\n\n{markdown_table(rows, 'wall', mem)}")
        for note in notes:
            print(f"- {note}")
        record["results"][model] = {"modes": rows, "notes": notes}
    record["meta"]["total_s"] = time.perf_counter() - began
    print(f"\n[bench-gpu] total {record['meta']['total_s']:.0f} s")
    if args.json:
        write_json(record, args.json, indent=1)
        print(f"[bench-gpu] wrote {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m benchmarks.gpu_step`."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_step", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
