"""Curves and verdicts over result rows: seed means and spread, steps to reach a target, speed-ups, iso-FID."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any


def steps_to_reach(
    steps: Sequence[int], values: Sequence[float], target: float, lower_is_better: bool = True
) -> tuple[int | None, float | None]:
    """First evaluated step at which a curve reaches `target`, on the grid and linearly interpolated.

    Args:
        steps: evaluated steps, increasing.
        values: the metric at those steps.
        target: the level to reach (e.g. vanilla's final FID).
        lower_is_better: reaching means value <= target (FID) instead of value >= target (accuracy).

    Returns:
        (grid step, interpolated step): the grid step is the first evaluated step that reaches the target; the
        interpolated step solves the straight line through it and the previous evaluation for the target (the grid
        step itself when it is the first evaluation: nothing is known before it). (None, None) if never reached.
    """
    sign = 1.0 if lower_is_better else -1.0
    for i, (s, v) in enumerate(zip(steps, values)):
        if sign * (v - target) <= 0:
            if i == 0:
                return int(s), float(s)
            s0, v0 = steps[i - 1], values[i - 1]
            frac = (v0 - target) / (v0 - v) if v0 != v else 1.0
            return int(s), float(s0 + frac * (s - s0))
    return None, None


def spread(values: Sequence[float]) -> float:
    """Seed spread of one arm at one step: max - min over seeds (0 for a single seed)."""
    return max(values) - min(values) if values else math.nan


def verdict(base: Sequence[float], other: Sequence[float], lower_is_better: bool) -> str:
    """Compare two arms' per-seed values: a mean difference within the larger seed spread is no result."""
    if min(len(base), len(other)) < 2:
        return "no result (one seed: no spread)"
    diff = statistics.mean(other) - statistics.mean(base)
    noise = max(spread(base), spread(other))
    if abs(diff) <= noise:
        return f"no result (mean diff {abs(diff):.3g} <= seed spread {noise:.3g})"
    better = (diff < 0) == lower_is_better
    return f"{'better' if better else 'worse'} (mean diff {abs(diff):.3g} > seed spread {noise:.3g})"


def curves(rows: list[dict], arm: str, key: str) -> tuple[list[int], dict[int, list[float]]]:
    """{seed: values over steps} of one arm for one CSV column, on the steps every seed has."""
    by_seed: dict[int, dict[int, float]] = {}
    for r in rows:
        if r["arm"] == arm and r.get(key) is not None:
            by_seed.setdefault(r["seed"], {})[r["step"]] = float(r[key])
    if not by_seed:
        return [], {}
    steps = sorted(set.intersection(*(set(v) for v in by_seed.values())))
    return steps, {seed: [v[s] for s in steps] for seed, v in sorted(by_seed.items())}


def seed_mean(per_seed: dict[int, list[float]], length: int) -> list[float]:
    """The seed-mean curve of `curves`' per-seed values."""
    return [statistics.mean(v[i] for v in per_seed.values()) for i in range(length)]


def finals(rows: list[dict], arm: str, key: str) -> list[float]:
    """Each seed's value at the last step every seed has."""
    return [c[-1] for c in curves(rows, arm, key)[1].values()]


def speedup(rows: list[dict], arm: str, base: str = "vanilla") -> dict[str, Any]:
    """Steps for `arm` to reach `base`'s final FID: on the seed-mean curves and per seed (paired by seed)."""
    steps_b, fid_b = curves(rows, base, "fid")
    steps_a, fid_a = curves(rows, arm, "fid")
    if not steps_b or not steps_a:
        return {}
    final = steps_b[-1]
    target = statistics.mean(v[-1] for v in fid_b.values())
    mean_a = seed_mean(fid_a, len(steps_a))
    grid, interp = steps_to_reach(steps_a, mean_a, target)
    per_seed = {}
    for seed in sorted(set(fid_a) & set(fid_b)):
        g, _ = steps_to_reach(steps_a, fid_a[seed], fid_b[seed][-1])
        per_seed[seed] = final / g if g else None
    final_verdict = verdict([v[-1] for v in fid_b.values()], [v[-1] for v in fid_a.values()], True)
    is_result = final_verdict.startswith("better") and all(r is not None and r > 1 for r in per_seed.values())
    return {
        "target_fid": target, "base_final_step": final, "grid_step": grid, "interp_step": interp,
        "ratio_grid": final / grid if grid else None, "ratio_interp": final / interp if interp else None,
        "ratio_per_seed": per_seed, "final_fid_verdict": final_verdict,
        "verdict": "result" if is_result else "no result",
    }  # fmt: skip


def iso_fid_speedups(rows: list[dict], arm: str, base: str = "vanilla") -> list[dict[str, Any]]:
    """For every evaluated step of `base`: the (interpolated) step at which `arm`'s seed-mean FID first reaches
    `base`'s seed-mean FID there, and the ratio base step / arm step (the speed-up at that quality level).

    Returns:
        one dict per base step: base_step, target_fid, arm_step (None if never reached), ratio (None likewise),
        lower_bound: the level was reached at `arm`'s first evaluation, which has no earlier point to interpolate
        from, so arm_step is that evaluation and the ratio a lower bound.
    """
    steps_b, fid_b = curves(rows, base, "fid")
    steps_a, fid_a = curves(rows, arm, "fid")
    if not steps_b or not steps_a:
        return []
    mean_a = seed_mean(fid_a, len(steps_a))
    out = []
    for step, target in zip(steps_b, seed_mean(fid_b, len(steps_b))):
        _, at = steps_to_reach(steps_a, mean_a, target)
        out.append({"base_step": step, "target_fid": target, "arm_step": at, "ratio": step / at if at else None,
                    "lower_bound": at == steps_a[0]})  # fmt: skip
    return out
