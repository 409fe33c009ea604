"""Training-loop throughput of git revisions side by side: `repa train` on a preset, run in simultaneous pairs.

    python -m benchmarks.loop --revs 0f0bd7d~1,0f0bd7d,HEAD --steps 300 --rounds 4 \
        --out benchmarks/results/loop-tiny.json

Each revision's `src/` and `configs/` are exported (`git archive`) into a temporary folder and run with that
`src/` first on PYTHONPATH, so the loop measured is that revision's whole training step (data, model, loss,
optimizer, EMA, the per-step checks), not a stand-in. The first revision is the baseline; each other revision
runs at the same time as the baseline, each pinned to its own core with one thread (`taskset`), and the next round
swaps the cores. On a shared 2-core machine the speed of both cores drifts by 10-30% over minutes (measured: the
same revision went from 90 to 64 images/s in three sequential rounds); two runs that share the same minutes see the
same drift, so their ratio is what is compared. A run's speed is the median images/s of its log windows after the
first (warm-up); a revision's ratio is the median over rounds of (its speed / the baseline's in the same round).
One untimed step per revision first builds its encoder-target cache.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from repa.hardware import cpu_bf16

ROOT = Path(__file__).resolve().parents[1]


def export(rev: str, dest: Path) -> str:
    """`src/` and `configs/` of `rev` into `dest`; returns the full commit hash."""
    sha = subprocess.run(["git", "rev-parse", rev], cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip()
    archive = dest / "rev.tar"
    subprocess.run(["git", "archive", "-o", str(archive), sha, "src", "configs"], cwd=ROOT, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")
    archive.unlink()
    return sha


def start_run(tree: Path, run_dir: Path, steps: int, log_every: int, core: int, extra: list[str]) -> subprocess.Popen:
    """Start one `repa train` of `tree`'s revision pinned to `core` with one thread."""
    overrides = [f"train.run_dir={run_dir}", f"train.max_steps={steps}", f"train.log_every={log_every}",
                 f"train.sample_every={10 * steps}", f"train.checkpoint_every={steps}", "train.progress=false",
                 "train.num_threads=1", *extra]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(tree / "src"), "OMP_NUM_THREADS": "1"}
    code = "import sys; from repa.cli.main import main; sys.exit(main(sys.argv[1:]))"
    cmd = ["taskset", "-c", str(core), sys.executable, "-c", code, "train", str(tree / "configs" / "tiny.yaml"),
           *overrides]  # fmt: skip
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)


def speed(run_dir: Path) -> float:
    """Median images/s of a finished run's log windows after the first."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    windows = [r["images_per_s"] for r in rows if "images_per_s" in r]
    return statistics.median(windows[1:] or windows)


def run_together(runs: list[tuple[Path, Path, int]], steps: int, log_every: int, extra: list[str]) -> list[float]:
    """Run (tree, run_dir, core) triples at the same time; their speeds."""
    procs = [start_run(tree, run_dir, steps, log_every, core, extra) for tree, run_dir, core in runs]
    for proc in procs:
        if proc.wait():
            raise SystemExit(f"a training run failed (exit {proc.returncode}): {proc.args}")
    return [speed(run_dir) for _, run_dir, _ in runs]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--revs", required=True, help="comma-separated git revisions (the first is the baseline)")
    p.add_argument("--steps", type=int, default=200, help="training steps per run")
    p.add_argument("--log-every", type=int, default=25, help="steps per log window")
    p.add_argument("--rounds", type=int, default=3, help="runs per revision, interleaved")
    p.add_argument("--cores", default="0,1", help="the two cores a pair runs on")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override for every run")
    p.add_argument("--out", default=None, help="JSON result file")
    args = p.parse_args(argv)
    revs = [r for r in args.revs.split(",") if r]
    cores = [int(c) for c in args.cores.split(",")]
    if len(revs) < 2 or len(cores) != 2:
        p.error("--revs needs a baseline and at least one other revision; --cores two cores")
    base, others = revs[0], revs[1:]
    ratios: dict[str, list[float]] = {rev: [] for rev in others}
    speeds: dict[str, list[float]] = {rev: [] for rev in revs}
    with tempfile.TemporaryDirectory(prefix="repa-loop-") as tmp:
        trees, shas = {}, {}
        for i, rev in enumerate(revs):
            trees[rev] = Path(tmp) / f"rev{i}"
            trees[rev].mkdir()
            shas[rev] = export(rev, trees[rev])
        warm = [(trees[rev], Path(tmp) / f"warm{i}", cores[i % 2]) for i, rev in enumerate(revs)]
        for i in range(0, len(warm), 2):  # one step each: builds the revisions' target caches
            run_together(warm[i : i + 2], 1, 1, args.set)
        for k in range(args.rounds):
            for j, rev in enumerate(others):
                c = cores if k % 2 == 0 else cores[::-1]
                started = time.perf_counter()
                a, b = run_together([(trees[base], Path(tmp) / f"r{k}-{j}-base", c[0]),
                                     (trees[rev], Path(tmp) / f"r{k}-{j}-rev", c[1])], args.steps, args.log_every,
                                    args.set)  # fmt: skip
                speeds[base].append(a)
                speeds[rev].append(b)
                ratios[rev].append(b / a)
                print(f"[loop] round {k + 1}: {base} {a:.1f} img/s (core {c[0]}) | {rev} {b:.1f} img/s (core {c[1]}) "
                      f"-> {b / a:.3f} ({time.perf_counter() - started:.0f} s)")  # fmt: skip
    rows = [{"rev": rev, "commit": shas[rev], "images_per_s": speeds[rev],
             "vs_baseline": statistics.median(ratios[rev]) if rev in ratios else 1.0,
             "ratios": ratios.get(rev, [])} for rev in revs]  # fmt: skip
    print("| revision | commit | speed vs baseline (median of rounds) | per round | img/s per run |")
    print("| --- | --- | ---: | --- | --- |")
    for r in rows:
        per_round = ", ".join(f"{x:.3f}" for x in r["ratios"]) or "baseline"
        runs = ", ".join(f"{x:.1f}" for x in r["images_per_s"])
        print(f"| {r['rev']} | {r['commit'][:7]} | {r['vs_baseline']:.3f} | {per_round} | {runs} |")
    if args.out:
        meta = {"cpu": cpu_bf16().cpu or platform.machine(), "cores": cores, "threads_per_run": 1,
                "steps": args.steps, "log_every": args.log_every, "overrides": args.set,
                "loadavg": os.getloadavg()}  # fmt: skip
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
