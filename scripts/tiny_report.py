"""The embedded default's report: REPA vs vanilla tiny SiT on Fashion-MNIST — FID, linear probes and CKNNA per layer.

    .venv/bin/python scripts/tiny_report.py runs/tiny runs/tiny-vanilla --out reports/tiny

For each run (its newest checkpoint, EMA weights):
  * FID (and sFID, precision/recall) of N class-balanced samples (the run's sampler; default N = 1000) against M
    class-balanced Fashion-MNIST test images (default M = 2000) with the FID Inception network (no Inception Score:
    its classifier weights are not available offline). FID from 1000 samples is biased upwards; compare runs only at
    the same N and M.
  * linear-probe test accuracy of mean-pooled hidden states per block and noise level t (null label; probe fitted on
    class-balanced train images, evaluated on test images);
  * CKNNA (k = 10) between the same pooled hidden states and the REPA run's encoder (from its config: the
    saliency-tuned DINOv2-S/14 `dinov2-vit-s-focus`, block 8, 98 px, mean patch token; not a faithful DINOv2).
Writes `report.md` (one table), `report.png` (probe accuracy and CKNNA per layer) and `report.json` to --out.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("repa_run", help="REPA run folder (e.g. runs/tiny) or checkpoint")
    p.add_argument("vanilla_run", help="vanilla run folder (e.g. runs/tiny-vanilla) or checkpoint")
    p.add_argument("--out", default="reports/tiny", help="output folder")
    p.add_argument("--num-samples", type=int, default=1000, help="generated samples per run for FID")
    p.add_argument("--ref", default="fashion-mnist:test", help="FID reference (see `repa eval`)")
    p.add_argument("--ref-num", type=int, default=2000, help="reference images (class-balanced)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the run's config)")
    p.add_argument("--sample", action="append", default=[], metavar="KEY=V",
                   help="sampling setting for both runs, a key of the config's sample section (e.g. sampler=sde, "
                        "cfg_scale=2.5; repeatable; default: each run's config)")  # fmt: skip
    p.add_argument("--times", default="0,0.5", help="noise levels t for probes and CKNNA")
    p.add_argument("--probe-train", type=int, default=2000, help="class-balanced train images for the probe")
    p.add_argument("--probe-test", type=int, default=1000, help="class-balanced test images for the probe")
    p.add_argument("--epochs", type=int, default=40, help="probe epochs")
    p.add_argument("--align-num", type=int, default=1000, help="test images for CKNNA")
    p.add_argument("--k", type=int, default=10, help="CKNNA neighbours")
    p.add_argument("--batch-size", type=int, default=100, help="sampling batch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def evaluate_run(name: str, path: str, encoder: tuple, detector, args: argparse.Namespace, device) -> dict[str, Any]:
    """FID, probe and CKNNA rows of one run."""
    from repa.analysis.run import run_align, run_probe
    from repa.config.io import parse_overrides
    from repa.evaluation.generation import generate_and_score
    from repa.loading import load_model

    progress = not args.no_progress
    t0 = time.time()
    loaded = load_model(path, device=device)
    sample = {"num_steps": args.steps, **parse_overrides([f"sample.{o}" for o in args.sample]).get("sample", {})}
    fid = generate_and_score(loaded.path, args.num_samples, args.ref, detector, sample=sample,
                               batch_size=args.batch_size, seed=args.seed, out_dir=Path(args.out) / f"samples-{name}",
                               ref_limit=args.ref_num, progress=progress)  # fmt: skip
    probe = run_probe(loaded, "all", args.times, args.probe_train, args.probe_test, args.epochs, seed=args.seed,
                      device=device, progress=progress, write=False)  # fmt: skip
    enc_name, enc_layer, enc_res, _ = encoder
    align = run_align(loaded, enc_name, "final" if enc_layer is None else enc_layer, enc_res, "all", args.times,
                      args.align_num, "cknna", args.k, seed=args.seed, device=device, progress=progress, write=False)  # fmt: skip
    cknna = {(r["layer"], r["t"]): r["value"] for r in align["rows"]}
    layers = [{**r, "cknna": cknna[(r["layer"], r["t"])]} for r in probe["rows"]]
    return {
        "checkpoint": str(loaded.path),
        "step": loaded.info.get("step"),
        "fid": {k: fid.get(k) for k in ("fid", "sfid", "precision", "recall", "num_samples", "num_reference")},
        "sample": fid["sample"],
        "encoder": align["meta"]["encoder"],
        "align_depth": loaded.info["model_kwargs"].get("align_depth") if loaded.cfg.repa.enabled else None,
        "probe": probe["meta"],
        "layers": layers,
        "seconds": round(time.time() - t0, 1),
    }


def _fmt(v: float | None, spec: str = ".2f") -> str:
    return "n/a" if v is None else format(v, spec)


def markdown(runs: dict[str, dict[str, Any]], args: argparse.Namespace, detector_name: str) -> str:
    """The report: what was measured (with N), FID per run, then one table per (layer, t)."""
    r, v = runs["repa"], runs["vanilla"]
    s = r["sample"]
    sampler = f"{s['sampler']}{' (Heun)' if s['heun'] and s['sampler'] == 'ode' else ''}, {s['num_steps']} steps, CFG {s['cfg_scale']:g}"
    lines = [
        "# Tiny REPA vs vanilla SiT on Fashion-MNIST",
        "",
        f"- REPA: `{r['checkpoint']}` (step {r['step']}); vanilla: `{v['checkpoint']}` (step {v['step']}); EMA weights.",
        f"- FID: {r['fid']['num_samples']} samples per run (class-balanced labels, {sampler}) vs "
        f"{r['fid']['num_reference']} class-balanced Fashion-MNIST test images, detector `{detector_name}`. "
        f"**FID REPA {_fmt(r['fid']['fid'])}, vanilla {_fmt(v['fid']['fid'])}** (sFID {_fmt(r['fid']['sfid'])} / "
        f"{_fmt(v['fid']['sfid'])}; precision {_fmt(r['fid']['precision'], '.3f')} / "
        f"{_fmt(v['fid']['precision'], '.3f')}; recall {_fmt(r['fid']['recall'], '.3f')} / "
        f"{_fmt(v['fid']['recall'], '.3f')}). Small-N FID is biased upwards: compare only at equal N.",
        f"- Linear probe: mean-pooled block outputs, null label, BatchNorm + linear, {args.epochs} epochs, fitted on "
        f"{r['probe']['num_train']} train images, test accuracy on {r['probe']['num_test']} test images.",
        f"- CKNNA (k = {args.k}) on {args.align_num} test images against `{r['encoder']}` (mean patch token; the "
        "saliency-tuned DINOv2-S, not a faithful DINOv2). t = 0 is clean, t = 1 noise. REPA aligns block "
        f"{r['align_depth']}.",
        "",
        "| layer | t | probe acc REPA | probe acc vanilla | CKNNA REPA | CKNNA vanilla |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for a, b in zip(r["layers"], v["layers"]):
        lines.append(f"| {a['layer']} | {a['t']:g} | {a['test_acc']:.3f} | {b['test_acc']:.3f} | {a['cknna']:.3f} | "
                     f"{b['cknna']:.3f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def figure(runs: dict[str, dict[str, Any]], path: Path) -> None:
    """Probe accuracy and CKNNA against layer; one colour per t, solid REPA, dashed vanilla."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), dpi=120)
    times = sorted({row["t"] for row in runs["repa"]["layers"]})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, key, label in ((axes[0], "test_acc", "linear-probe test accuracy"), (axes[1], "cknna", "CKNNA")):
        for name, style in (("repa", "-"), ("vanilla", "--")):
            fid = runs[name]["fid"]["fid"]
            for i, t in enumerate(times):
                rows = [row for row in runs[name]["layers"] if row["t"] == t]
                ax.plot([row["layer"] for row in rows], [row[key] for row in rows], style, marker="o",
                        color=colors[i % len(colors)], label=f"{name} (FID {_fmt(fid, '.1f')}), t={t:g}")  # fmt: skip
        if runs["repa"]["align_depth"]:
            ax.axvline(runs["repa"]["align_depth"], color="gray", lw=0.8, ls=":", label="REPA alignment depth")
        ax.set_xlabel("block")
        ax.set_ylabel(label)
        ax.set_xticks(sorted({row["layer"] for row in runs["repa"]["layers"]}))
        ax.grid(alpha=0.3)
    axes[1].set_title(f"vs {runs['repa']['encoder']}", fontsize=9)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    from repa.analysis.report import write_json
    from repa.analysis.run import default_encoder
    from repa.evaluation import make_detector
    from repa.loading import load_model

    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    encoder = default_encoder(load_model(args.repa_run), None, None, None)  # the REPA run's target, for both runs
    detector = make_detector("inception", device, classifier=None)
    runs = {name: evaluate_run(name, path, encoder, detector, args, device)
            for name, path in (("repa", args.repa_run), ("vanilla", args.vanilla_run))}  # fmt: skip
    text = markdown(runs, args, detector.name)
    (out / "report.md").write_text(text)
    figure(runs, out / "report.png")
    write_json({"args": vars(args), "detector": detector.name, "runs": runs}, out / "report.json")
    print(text)
    print(f"[repa] wrote {out / 'report.md'}, {out / 'report.png'}, {out / 'report.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
