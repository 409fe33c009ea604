"""`repa train CONFIG [section.key=value ...]`: train from a YAML preset; rerunning the same command resumes."""

from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML preset, e.g. configs/tiny.yaml")
    p.add_argument("overrides", nargs="*",
                   help="dotted overrides, e.g. train.max_steps=200 repa.align_coeff=0; fine-tune with "
                        "model.init_from=last.pt, decay the lr with optim.lr_schedule=cosine optim.final_lr=1e-6, "
                        "track with train.trackers=[tensorboard,wandb]")  # fmt: skip
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--allow-config-change", action="store_true",
                   help="resume even though the config changes the model or the training maths (e.g. optim.lr); "
                        "every change is recorded in <run_dir>/config_changes.jsonl. Harmless changes (max_steps, "
                        "log/sample/checkpoint intervals, threads) need no flag; the model's shape can never change")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from repa.config import load_config, to_dict

    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        import yaml

        print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        return 0
    from repa.training import train

    summary = train(cfg, allow_config_change=True) if args.allow_config_change else train(cfg)
    from repa.distributed import print0

    print0(f"[repa] done: {json.dumps(summary['metrics'])}")
    print0(f"[repa] run directory: {summary['run_dir']} (samples/, metrics.jsonl, checkpoints/, config.yaml)")
    return 0
