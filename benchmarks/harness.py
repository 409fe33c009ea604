"""One instrumented REPA training step: benchmark modes (official-like vs ours), phase timers, GEMM rate, FLOPs.

A `StepRunner` owns everything one mode needs (model, EMA, optimizer, loss, optional encoder, one fixed batch)
and runs full training steps, timing each phase. The maths is the same in every mode with the same targets
(same model, loss, AdamW hyper-parameters, clipping, EMA decay); modes differ only in how the step is run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import resource
import statistics
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

PHASES = ("encoder", "forward", "backward", "optimizer", "ema", "other")
PHASE_HELP = {
    "encoder": "frozen encoder forward (preprocessing included); 0 for cached targets and vanilla",
    "forward": "interpolant, model forward, denoising + alignment loss",
    "backward": "loss.backward()",
    "optimizer": "clip_grad_norm_(1.0), AdamW step, zero_grad",
    "ema": "EMA update (decay 0.9999)",
    "other": "per-step logging: `.item()` of loss terms and grad norm (official-like); malloc_trim (+trim)",
}


@dataclass(frozen=True)
class Mode:
    """How a training step is run. The maths (model, loss, optimizer hyper-parameters) is fixed.

    Attributes:
        name: label in tables.
        targets: "online" (encoder forward every step), "cached" (precomputed targets; a random tensor of the
            encoder's output shape stands in for the cache read), "none" (vanilla: no encoder, no projector).
        optimizer: AdamW implementation: "loop" (foreach=False, one kernel per parameter), "foreach", "fused".
        ema: "loop" (the official per-parameter `mul_().add_()` loop) or "foreach" (`repa.training.ema.EMA`).
        sync: read the loss terms and grad norm on the host (`.item()`) every step, as the official logging does.
        compile: `torch.compile` the diffusion model (the loss and the optimizer stay eager).
        compile_encoder: `torch.compile` the frozen encoder.
        encoder_ctx: grad mode around the encoder: "no_grad" (official) or "inference" (`torch.inference_mode`).
        attention: "default" SDPA dispatch, or "math" to force the unfused reference kernel (an ablation).
        grads_to_none: `zero_grad(set_to_none=...)`; False keeps gradient buffers alive between steps.
        mmap_threshold: glibc `M_MMAP_THRESHOLD` in bytes for the worker process (None: glibc's default, a
            threshold that grows up to 32 MiB, after which freed activations stay in the heap and count in RSS).
        thp: `THP_MEM_ALLOC_ENABLE=1` for the worker: torch backs allocations >= 2 MiB with transparent huge
            pages (fewer page faults and TLB misses).
        memory_budget: with `compile`, `torch._functorch.config.activation_memory_budget` (1.0 = save what the
            min-cut partitioner saves; lower = recompute more in the backward, cheapest ops, i.e. pointwise, first).
        trim: `malloc_trim(0)` after the encoder and at the end of every step: glibc hands the free pages of its
            heaps back to the OS, so the holes left by freed activations do not stay resident.
        precision: "fp32" / "bf16" for this mode (`+fp32`, `+bf16`); None: the run's `BenchConfig.precision`. The
            GEMM rate and MFU of the mode are measured at its own precision.
    """

    name: str
    targets: Literal["online", "cached", "none"]
    optimizer: Literal["loop", "foreach", "fused"] = "fused"
    ema: Literal["loop", "foreach"] = "foreach"
    sync: bool = False
    compile: bool = False
    compile_encoder: bool = False
    encoder_ctx: Literal["no_grad", "inference"] = "inference"
    attention: Literal["default", "math"] = "default"
    grads_to_none: bool = True
    mmap_threshold: int | None = None
    thp: bool = False
    memory_budget: float | None = None
    trim: bool = False
    precision: Literal["fp32", "bf16"] | None = None

    def environment(self) -> dict[str, str]:
        """Environment variables the mode's worker process must start with (read at process start-up)."""
        env = {}
        if self.mmap_threshold is not None:
            env["MALLOC_MMAP_THRESHOLD_"] = str(self.mmap_threshold)
        if self.thp:
            env["THP_MEM_ALLOC_ENABLE"] = "1"
        return env


# official-like: what the official REPA train.py does (AdamW with PyTorch's CPU default foreach=False, the
# `update_ema` loop, `.item()` logging every step, encoder under no_grad, eager model). ours: fused AdamW,
# foreach EMA, no per-step host sync, encoder under inference_mode, torch.compile of the model (`+budget50`: with
# an activation-memory budget of 0.5, pointwise ops recomputed in the backward). See benchmarks/README.md.
_OFFICIAL = dict(optimizer="loop", ema="loop", sync=True, encoder_ctx="no_grad")
_OURS = dict(compile=True)
BASE_MODES: dict[str, Mode] = {
    "official-like": Mode("official-like", "online", **_OFFICIAL),
    "ours-online": Mode("ours-online", "online", **_OURS),
    "ours-cached": Mode("ours-cached", "cached", **_OURS),
    "vanilla": Mode("vanilla", "none", **_OURS),
    "official-vanilla": Mode("official-vanilla", "none", **_OFFICIAL),
}
MODIFIERS: dict[str, dict[str, Any]] = {
    "compile": dict(compile=True),
    "eager": dict(compile=False, memory_budget=None),
    "budget100": dict(memory_budget=None),
    "compile-enc": dict(compile_encoder=True),
    "loop-adamw": dict(optimizer="loop"),
    "foreach-adamw": dict(optimizer="foreach"),
    "fused-adamw": dict(optimizer="fused"),
    "loop-ema": dict(ema="loop"),
    "foreach-ema": dict(ema="foreach"),
    "sync": dict(sync=True),
    "no-sync": dict(sync=False),
    "no-grad-enc": dict(encoder_ctx="no_grad"),
    "inference-enc": dict(encoder_ctx="inference"),
    "math-attn": dict(attention="math"),
    "keep-grads": dict(grads_to_none=False),
    "mmap": dict(mmap_threshold=1 << 20),
    "mmap64k": dict(mmap_threshold=1 << 16),
    "thp": dict(thp=True),
    "trim": dict(trim=True),
    "fp32": dict(precision="fp32"),
    "bf16": dict(precision="bf16"),
    **{f"budget{p}": dict(memory_budget=p / 100) for p in (10, 20, 30, 50, 70)},
}


def parse_mode(text: str) -> Mode:
    """A base mode with optional `+modifier` suffixes, e.g. "ours-cached+compile" or "ours-online+foreach-adamw".

    Raises:
        ValueError: unknown base mode or modifier (the message lists the valid ones).
    """
    base, *mods = text.strip().split("+")
    if base not in BASE_MODES:
        raise ValueError(f"unknown mode {base!r}; choose from {sorted(BASE_MODES)} (+ modifiers {sorted(MODIFIERS)})")
    mode = BASE_MODES[base]
    for mod in mods:
        if mod not in MODIFIERS:
            raise ValueError(f"unknown mode modifier {mod!r} in {text!r}; choose from {sorted(MODIFIERS)}")
        mode = dataclasses.replace(mode, **MODIFIERS[mod])
    return dataclasses.replace(mode, name=text.strip())


@dataclass
class BenchConfig:
    """What is trained: model, batch, device, precision, encoder (random weights of the real architecture).

    Attributes:
        model: a `repa.models.MODELS` key.
        batch: images per step.
        device: "cpu" or "cuda".
        precision: "fp32", or "bf16" autocast for the encoder and the model forward (weights stay fp32).
        encoder: a `repa.encoders.ENCODERS` key; built with `random_init=True` (timing needs no weights).
        encoder_resolution: encoder input side after its bicubic resize (224: DINOv2's 16x16 grid).
        image_size: side of the raw uint8 images fed to the encoder (256 for ImageNet 256 latents).
        threads: `torch.set_num_threads` (None leaves it).
        seed: weights and batch seed (identical across modes).
        model_overrides: `build_model` overrides (tiny smoke runs).
        encoder_overrides: encoder architecture overrides (tiny smoke runs).
    """

    model: str = "SiT-B/2"
    batch: int = 8
    device: str = "cpu"
    precision: Literal["fp32", "bf16"] = "fp32"
    encoder: str = "dinov2-vit-b"
    encoder_resolution: int = 224
    image_size: int = 256
    threads: int | None = 2
    seed: int = 0
    model_overrides: dict[str, Any] = field(default_factory=dict)
    encoder_overrides: dict[str, Any] = field(default_factory=dict)


@torch.no_grad()
def ema_update_loop(shadow: nn.Module, model: nn.Module, decay: float) -> None:
    """The official REPA `update_ema`: parameters looked up by name, one `mul_` and one `add_` each."""
    ema_params = OrderedDict(shadow.named_parameters())
    for name, param in model.named_parameters():
        ema_params[name.replace("module.", "")].mul_(decay).add_(param.data, alpha=1 - decay)


def malloc_trim() -> bool:
    """glibc `malloc_trim(0)`: return free heap memory to the OS (False where glibc is not the allocator)."""
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    return bool(_LIBC and _LIBC.malloc_trim(0))


_LIBC: Any = None


def make_optimizer(params: list[nn.Parameter], kind: str) -> torch.optim.Optimizer:
    """AdamW with the official REPA hyper-parameters (lr 1e-4, betas (0.9, 0.999), eps 1e-8, no weight decay)."""
    impl = {"loop": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}[kind]
    return torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, **impl)


def encoder_geometry(cfg: BenchConfig) -> tuple[int, int]:
    """(embed_dim, num_tokens) of the configured encoder, read from the registry without building it."""
    from repa.encoders.registry import ENCODERS

    arch = {**ENCODERS[cfg.encoder].config, **cfg.encoder_overrides}
    if "hidden_size" not in arch or "patch_size" not in arch:
        enc = _build_encoder(cfg)
        return enc.embed_dim, enc.num_tokens
    side = cfg.encoder_resolution // int(arch["patch_size"])
    return int(arch["hidden_size"]), side * side


def _build_encoder(cfg: BenchConfig) -> nn.Module:
    from repa.encoders import load_encoder

    overrides = cfg.encoder_overrides or None
    return load_encoder(cfg.encoder, cfg.encoder_resolution, random_init=True, config_overrides=overrides,
                        device=cfg.device, seed=cfg.seed)  # fmt: skip


def encoder_forward_flops(encoder: nn.Module, batch: int) -> int:
    """FLOPs (2 per multiply-add) of one ViT encoder forward: patch embedding, linears and the two attention
    matmuls over patch + prefix tokens (the convention of `repa.models.forward_flops`); 0 if not a ViT."""
    cfg = getattr(getattr(encoder, "model", None), "config", None)
    if cfg is None or not hasattr(cfg, "hidden_size"):
        return 0
    d, layers, p = cfg.hidden_size, cfg.num_hidden_layers, encoder.patch_size
    mlp = getattr(cfg, "intermediate_size", None) or int(d * getattr(cfg, "mlp_ratio", 4))
    patches = encoder.num_tokens
    n = patches + int(getattr(encoder, "num_prefix", 0))
    macs = patches * 3 * p * p * d + layers * (n * (4 * d * d + 2 * d * mlp) + 2 * n * n * d)
    return 2 * batch * macs


def peak_memory_bytes(device: torch.device) -> int:
    """Peak device memory allocated by tensors (CUDA) or the process's peak resident set size (CPU) since the
    start or the last `reset_peak_memory`."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux


def reset_peak_memory(device: torch.device) -> bool:
    """Restart the peak: `torch.cuda.reset_peak_memory_stats`, or on Linux "5" to /proc/self/clear_refs (resets
    VmHWM and `ru_maxrss` to the current RSS). False where it cannot be reset."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def gemm_shape(model: nn.Module, batch: int) -> tuple[int, int, int]:
    """(M, K, N) of the representative GEMM: the model's MLP first linear over all tokens of the batch, widened to
    at least 768 channels (narrower GEMMs, e.g. SiT-S's 384, run below the matmul rate the encoder's reach)."""
    d = max(model.hidden_size, 768)
    return batch * model.num_patches, d, int(d * model.config["mlp_ratio"])


def gemm_flops_per_s(
    shape: tuple[int, int, int], device: torch.device, dtype: torch.dtype, reps: int = 3
) -> dict[str, float]:
    """Measured matmul throughput of `torch.mm` at (M, K, N), 2 FLOPs per multiply-add, median over `reps`.

    Returns:
        {"wall": FLOP/s} and on the CPU also {"cpu": FLOP per second of main-thread CPU time}.
    """
    m, k, n = shape
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)
    out = torch.empty(m, n, device=device, dtype=dtype)
    inner = 20 if device.type == "cuda" else 1  # one GPU GEMM is too short to time alone
    torch.mm(a, b, out=out)  # warm-up (first touch of the pages, kernel selection)
    wall, cpu = [], []
    for _ in range(reps):
        _sync(device)
        w0, c0 = time.perf_counter(), time.thread_time()
        for _ in range(inner):
            torch.mm(a, b, out=out)
        _sync(device)
        wall.append((time.perf_counter() - w0) / inner)
        cpu.append((time.thread_time() - c0) / inner)
    del a, b, out
    flops = 2.0 * m * k * n
    rates = {"wall": flops / statistics.median(wall)}
    if device.type != "cuda":
        rates["cpu"] = flops / max(statistics.median(cpu), 1e-9)
    return rates


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer:
    """Phase marks per step. CPU: wall clock (`perf_counter`) and the main thread's CPU time (`thread_time`): the
    time the step's thread actually ran, i.e. roughly the wall time on cores not shared with other jobs (the main
    thread does its share of every OpenMP region and all serial work). GPU: CUDA events, recorded without host
    syncs and read once in `collect`, so a mode without per-step syncs keeps its CPU/GPU overlap."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._steps: list[list[tuple[str, Any]]] = []
        self._marks: list[tuple[str, Any]] = []

    def _now(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter(), time.thread_time()

    def start(self) -> None:
        self._marks = [("start", self._now())]

    def mark(self, phase: str) -> None:
        self._marks.append((phase, self._now()))

    def end_step(self) -> None:
        self._steps.append(self._marks)
        self._marks = []

    def _seconds(self, a: Any, b: Any) -> dict[str, float]:
        if self.cuda:
            return {"wall": a.elapsed_time(b) / 1e3}
        return {"wall": b[0] - a[0], "cpu": b[1] - a[1]}

    def collect(self) -> list[dict[str, dict[str, float]]]:
        """Per step ended since the last call: {clock: {phase: seconds, "total": seconds}}."""
        if self.cuda:
            torch.cuda.synchronize()
        out = []
        for marks in self._steps:
            row: dict[str, dict[str, float]] = {}
            for (_, a), (name, b) in [*zip(marks, marks[1:]), (marks[0], ("total", marks[-1][1]))]:
                for clock, sec in self._seconds(a, b).items():
                    row.setdefault(clock, {})[name] = sec
            out.append(row)
        self._steps = []
        return out


class StepRunner:
    """Model, EMA, optimizer, loss, optional encoder and one fixed batch for one `Mode`; `step()` trains once.

    The batch is drawn once (seeded) and reused: timing does not depend on the values. Per-step draws (t, noise,
    label-drop mask) are pre-drawn like the loop's `step_draws`, so their (tiny) cost is not timed.
    """

    def __init__(self, cfg: BenchConfig, mode: Mode) -> None:
        from repa.losses import RepaLoss
        from repa.models import build_model, forward_flops
        from repa.training.ema import EMA
        from repa.training.setup import compile_model

        self.cfg = dataclasses.replace(cfg, precision=mode.precision) if mode.precision else cfg
        self.mode = mode
        cfg = self.cfg
        self.device = device = torch.device(cfg.device)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        repa = mode.targets != "none"
        enc_dim, enc_tokens = encoder_geometry(cfg) if repa else (0, 0)
        torch.manual_seed(cfg.seed)
        with device:  # initialise on the device (fast for XL/2 on a GPU)
            self.model = build_model(cfg.model, encoder_dims=[enc_dim] if repa else [], **cfg.model_overrides)
            self.ema = EMA(self.model, decay=0.9999)
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = make_optimizer(self.params, mode.optimizer)
        self.loss = RepaLoss(path="linear", align_coeff=0.5)
        self.encoder = _build_encoder(cfg) if mode.targets == "online" else None
        self.fwd_model = compile_model(self.model, mode.memory_budget) if mode.compile else self.model
        self._peak_before, self._peak_reset = 0, False  # set by start_measuring
        self.encode = (
            torch.compile(self.encoder) if (self.encoder is not None and mode.compile_encoder) else self.encoder
        )
        self._make_batch(enc_dim, enc_tokens)
        self.model_flops = 3 * forward_flops(self.model, cfg.batch, include_projectors=repa)  # fwd + 2x fwd bwd
        self.encoder_flops = encoder_forward_flops(self.encoder, cfg.batch) if self.encoder is not None else 0
        self.step_flops = self.model_flops + self.encoder_flops
        self.gemm = gemm_shape(self.model, cfg.batch)
        self.timer = StepTimer(device)
        self.steps_done = 0
        self.last_log: dict[str, float] = {}
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None

    def _make_batch(self, enc_dim: int, enc_tokens: int) -> None:
        cfg, dev, m = self.cfg, self.device, self.model
        g = torch.Generator().manual_seed(cfg.seed + 1)
        b, c, s = cfg.batch, m.in_channels, m.input_size
        self.x = torch.randn(b, c, s, s, generator=g).to(dev)  # (B, C, H, W) latents
        self.y = torch.randint(0, m.num_classes, (b,), generator=g).to(dev)
        self.t = torch.rand(b, generator=g).to(dev)
        self.noise = torch.randn(b, c, s, s, generator=g).to(dev)
        drop = (torch.rand(b, generator=g) < 0.1).long().to(dev)
        self.model_kwargs = {"force_drop_ids": drop}
        self.images = None
        self.cached_targets = None
        if self.mode.targets == "online":
            shape = (b, 3, cfg.image_size, cfg.image_size)
            self.images = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8).to(dev)
        elif self.mode.targets == "cached":  # stands in for reading (B, N, D) fp32 tokens from the target cache
            self.cached_targets = [torch.randn(b, enc_tokens, enc_dim, generator=g).to(dev)]

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.cfg.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _attention(self) -> contextlib.AbstractContextManager:
        if self.mode.attention == "math":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            return sdpa_kernel([SDPBackend.MATH])
        return contextlib.nullcontext()

    def _encoder_ctx(self) -> contextlib.AbstractContextManager:
        return torch.inference_mode() if self.mode.encoder_ctx == "inference" else torch.no_grad()

    def step(self) -> None:
        """One training step: encoder (online), forward + loss, backward, clip + AdamW, EMA, logging."""
        mode, tm = self.mode, self.timer
        tm.start()
        targets = self.cached_targets
        if self.encode is not None:
            with self._encoder_ctx(), self._autocast():
                targets = [self.encode(self.images)]  # (B, N, D) fp32 tokens
            if mode.trim:
                malloc_trim()  # the encoder's freed activations: out of RSS before the model's arrive
        tm.mark("encoder")
        with self._autocast(), self._attention():
            terms = self.loss(self.fwd_model, self.x, self.y, targets, t=self.t, noise=self.noise,
                              model_kwargs=self.model_kwargs)  # fmt: skip
        tm.mark("forward")
        terms["total"].backward()
        tm.mark("backward")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=mode.grads_to_none)
        tm.mark("optimizer")
        if mode.ema == "loop":
            ema_update_loop(self.ema.model, self.model, self.ema.decay)
        else:
            self.ema.update(self.model, self.steps_done)
        tm.mark("ema")
        if mode.sync:  # the official loop logs `accelerator.gather(x).mean().detach().item()` every step
            self.last_log = {"loss": terms["denoise"].item(), "proj_loss": terms["align"].item(),
                             "grad_norm": grad_norm.item()}  # fmt: skip
        else:
            self._pending = (terms["total"].detach(), grad_norm.detach())  # stays on the device
        if mode.trim:
            malloc_trim()  # between steps: this step's freed activations leave the RSS
        tm.mark("other")
        tm.end_step()
        self.steps_done += 1

    def final_loss(self) -> float:
        """The last step's total loss (a host sync; call after timing)."""
        if self.mode.sync:
            return self.last_log["loss"] + 0.5 * self.last_log["proj_loss"]
        return float(self._pending[0]) if self._pending is not None else float("nan")

    def gemm_rate(self, reps: int = 3) -> dict[str, float]:
        """FLOP/s of the model's dominant GEMM at the run's precision, measured now (same threads, same load)."""
        dtype = torch.bfloat16 if self.cfg.precision == "bf16" else torch.float32
        return gemm_flops_per_s(self.gemm, self.device, dtype, reps)

    def start_measuring(self) -> None:
        """Call after the warm-up: remember the peak so far (model building, compilation) and restart it, so
        `memory()` can tell the whole run's peak from the steady-state peak of the measured steps."""
        self._peak_before = peak_memory_bytes(self.device)
        self._peak_reset = reset_peak_memory(self.device)

    def memory(self) -> dict[str, int | None]:
        """{"peak_memory_bytes": whole run, "steady_peak_memory_bytes": measured steps only (None if unknown)}."""
        now = peak_memory_bytes(self.device)
        steady = now if self._peak_reset else None
        return {"peak_memory_bytes": max(self._peak_before, now), "steady_peak_memory_bytes": steady}

    def describe(self) -> dict[str, Any]:
        """Static facts of this runner for the JSON record."""
        from repa.models import count_params

        return {
            "mode": dataclasses.asdict(self.mode),
            "params": count_params(self.model, include_projectors=True),
            "encoder_params": sum(p.numel() for p in self.encoder.parameters()) if self.encoder is not None else 0,
            "model_flops": self.model_flops,
            "encoder_flops": self.encoder_flops,
            "step_flops": self.step_flops,
            "gemm_shape": list(self.gemm),
        }


def median_phases(rows: list[dict[str, float]]) -> dict[str, float]:
    """Median over steps of each phase and of the total (rows of one clock)."""
    return {k: statistics.median(r.get(k, 0.0) for r in rows) for k in (*PHASES, "total")}


def worker_main(conn: Any, cfg: dict[str, Any], mode: str, gemm_reps: int) -> None:
    """Subprocess entry point: build a `StepRunner`, then serve ("run", steps, measure_gemm) and ("finish",).

    Each mode runs in its own process so its peak RSS is its own; the parent interleaves steps across them.
    """
    import traceback

    try:
        runner = StepRunner(BenchConfig(**cfg), parse_mode(mode))
        measuring = False
        conn.send(("ok", runner.describe()))
        while True:
            cmd = conn.recv()
            if cmd[0] == "run":
                if cmd[2] and not measuring:  # first measured steps: the warm-up is over
                    runner.start_measuring()
                    measuring = True
                for _ in range(cmd[1]):
                    runner.step()
                rows = runner.timer.collect()
                gemm = runner.gemm_rate(gemm_reps) if cmd[2] else None
                conn.send(("ok", {"rows": rows, "gemm": gemm}))
            else:
                conn.send(("ok", {**runner.memory(), "final_loss": runner.final_loss()}))
                return
    except Exception:  # report to the parent instead of dying silently
        conn.send(("error", traceback.format_exc()))
