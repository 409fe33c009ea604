"""What the convergence benchmark measures and on what budget: presets, arms, ablations, metric constants."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
PROBE_T = 0.25  # the noise level of the probe / CKNNA features (t = 0 data, t = 1 noise)
CKNNA_K = 10
# Tr (S1 S2)^(1/2) by symmetric eigendecompositions: the same value as scipy's sqrtm (ADM) to ~1e-9, ~5x cheaper on
# 2048-d Inception features, and never complex when fewer samples than dimensions make S1 singular.
FID_METHOD = "eigh"
METRICS = {  # name -> (label, lower is better)
    "fid": ("FID", True),
    "probe_acc": ("linear-probe accuracy", False),
    "cknna": ("CKNNA", False),
}


@dataclass(frozen=True)
class Preset:
    """Budget of one benchmark run (see benchmarks/CONVERGENCE.md for how each was sized)."""

    steps: int
    eval_every: int
    batch_size: int
    num_train: int | None  # class-balanced training subset (tiny.yaml: 6000)
    fid_samples: int
    fid_reference: int
    sample_steps: int  # Heun steps of the FID sampler (2 * steps - 1 model evaluations)
    probe_train: int
    probe_test: int
    probe_epochs: int  # Adam, cosine schedule from `probe_lr` (nearly converged on these features, unlike 40 at 1e-3)
    seeds: tuple[int, ...]
    workers: int  # runs trained/evaluated in parallel processes
    threads: int  # torch threads per worker
    device: str
    eval_batch: int = 250
    probe_lr: float = 0.03
    lr: float = 3e-4  # training lr of every arm, fixed here so a change of configs/tiny.yaml's lr keeps the results
    precision: str = "no"  # train.mixed_precision of every arm, fixed for the same reason (tiny.yaml says auto)


PRESETS: dict[str, Preset] = {
    # pipeline check only (2 evals, tiny N): its numbers carry no conclusion
    "smoke": Preset(steps=30, eval_every=15, batch_size=32, num_train=1000, fid_samples=50, fid_reference=200,
                    sample_steps=5, probe_train=500, probe_test=200, probe_epochs=100, seeds=(0, 1), workers=2,
                    threads=1, device="cpu", eval_batch=100),
    # <= 60 min on a quiet 2-core CPU: two single-threaded workers, 4 runs, 4 evals each
    "cpu": Preset(steps=1000, eval_every=250, batch_size=64, num_train=6000, fid_samples=500, fid_reference=2000,
                  sample_steps=10, probe_train=3000, probe_test=1000, probe_epochs=200, seeds=(0, 1), workers=2,
                  threads=1, device="cpu"),
    # sized (not measured here: no GPU) for <= 8 min on one H100
    "gpu": Preset(steps=4000, eval_every=500, batch_size=256, num_train=20000, fid_samples=2000, fid_reference=10000,
                  sample_steps=10, probe_train=5000, probe_test=1000, probe_epochs=200, seeds=(0, 1), workers=1,
                  threads=4, device="cuda", eval_batch=500),
}  # fmt: skip

ABLATIONS = {  # --ablate KEY=V1,V2: one extra REPA arm per value
    "depth": ("model.align_depth", "repa-depth{}"),
    "lambda": ("repa.align_coeff", "repa-lambda{}"),
    "kind": ("repa.align_kind", "repa-{}"),
    "encoder": ("repa.encoders", "repa-{}"),
}
ABLATE_ALL = ("depth=1,4", "lambda=0.25,1.0", "kind=ntxent", "encoder=random-dinov2-vit-s")
# --ablate method=NAME: the REPA family on the embedded default (docs/family.md has each paper's settings). The
# tiny model has 6 blocks and its target is block 8 of the focus DINOv2-S, so the papers' SiT-XL/2 block choices are
# scaled: HASTE's attention pairs (model 5-8 of 28 with encoder 9-12 of 12) become (1, 7), (2, 8), i.e. the two
# blocks up to align_depth with the last two encoder blocks in use; SRA's (8, 20) of 28 becomes (2, 4). HASTE's
# stop point (250k steps in its runs) becomes half the budget: `{half}` is the preset's steps // 2.
METHODS_IREPA = ("model.projector=conv", "repa.spatial_norm=true", "repa.align_coeff=1.0")  # official LDM irepa.yaml
METHODS = {
    "irepa": METHODS_IREPA,
    "haste": (
        "repa.schedule=stop",
        "repa.schedule_stop={half}",
        "repa.attention_align=true",
        "repa.attention_pairs=[[1,7],[2,8]]",
        "repa.cache_targets=false",
    ),  # attention maps run online
    "reg": ("repa.class_token=true",),
    "sra": ("repa.encoders=[]", "repa.self_align=true", "repa.self_align_blocks=[2,4]"),
    # REPA-E: the VAE (data.vae) tuned with the model; only meaningful in latent space (--set data.space=latent
    # --set data.vae=DIR --set model.name=SiT-T/2: see CONVERGENCE.md), where plain repa/vanilla keep it frozen
    "repa-e": ("train.end_to_end=true",),
    # the combination the earlier single-setting ablations suggest (CONVERGENCE.md: NT-Xent 1.33x and alignment at
    # block 4 1.21x vs 1.13x for the paper's default at vanilla's final FID)
    "ntxent-depth4": ("repa.align_kind=ntxent", "model.align_depth=4"),
    # the combination the leaderboard's first seeds suggest (CONVERGENCE.md: iREPA and NT-Xent the two best arms of
    # seed 0, 1.30x and 1.39x vs 1.17x for REPA): iREPA's projector, target normalisation and coefficient, scored with
    # the NT-Xent loss
    "irepa-ntxent": (*METHODS_IREPA, "repa.align_kind=ntxent"),
}
# --ablate leaderboard: every method, with NT-Xent and alignment at block 4 (the two best ablations so far), their
# combination, and NT-Xent with iREPA (the two best arms of the leaderboard's first seeds)
LEADERBOARD = ("method=irepa,haste,reg,sra", "kind=ntxent", "depth=4", "method=ntxent-depth4,irepa-ntxent")


@dataclass(frozen=True)
class Arm:
    """One training recipe: a name and the dotted overrides it applies on top of the base config."""

    name: str
    overrides: tuple[str, ...] = ()


VANILLA = Arm("vanilla", ("repa.encoders=[]", "repa.align_coeff=0.0"))
REPA = Arm("repa")


def parse_ablations(specs: Sequence[str]) -> list[Arm]:
    """`["depth=1,4", "kind=ntxent", "method=irepa"]` (or `["all"]`, `["leaderboard"]`) -> extra arms: REPA with one
    setting changed each, or a REPA-family method (`METHODS`)."""
    shortcuts = {"all": ABLATE_ALL, "leaderboard": LEADERBOARD}
    arms = []
    for spec in [s for item in specs for s in shortcuts.get(item, (item,))]:
        key, _, values = spec.partition("=")
        if key not in (*ABLATIONS, "method") or not values:
            raise ValueError(f"--ablate {spec!r}: expected KEY=V1[,V2] with KEY in {sorted(ABLATIONS)} or "
                             f"method={','.join(METHODS)}, or 'all' / 'leaderboard'")  # fmt: skip
        if key == "method":
            for v in values.split(","):
                if v not in METHODS:
                    raise ValueError(f"--ablate method={v}: unknown method; choose from {', '.join(METHODS)}")
                arms.append(Arm(v, METHODS[v]))
            continue
        field, name = ABLATIONS[key]
        for v in values.split(","):
            value = f"[{v}]" if key == "encoder" else v
            arms.append(Arm(name.format(v), (f"{field}={value}",)))
    return arms


def eval_steps(p: Preset) -> list[int]:
    """The evaluated steps: every `eval_every` steps, and always the last step."""
    steps = list(range(p.eval_every, p.steps + 1, p.eval_every))
    return steps if steps and steps[-1] == p.steps else [*steps, p.steps]


def preset_from_dict(values: dict[str, Any]) -> Preset:
    """A `Preset` from its `dataclasses.asdict` form as JSON gives it back (seeds as a list)."""
    return Preset(**{**values, "seeds": tuple(values["seeds"])})


def device_of(p: Preset) -> torch.device:
    return torch.device("cuda" if p.device == "cuda" and torch.cuda.is_available() else "cpu")


def preset_name(p: Preset) -> str:
    return next((name for name, q in PRESETS.items() if q == p), "custom")
