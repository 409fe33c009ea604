"""Training-loop throughput of git revisions side by side: `repa train` on a preset, interleaved rounds.

    python -m benchmarks.loop --revs 0f0bd7d~1,0f0bd7d,HEAD --steps 200 --rounds 3 \
        --out benchmarks/results/loop-tiny.json

Each revision's `src/` and `configs/` are exported (`git archive`) into a temporary folder and run with that
`src/` first on PYTHONPATH, so the loop measured is that revision's whole training step (data, model, loss,
optimizer, EMA, the per-step checks), not a stand-in. The rounds alternate the revisions (A B C A B C ...) so slow
drifts of the machine fall on all of them alike. A revision's speed in one run is the median images/s of its log
windows after the first (warm-up); its speed is the median over rounds. One untimed step per revision first builds
its encoder-target cache. Give the machine to the measurement alone: other processes on the cores move the numbers
by more than the differences it is meant to see.
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


def train_once(tree: Path, run_dir: Path, steps: int, log_every: int, threads: int, extra: list[str]) -> list[float]:
    """One `repa train` of `tree`'s revision; returns the images/s of its log windows."""
    overrides = [f"train.run_dir={run_dir}", f"train.max_steps={steps}", f"train.log_every={log_every}",
                 f"train.sample_every={10 * steps}", f"train.checkpoint_every={steps}", "train.progress=false", *extra]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(tree / "src"), "OMP_NUM_THREADS": str(threads)}
    code = "import sys; from repa.cli.main import main; sys.exit(main(sys.argv[1:]))"
    cmd = [sys.executable, "-c", code, "train", str(tree / "configs" / "tiny.yaml"), *overrides]
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["images_per_s"] for r in rows if "images_per_s" in r]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--revs", required=True, help="comma-separated git revisions (the first is the baseline)")
    p.add_argument("--steps", type=int, default=200, help="training steps per run")
    p.add_argument("--log-every", type=int, default=25, help="steps per log window")
    p.add_argument("--rounds", type=int, default=3, help="runs per revision, interleaved")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override for every run")
    p.add_argument("--out", default=None, help="JSON result file")
    args = p.parse_args(argv)
    revs = [r for r in args.revs.split(",") if r]
    with tempfile.TemporaryDirectory(prefix="repa-loop-") as tmp:
        trees, shas = {}, {}
        for i, rev in enumerate(revs):
            trees[rev] = Path(tmp) / f"rev{i}"
            trees[rev].mkdir()
            shas[rev] = export(rev, trees[rev])
            train_once(trees[rev], Path(tmp) / f"warm{i}", 1, 1, args.threads, args.set)  # builds its target cache
        speeds: dict[str, list[float]] = {rev: [] for rev in revs}
        for k in range(args.rounds):
            for i, rev in enumerate(revs):
                start = time.perf_counter()
                windows = train_once(trees[rev], Path(tmp) / f"r{k}-{i}", args.steps, args.log_every, args.threads,
                                     args.set)  # fmt: skip
                speeds[rev].append(statistics.median(windows[1:] or windows))
                print(f"[loop] round {k + 1} {rev}: {speeds[rev][-1]:.1f} img/s ({time.perf_counter() - start:.0f} s)")
    base = statistics.median(speeds[revs[0]])
    rows = [{"rev": rev, "commit": shas[rev], "images_per_s": statistics.median(v), "rounds": v,
             "vs_first": statistics.median(v) / base} for rev, v in speeds.items()]  # fmt: skip
    print("| revision | commit | img/s (median of rounds) | vs first | rounds |\n| --- | --- | ---: | ---: | --- |")
    for r in rows:
        rounds = ", ".join(f"{x:.1f}" for x in r["rounds"])
        print(f"| {r['rev']} | {r['commit'][:7]} | {r['images_per_s']:.1f} | {r['vs_first']:.3f} | {rounds} |")
    if args.out:
        meta = {"cpu": cpu_bf16().cpu or platform.machine(), "threads": args.threads, "steps": args.steps,
                "log_every": args.log_every, "overrides": args.set, "loadavg": os.getloadavg()}  # fmt: skip
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
