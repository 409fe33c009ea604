"""What the machine's CPU can do natively, and which training precision that makes sensible.

bf16 autocast on a CPU pays off only where the CPU has bf16 instructions (x86: AVX-512 BF16 or AMX; Arm: the BF16
extension). Elsewhere oneDNN emulates bf16 and a matmul can run dozens of times slower than in fp32 (measured on a
Zen 3 EPYC with AVX2 only: 0.8 vs 40 GFLOP/s at 1024^3), so `repa train` and the step benchmark say which precision
runs and why.
"""

from __future__ import annotations

import contextlib
import functools
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch

# /proc/cpuinfo flag -> the name people know it by
_X86_BF16 = {"avx512_bf16": "AVX-512 BF16", "amx_bf16": "AMX-BF16"}
_ARM_BF16 = {"bf16": "Arm BF16"}


@dataclass(frozen=True)
class CpuBf16:
    """`native`: bf16 matmuls run on bf16 instructions; `features`: the instruction sets found; `cpu`: model name."""

    native: bool
    features: tuple[str, ...]
    cpu: str

    def describe(self) -> str:
        if self.native:
            return f"{self.cpu or 'this CPU'} has {' + '.join(self.features)}: bf16 matmuls run natively"
        return (f"{self.cpu or 'this CPU'} has no bf16 instructions (AVX-512 BF16 / AMX / Arm BF16): bf16 is "
                "emulated, many times slower than fp32")  # fmt: skip


def parse_cpuinfo(text: str) -> CpuBf16:
    """CPU bf16 support from the text of /proc/cpuinfo (the first processor's flags / Features line)."""
    flags: set[str] = set()
    model = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("flags", "features") and not flags:
            flags = set(value.split())
        elif key in ("model name", "cpu model") and not model:
            model = value.strip()
    table = _ARM_BF16 if "asimd" in flags else _X86_BF16
    found = tuple(name for flag, name in table.items() if flag in flags)
    return CpuBf16(bool(found), found, model)


@functools.lru_cache(maxsize=1)
def cpu_bf16() -> CpuBf16:
    """This machine's CPU bf16 support (Linux: /proc/cpuinfo; macOS on Apple silicon: sysctl FEAT_BF16)."""
    with contextlib.suppress(OSError):
        return parse_cpuinfo(Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace"))
    if platform.system() == "Darwin" and platform.machine() == "arm64":
        try:
            out = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_BF16", "machdep.cpu.brand_string"],
                                 capture_output=True, text=True, timeout=5).stdout.split("\n")  # fmt: skip
        except (OSError, subprocess.SubprocessError):
            out = []
        native = bool(out) and out[0].strip() == "1"
        return CpuBf16(native, ("Arm BF16",) if native else (), out[1].strip() if len(out) > 1 else "Apple silicon")
    return CpuBf16(False, (), platform.processor())


def resolve_precision(mixed_precision: str, device_type: str) -> str:
    """`train.mixed_precision` as it runs on this machine: "auto" becomes "bf16" where bf16 matmuls run natively
    (a CUDA GPU that supports bf16, a CPU with bf16 instructions) and "no" (fp32) elsewhere; other values unchanged."""
    if mixed_precision != "auto":
        return mixed_precision
    if device_type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    return "bf16" if device_type == "cpu" and cpu_bf16().native else "no"


def precision_line(mixed_precision: str, device_type: str) -> str:
    """One line for a run's start-up: the precision that runs and why (with advice where another would be faster)."""
    if mixed_precision == "auto":
        chosen = resolve_precision(mixed_precision, device_type)
        what = "bf16 autocast" if chosen == "bf16" else "fp32"
        why = (
            cpu_bf16().describe()
            if device_type == "cpu"
            else f"{device_type} {'has' if chosen == 'bf16' else 'lacks'} bf16"
        )
        return f"precision: {what} (train.mixed_precision=auto; {why})"
    if device_type != "cpu":
        return f"precision: {'fp32' if mixed_precision == 'no' else mixed_precision + ' autocast'} on {device_type}"
    info = cpu_bf16()
    if mixed_precision == "bf16":
        if info.native:
            return f"precision: bf16 autocast ({info.describe()})"
        return (f"precision: bf16 autocast, as train.mixed_precision asks, but {info.describe()}; "
                "train.mixed_precision=no runs faster here")  # fmt: skip
    if mixed_precision == "fp16":
        return "precision: fp16 autocast on the CPU (no fp16 matmul units on most CPUs: expect it slower than fp32)"
    if info.native:
        return f"precision: fp32 (train.mixed_precision=no; {info.describe()}: train.mixed_precision=bf16 is faster)"
    return f"precision: fp32 ({info.cpu or 'this CPU'} has no bf16 instructions: bf16 would be emulated, slower)"
