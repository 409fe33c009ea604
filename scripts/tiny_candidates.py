"""FID against CPU minutes for candidate settings of the embedded default (how configs/tiny.yaml was chosen).

    .venv/bin/python scripts/tiny_candidates.py --out docs/tiny-report/candidates \
        --candidate "baseline:" --candidate "lr1e-3:optim.lr=1e-3" --steps 600 --eval-every 200

Each candidate is configs/tiny.yaml plus its overrides, trained once to --steps with a checkpoint every --eval-every
steps; then every checkpoint's EMA weights are scored: FID of --num class-balanced samples (the config's sampler)
against the first --ref-num class-balanced Fashion-MNIST test images (the FID Inception network). The minutes are
the run's wall time from its start (encoder target caching included, as a newcomer's first run pays it) to the
moment the checkpoint was written, read from the checkpoint files' times. Writes `candidates.json`,
`candidates.md` and `candidates.png` (FID vs minutes, one line per candidate) into --out; finished candidates
and scored checkpoints are reused when the command is rerun. `--sample NAME:KEY=V,...` scores every candidate's
checkpoints once more with those sampling settings (e.g. `cfg:cfg_scale=2`), as the candidate `<candidate>+NAME`,
without training it again.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/tiny-candidates")
    p.add_argument("--candidate", action="append", required=True, metavar="NAME:KEY=V,KEY=V",
                   help="a name and comma-separated config overrides (repeatable)")  # fmt: skip
    p.add_argument("--sample", action="append", default=[], metavar="NAME:KEY=V,KEY=V",
                   help="sampling variant scored on every candidate's checkpoints (keys of the config's sample "
                        "section, e.g. cfg:cfg_scale=2; repeatable)")  # fmt: skip
    p.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--num", type=int, default=1000, help="samples per FID")
    p.add_argument("--ref-num", type=int, default=2000, help="class-balanced test images of the FID reference")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def _step(checkpoint: Path) -> int:
    return int(checkpoint.name.split("_")[-1]) if checkpoint.name.startswith("step_") else -1


def train_candidate(name: str, overrides: list[str], args: argparse.Namespace, out: Path) -> dict:
    """Train (or reuse) one candidate; returns {step: minutes since the start} of its checkpoints."""
    from repa.checkpoint import list_checkpoints
    from repa.config import load_config
    from repa.training import train

    run = out / "runs" / name
    times_file = run / "checkpoint_minutes.json"
    if times_file.exists():
        return {int(k): v for k, v in json.loads(times_file.read_text()).items()}
    if run.exists():
        shutil.rmtree(run)  # an interrupted candidate restarts: its minutes must count from its own start
    cfg = load_config(args.config, [f"train.run_dir={run}", f"train.max_steps={args.steps}",
                                    f"train.checkpoint_every={args.eval_every}", "train.keep_checkpoints=100",
                                    f"train.sample_every={args.steps}", "train.progress=false", *overrides])  # fmt: skip
    start = time.time()
    train(cfg)
    minutes = {_step(p): (p.stat().st_mtime - start) / 60 for p in list_checkpoints(run / "checkpoints")}
    times_file.write_text(json.dumps(minutes, indent=1) + "\n")
    return minutes


def _overrides(spec: str) -> tuple[str, list[str]]:
    name, _, over = spec.partition(":")
    return name, [o for o in over.split(",") if o]


def score(name: str, step: int, args: argparse.Namespace, out: Path, variant: str = "") -> dict:
    from repa.checkpoint import list_checkpoints
    from repa.config.io import parse_overrides
    from repa.evaluation.generation import generate_and_score

    sample = None
    if variant:
        vname, over = _overrides(variant)
        sample = parse_overrides([f"sample.{o}" for o in over])["sample"]
    cache = out / "scores" / f"{name}{'+' + vname if variant else ''}-step{step}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    path = next(p for p in list_checkpoints(out / "runs" / name / "checkpoints") if _step(p) == step)
    t0 = time.time()
    m = generate_and_score(path, args.num, "fashion-mnist:test", "inception", sample=sample, batch_size=250, seed=args.seed,
                           save=False, ref_limit=args.ref_num, out_dir=out / "scores" / "raw", progress=False)  # fmt: skip
    row = {"fid": m["fid"], "precision": m.get("precision"), "recall": m.get("recall"), "eval_s": time.time() - t0}
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(row, indent=1) + "\n")
    return row


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for spec in args.candidate:
        name, overrides = _overrides(spec)
        minutes = train_candidate(name, overrides, args, out)
        for variant in ["", *args.sample]:
            label = name + (f"+{_overrides(variant)[0]}" if variant else "")
            rows = []
            for step in sorted(minutes):
                r = score(name, step, args, out, variant)
                rows.append({"step": step, "minutes": round(minutes[step], 2), **r})
                print(f"[candidates] {label} step {step}: {minutes[step]:.1f} min, FID {r['fid']:.1f}", flush=True)
            extra = [f"sample.{o}" for o in _overrides(variant)[1]] if variant else []
            results[label] = {"overrides": overrides + extra, "rows": rows}
    meta = {"command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]), "num": args.num,
            "ref_num": args.ref_num, "steps": args.steps, "config": args.config}  # fmt: skip
    (out / "candidates.json").write_text(json.dumps({"meta": meta, "candidates": results}, indent=1) + "\n")
    lines = [f"Command: `{meta['command']}`", "", f"FID of {args.num} samples vs {args.ref_num} Fashion-MNIST test "
             "images; minutes of wall time since the run started (target caching included).", "",
             "| candidate | overrides | step | minutes | FID | precision | recall |", "|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for name, res in results.items():
        for r in res["rows"]:
            lines.append(f"| {name} | {' '.join(res['overrides']) or '-'} | {r['step']} | {r['minutes']:.1f} | "
                         f"{r['fid']:.1f} | {r['precision']:.3f} | {r['recall']:.3f} |")  # fmt: skip
    (out / "candidates.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, res in results.items():
        ax.plot([r["minutes"] for r in res["rows"]], [r["fid"] for r in res["rows"]], marker="o", label=name)
    ax.set_xlabel("CPU wall minutes since the start of training")
    ax.set_ylabel(f"FID ({args.num} samples)")
    ax.axvline(10, color="grey", lw=0.8, ls="--")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "candidates.png", dpi=120)
    print(f"[candidates] wrote {out / 'candidates.md'}, candidates.json, candidates.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
