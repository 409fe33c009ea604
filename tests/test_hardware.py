"""CPU bf16 detection from /proc/cpuinfo text and the start-up precision line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from repa import hardware

ZEN3 = """processor\t: 0
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse sse2 avx avx2 fma f16c vaes
processor\t: 1
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse sse2 avx avx2 fma f16c vaes
"""
ZEN4 = "model name\t: AMD EPYC 9B14\nflags\t\t: avx2 avx512f avx512bw avx512_bf16 avx512_vnni\n"
SAPPHIRE = "model name\t: Intel(R) Xeon(R) Platinum 8481C\nflags\t\t: avx512f avx512_bf16 amx_bf16 amx_tile\n"
GRAVITON3 = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes sha3 sve bf16 i8mm\nCPU part\t: 0xd40\n"
GRAVITON2 = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes crc32 atomics\n"


@pytest.mark.parametrize(
    "text, native, features, cpu",
    [
        (ZEN3, False, (), "AMD EPYC 7B13"),
        (ZEN4, True, ("AVX-512 BF16",), "AMD EPYC 9B14"),
        (SAPPHIRE, True, ("AVX-512 BF16", "AMX-BF16"), "Intel(R) Xeon(R) Platinum 8481C"),
        (GRAVITON3, True, ("Arm BF16",), ""),
        (GRAVITON2, False, (), ""),
        ("", False, (), ""),
    ],
)
def test_parse_cpuinfo(text, native, features, cpu):
    info = hardware.parse_cpuinfo(text)
    assert (info.native, info.features, info.cpu) == (native, features, cpu)


def test_precision_line_says_what_runs_and_why(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_bf16", lambda: hardware.parse_cpuinfo(ZEN3))
    line = hardware.precision_line("bf16", "cpu")
    assert "bf16 autocast" in line and "emulated" in line and "train.mixed_precision=no runs faster" in line
    assert hardware.precision_line("no", "cpu").startswith("precision: fp32 (AMD EPYC 7B13 has no bf16")
    monkeypatch.setattr(hardware, "cpu_bf16", lambda: hardware.parse_cpuinfo(SAPPHIRE))
    assert "run natively" in hardware.precision_line("bf16", "cpu")
    assert "train.mixed_precision=bf16 is faster" in hardware.precision_line("no", "cpu")
    assert hardware.precision_line("bf16", "cuda") == "precision: bf16 autocast on cuda"
    assert hardware.precision_line("no", "cuda") == "precision: fp32 on cuda"


def test_this_machine_is_described():
    info = hardware.cpu_bf16()
    assert isinstance(info.native, bool) and info.describe()


def test_auto_precision_is_bf16_only_where_it_runs_natively(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_bf16", lambda: hardware.parse_cpuinfo(ZEN3))
    assert hardware.resolve_precision("auto", "cpu") == "no"
    assert hardware.precision_line("auto", "cpu").startswith("precision: fp32 (train.mixed_precision=auto; AMD EPYC")
    monkeypatch.setattr(hardware, "cpu_bf16", lambda: hardware.parse_cpuinfo(SAPPHIRE))
    assert hardware.resolve_precision("auto", "cpu") == "bf16"
    assert hardware.precision_line("auto", "cpu").startswith("precision: bf16 autocast (train.mixed_precision=auto;")
    for explicit in ("no", "bf16", "fp16"):  # an explicit choice is kept, whatever the hardware
        assert hardware.resolve_precision(explicit, "cpu") == explicit
    monkeypatch.setattr(hardware.torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert hardware.resolve_precision("auto", "cuda") == "no"
    monkeypatch.setattr(hardware.torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert hardware.resolve_precision("auto", "cuda") == "bf16"
    assert (
        hardware.precision_line("auto", "cuda")
        == "precision: bf16 autocast (train.mixed_precision=auto; cuda has bf16)"
    )


def test_the_accelerator_runs_what_auto_resolves_to():
    """`make_accelerator("auto")` hands Accelerate the machine's choice (a subprocess: Accelerate's state is
    process-wide, and the other tests run fp32)."""
    code = ("from repa import distributed, hardware; acc = distributed.make_accelerator('auto', cpu=True); "
            "print(acc.mixed_precision, hardware.resolve_precision('auto', 'cpu'))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    ran, chosen = out.stdout.split()
    assert ran == chosen and chosen in ("bf16", "no")
