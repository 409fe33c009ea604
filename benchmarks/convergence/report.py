"""The benchmark's outputs: `results.csv`, `results.md` (tables and verdicts), `convergence.png`, `summary.json`."""

from __future__ import annotations

import csv
import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.convergence.presets import CKNNA_K, METRICS, PROBE_T, Preset, preset_name
from benchmarks.convergence.stats import curves, finals, iso_fid_speedups, seed_mean, speedup, verdict

TIMES = "step_times.json"  # `--time-steps` writes it into the benchmark's --out; the report prefers it to the logs


def _fmt(values: Sequence[float], digits: int = 4) -> str:
    if not values:
        return "-"
    mean = statistics.mean(values)
    if len(values) == 1:
        return f"{mean:.{digits}g}"
    return f"{mean:.{digits}g} [{min(values):.{digits}g}, {max(values):.{digits}g}]"


def metric_table(rows: list[dict], key: str, arm: str, base: str = "vanilla") -> list[str]:
    """Markdown rows: step | base | arm | diff | verdict, for one metric."""
    label, lower = METRICS[key]
    steps_b, vb = curves(rows, base, key)
    steps_a, va = curves(rows, arm, key)
    lines = [f"| step | {base} | {arm} | diff ({arm} - {base}) | verdict ({label}) |", "|---:|---|---|---:|---|"]
    for step in (s for s in steps_a if s in steps_b):
        b = [v[steps_b.index(step)] for v in vb.values()]
        a = [v[steps_a.index(step)] for v in va.values()]
        diff = statistics.mean(a) - statistics.mean(b)
        lines.append(f"| {step} | {_fmt(b)} | {_fmt(a)} | {diff:+.4g} | {verdict(b, a, lower)} |")
    return lines


def plot(rows: list[dict], arms: list[str], path: Path, title: str, seconds: dict[str, float | None]) -> None:
    """Metric vs training steps, one line per arm (mean over seeds) with a min-max band over seeds; a last panel
    puts FID against training wall time (step x the arm's measured s/step: what a speed-up costs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS) + 1, figsize=(5 * (len(METRICS) + 1), 3.8))
    for arm in arms:
        steps, per_seed = curves(rows, arm, "fid")
        if steps and seconds.get(arm):
            minutes = [s * seconds[arm] / 60 for s in steps]
            axes[-1].plot(minutes, seed_mean(per_seed, len(steps)), marker="o", label=arm)
    axes[-1].set_xlabel("training wall time (min, one process)")
    axes[-1].set_title("FID vs training time (lower is better)")
    axes[-1].grid(alpha=0.3)
    for ax, (key, (label, lower)) in zip(axes, METRICS.items()):
        for arm in arms:
            steps, per_seed = curves(rows, arm, key)
            if not steps:
                continue
            cols = list(zip(*per_seed.values()))
            mean = [statistics.mean(c) for c in cols]
            ax.plot(steps, mean, marker="o", label=f"{arm} ({len(per_seed)} seeds)")
            ax.fill_between(steps, [min(c) for c in cols], [max(c) for c in cols], alpha=0.2)
        ax.set_xlabel("training step")
        ax.set_title(f"{label} ({'lower' if lower else 'higher'} is better)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def describe(p: Preset, cfg, d0: int, seeds: Sequence[int]) -> str:
    """One paragraph stating exactly what was trained and measured."""
    enc = f"{cfg.repa.encoders[0]} (block {cfg.repa.encoder_layer}, {cfg.repa.encoder_resolution} px)"
    space = "pixel space" if cfg.data.space == "pixel" else f"latent space of {cfg.data.vae}"
    return (
        f"{cfg.model.name} on Fashion-MNIST ({p.num_train or 'all'} training images, {space}), batch {p.batch_size}, "
        f"{p.steps} steps, lr {cfg.optim.lr:g}, seeds {','.join(map(str, seeds))}; REPA: {enc}, lambda "
        f"{cfg.repa.align_coeff:g}, block {d0}, {cfg.repa.align_kind}. Evaluated every {p.eval_every} steps on the EMA "
        f"model. FID: {p.fid_samples} samples (Heun ODE {p.sample_steps} steps, no CFG, same noise everywhere) vs "
        f"Inception statistics of {p.fid_reference} Fashion-MNIST test images (a small-N FID: compare only within "
        f"this table). Probe: BatchNorm + linear layer, Adam lr {p.probe_lr:g} cosine, {p.probe_epochs} epochs, on mean-pooled block-{d0} tokens at "
        f"t = {PROBE_T} with the null label, {p.probe_train} train / {p.probe_test} test images. CKNNA: k = {CKNNA_K}, "
        f"same {p.probe_test} test images, vs mean-pooled {enc} tokens."
    )


SPEEDUP_HELP = (
    "Grid step = the first evaluated step whose seed-mean FID is <= vanilla's final seed-mean FID (the primary "
    "number; a lower bound on the speed-up when the curves decrease monotonically); interpolated = on the straight "
    "line between that evaluation and the previous one. Per-seed ratios pair REPA seed s with vanilla seed s. "
    "Verdict: a result only if REPA's final FID beats vanilla's by more than the seed spread and every seed reaches "
    "its vanilla target before the final step."
)


def speedup_section(rows: list[dict], arms: list[str], summary: dict, printed: list[str]) -> list[str]:
    """Markdown for the steps-to-reach table; fills `summary` and the lines to print."""
    md = ["## Steps to reach vanilla's final FID", "", SPEEDUP_HELP, "",
          "| arm | target FID | grid step | interpolated | speed-up (grid) | speed-up (interp.) | per seed (grid) "
          "| verdict |", "|---|---:|---:|---:|---:|---:|---|---|"]  # fmt: skip
    for arm in arms[1:]:
        sp = speedup(rows, arm)
        summary.setdefault(arm, {})["speedup"] = sp
        if not sp:
            continue
        per_seed = ", ".join(
            f"s{k}: {'not reached' if r is None else f'{r:.2f}x'}" for k, r in sp["ratio_per_seed"].items()
        )
        ratio = "not reached" if sp["ratio_grid"] is None else f"{sp['ratio_grid']:.2f}x"
        ratio_i = "-" if sp["ratio_interp"] is None else f"{sp['ratio_interp']:.2f}x"
        interp = "-" if sp["interp_step"] is None else round(sp["interp_step"])
        md.append(f"| {arm} | {sp['target_fid']:.4g} | {sp['grid_step'] or '-'} | {interp} | {ratio} | {ratio_i} | "
                  f"{per_seed} | **{sp['verdict']}**; final FID: {sp['final_fid_verdict']} |")  # fmt: skip
        printed.append(f"[convergence] {arm}: reaches vanilla's final FID {sp['target_fid']:.4g} at step "
                       f"{sp['grid_step'] or 'never'} (grid; interpolated {interp}) -> speed-up {ratio}; per seed "
                       f"{per_seed}; VERDICT: {sp['verdict']}")  # fmt: skip
    for base in [b for b in ("vanilla", "repa") if b in arms]:
        md += iso_table(rows, arms, base, summary)
    return md


def iso_table(rows: list[dict], arms: list[str], base: str, summary: dict) -> list[str]:
    """Markdown: every other arm's iso-FID speed-up at each of `base`'s checkpoints; fills
    `summary[arm]["iso_fid_speedups"]` (vs vanilla) or `["iso_fid_speedups_vs_repa"]`."""
    iso = {arm: iso_fid_speedups(rows, arm, base) for arm in arms if arm not in ("vanilla", base)}
    if not iso:
        return []
    md = ["", f"**Speed-up at every {base} checkpoint** (seed means): the step at which each arm first reaches "
          f"{base}'s FID at that checkpoint, interpolated linearly between evaluations; ratio = {base} step / arm "
          "step. A level reached at the arm's first evaluation gives a lower bound (marked >=).", ""]  # fmt: skip
    base_steps = [c["base_step"] for c in next(iter(iso.values()), [])]
    md += ["| arm | " + " | ".join(f"{base} step {s}" for s in base_steps) + " |",
           "|---|" + "---:|" * len(base_steps)]  # fmt: skip
    for arm, curve in iso.items():
        summary.setdefault(arm, {})["iso_fid_speedups" + ("" if base == "vanilla" else f"_vs_{base}")] = curve
        cells = [
            "not reached" if c["arm_step"] is None
            else f"{'>=' if c['lower_bound'] else ''}{c['ratio']:.2f}x (step {round(c['arm_step'])})"
            for c in curve
        ]  # fmt: skip
        md.append(f"| {arm} | " + " | ".join(cells) + " |")
    return md


def per_step_section(
    rows: list[dict], arm: str, d0: int, own: int | None, summary: dict, printed: list[str]
) -> list[str]:
    """Markdown per-step tables of every metric for `arm` vs vanilla, with final-step verdicts."""
    md = ["", f"## {arm} vs vanilla, per evaluated step", ""]
    for key, (label, lower) in METRICS.items():
        base, other = finals(rows, "vanilla", key), finals(rows, arm, key)
        if not base or not other:
            continue
        md += [f"**{label}**{'' if key == 'fid' else f' (block {d0})'}", "", *metric_table(rows, key, arm), ""]
        v = verdict(base, other, lower)
        summary.setdefault(arm, {})[key] = {"vanilla_final": base, "final": other, "final_verdict": v}
        printed.append(f"[convergence] {arm} vs vanilla, final {label}: {_fmt(base)} -> {_fmt(other)}: VERDICT: {v}")
    if own is not None and own != d0:  # a depth ablation: also at the block it aligns
        p = [_fmt(finals(rows, a, f"probe_acc_l{own}")) for a in ("vanilla", arm)]
        c = [_fmt(finals(rows, a, f"cknna_l{own}")) for a in ("vanilla", arm)]
        md += [f"At its own alignment block {own} (final step, vanilla -> {arm}): probe {p[0]} -> {p[1]}; "
               f"CKNNA {c[0]} -> {c[1]}.", ""]  # fmt: skip
    return md


def ablation_section(rows: list[dict], arm: str, summary: dict, printed: list[str]) -> list[str]:
    """Markdown per-step tables of an ablation arm against the REPA arm it varies (same verdict rule)."""
    md = ["", f"## {arm} vs repa (the ablation against the default REPA arm), per evaluated step", ""]
    for key, (label, lower) in METRICS.items():
        base, other = finals(rows, "repa", key), finals(rows, arm, key)
        if not base or not other:
            continue
        md += [f"**{label}**", "", *metric_table(rows, key, arm, base="repa"), ""]
        v = verdict(base, other, lower)
        summary.setdefault(arm, {})[f"{key}_vs_repa"] = {"repa_final": base, "final": other, "final_verdict": v}
        printed.append(f"[convergence] {arm} vs repa, final {label}: {_fmt(base)} -> {_fmt(other)}: VERDICT: {v}")
    return md


def read_step_times(out: Path) -> dict[str, float]:
    """{arm: s/step} from `<out>/step_times.json`, or {} when the arms were not timed side by side."""
    path = out / TIMES
    if not path.is_file():
        return {}
    return {name: v["s_per_step"] for name, v in json.loads(path.read_text())["arms"].items()}


def train_seconds(rows: list[dict], arms: Sequence[str], batch_size: int,
                  timed: dict[str, float] | None = None) -> dict[str, float | None]:  # fmt: skip
    """Training s/step of each arm: measured side by side (`timed`, from `--time-steps`) where given, else the batch
    over the mean of the runs' median logged images/s (None if neither)."""
    out: dict[str, float | None] = {}
    for arm in arms:
        ips = [r["train_images_per_s"] for r in rows if r["arm"] == arm and r.get("train_images_per_s")]
        out[arm] = (timed or {}).get(arm) or (batch_size / statistics.mean(ips) if ips else None)
    return out


def _step_s(seconds: dict[str, float | None], arm: str) -> str:
    return f"{seconds[arm]:.3f}" if seconds.get(arm) else "-"


LEADERBOARD_HELP = (
    "One row per arm. FID: seed mean [min, max] at every evaluated step. Speed-up vs vanilla / vs repa: the steps "
    "that arm needs to reach the other's final seed-mean FID, as other's final step / arm's step on the evaluation "
    "grid (interpolated in brackets; 'not reached' within the budget). Probe and CKNNA: final step, at the base "
    "alignment block for every arm. Verdicts compare the final FIDs against the seed spread (as the sections below)."
)


def _speedup_cell(rows: list[dict], arm: str, base: str, summary: dict) -> str:
    sp = speedup(rows, arm, base)
    summary.setdefault(arm, {})["speedup" if base == "vanilla" else f"speedup_vs_{base}"] = sp  # as speedup_section
    if not sp:
        return "-"
    if sp["ratio_grid"] is None:
        return "not reached"
    return f"{sp['ratio_grid']:.2f}x ({sp['ratio_interp']:.2f}x)"


def leaderboard_section(rows: list[dict], arms: list[str], p: Preset, d0: int, summary: dict,
                        seconds: dict[str, float | None]) -> list[str]:  # fmt: skip
    """Markdown: the one table of every arm (FID per step with spread, speed-ups vs vanilla and vs repa, final probe
    and CKNNA, training s/step, final-FID verdicts); fills `summary[arm]["speedup"]` (vs vanilla) and
    `["speedup_vs_repa"]`."""
    steps = sorted({r["step"] for r in rows})
    bases = [b for b in ("vanilla", "repa") if b in arms]
    head = ["arm", "seeds", *(f"FID @ {s}" for s in steps), *(f"speed-up vs {b}" for b in bases),
            f"probe (block {d0})", f"CKNNA (block {d0})", "train s/step", *(f"final FID vs {b}" for b in bases)]  # fmt: skip
    md = ["## Leaderboard", "", LEADERBOARD_HELP, "", "| " + " | ".join(head) + " |",
          "|---|" + "---:|" * (len(head) - 1 - len(bases)) + "---|" * len(bases)]  # fmt: skip
    for arm in arms:
        fid_steps, per_seed = curves(rows, arm, "fid")
        fids = [_fmt([v[fid_steps.index(s)] for v in per_seed.values()] if s in fid_steps else []) for s in steps]
        ups = [_speedup_cell(rows, arm, b, summary) if arm != b else "-" for b in bases]
        verdicts = [verdict(finals(rows, b, "fid"), finals(rows, arm, "fid"), True).split(" (")[0] if arm != b
                    else "-" for b in bases]  # fmt: skip
        cells = [arm, str(len(per_seed)), *fids, *ups, _fmt(finals(rows, arm, "probe_acc"), 3),
                 _fmt(finals(rows, arm, "cknna"), 3), _step_s(seconds, arm), *verdicts]  # fmt: skip
        md.append("| " + " | ".join(cells) + " |")
    return [*md, ""]


def cost_section(rows: list[dict], arms: list[str], seconds: dict[str, float | None], timed: bool,
                 wall_s: float | None) -> list[str]:  # fmt: skip
    """Markdown table of the measured training and evaluation cost of each arm."""
    source = ("timed side by side: `--time-steps`, step_times.json" if timed
              else "batch / median logged images/s of the runs")  # fmt: skip
    md = ["## Measured cost", "", f"| arm | train s/step ({source}) | eval s per checkpoint |", "|---|---:|---:|"]
    for arm in arms:
        ev = [r["eval_s"] for r in rows if r["arm"] == arm]
        md.append(f"| {arm} | {_step_s(seconds, arm)} | {statistics.mean(ev):.1f} |" if ev
                  else f"| {arm} | {_step_s(seconds, arm)} | - |")  # fmt: skip
    if wall_s is None:  # a report of finished runs (`--report`): nothing ran
        return [*md, ""]
    return [*md, "", f"Wall time of this invocation: {wall_s / 60:.1f} min (finished runs and evaluations are "
            "reused).", ""]  # fmt: skip


def write_results(rows: list[dict], arms: list[str], out: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """`results.csv`, `results.md`, `convergence.png`, `summary.json`; prints the verdicts. Returns the summary.
    Every row gains `probe_acc` and `cknna`: its probe accuracy and CKNNA at the base block `meta["base_depth"]`."""
    p: Preset = meta["preset"]
    d0 = meta["base_depth"]
    rows = [{**r, "probe_acc": r[f"probe_acc_l{d0}"], "cknna": r[f"cknna_l{d0}"]} for r in rows]
    rows = sorted(rows, key=lambda r: (arms.index(r["arm"]), r["seed"], r["step"]))
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        writer.writeheader()
        writer.writerows(rows)
    setup = describe(p, meta["config"], d0, sorted({r["seed"] for r in rows}))
    per_arm: dict[str, Any] = {}
    printed = [f"[convergence] {setup}"]
    md = [f"# Convergence: vanilla vs REPA (preset `{preset_name(p)}`)", ""]
    md += [f"Command: `{meta['command']}`", ""] if meta["command"] else []
    md += [setup, "", "Values: mean over seeds [min, max]. Verdict: a mean difference not larger than the seed "
           "spread (the larger of the two arms' max - min over seeds) is **no result**.", ""]  # fmt: skip
    if meta.get("remaining"):
        md += [f"Not finished yet (rerun the command without `--report` to train and evaluate them): "
               f"{', '.join(meta['remaining'])}.", ""]  # fmt: skip
    timed = meta.get("step_times") or {}
    seconds = train_seconds(rows, arms, p.batch_size, timed)
    md += leaderboard_section(rows, arms, p, d0, per_arm, seconds)
    md += speedup_section(rows, arms, per_arm, printed)
    for arm in arms[1:]:
        md += per_step_section(rows, arm, d0, meta["depths"].get(arm), per_arm, printed)
    if "repa" in arms:
        for arm in (a for a in arms[1:] if a != "repa"):
            md += ablation_section(rows, arm, per_arm, printed)
    md += [*cost_section(rows, arms, seconds, bool(timed), meta["wall_s"]), "![convergence](convergence.png)", ""]
    (out / "results.md").write_text("\n".join(md))
    title = f"{preset_name(p)} preset: {p.steps} steps, {len({r['seed'] for r in rows})} seeds, FID-{p.fid_samples}"
    plot(rows, arms, out / "convergence.png", title, seconds)
    summary = {"setup": setup, "command": meta["command"], "wall_s": meta["wall_s"], "rows": len(rows), "arms": per_arm,
               "remaining": meta.get("remaining", [])}  # fmt: skip
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    for line in printed:
        print(line, flush=True)
    print(f"[convergence] wrote {out / 'results.csv'}, results.md, convergence.png, summary.json", flush=True)
    return summary
