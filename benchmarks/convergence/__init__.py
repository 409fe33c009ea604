"""Convergence benchmark (issue #5): vanilla vs REPA on Fashion-MNIST, FID / linear probe / CKNNA vs training steps.

Every arm trains `configs/tiny.yaml` with identical model, data, seed, batch and budget; only the REPA settings
differ (vanilla: no encoder, lambda = 0). Checkpoints are written every `eval_every` steps and evaluated afterwards
(the loop resumes exactly, so this equals evaluating during training):

- FID: `fid_samples` EMA samples (Heun ODE, `sample_steps` steps, no CFG, class-balanced labels, the same noise for
  every arm and checkpoint) against the Inception statistics of the first `fid_reference` class-balanced
  Fashion-MNIST *test* images (computed once, cached under the repa cache). A small-N FID: comparable between arms
  and steps of one preset, not with FID-10k/50k numbers.
- Linear probe: test accuracy of a BatchNorm + linear probe on mean-pooled hidden tokens after block `align_depth`
  of the EMA model, inputs noised to t = 0.25 with the null label (REPA Sec. 3.2); `probe_train` train-split and
  `probe_test` test-split images.
- CKNNA (k = 10) between those pooled hidden states of the `probe_test` images and the mean-pooled patch tokens of
  the preset's target encoder (the REPA arm's, for every arm).

Outputs in `--out`: `results.csv` (one row per arm, seed, evaluated step), `results.md`, `convergence.png` (metric
vs steps, mean over seeds with a min-max band), `summary.json`; per-run folders under `runs/` hold checkpoints and
`evals/step_*.json`, so rerunning the same command resumes and reuses finished evaluations.

Offline (`bundle`, `deferred`): `--bundle DIR` packs what a preset needs (images, float16 encoder weights, config)
into one folder; `--from-bundle DIR` runs from it alone with the FID deferred (samples packed into
`<out>/deferred/`); `--score-samples DIR` scores them where the Inception network is and writes the same report.

Cost (`timing`): `--time-steps N` times every arm's training step side by side in one process into
`<out>/step_times.json`; the report's s/step column uses it instead of the runs' logged rates.
"""

from benchmarks.convergence import bundle, deferred, evaluate
from benchmarks.convergence.cli import add_arguments, main, run
from benchmarks.convergence.jobs import run_benchmark
from benchmarks.convergence.presets import PRESETS, Arm, Preset, parse_ablations
from benchmarks.convergence.stats import iso_fid_speedups, speedup, steps_to_reach, verdict
from benchmarks.convergence.timing import time_arms

__all__ = ["PRESETS", "Arm", "Preset", "add_arguments", "bundle", "deferred", "evaluate", "iso_fid_speedups", "main",
           "parse_ablations", "run", "run_benchmark", "speedup", "steps_to_reach", "time_arms", "verdict"]  # fmt: skip
