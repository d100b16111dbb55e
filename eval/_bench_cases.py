"""One benchmark case (`Case`: a side, a task, a preset) run and measured (`run_case` → `CaseResult`): throughput,
peak memory, FLOPs and MFU; on CPU each case in a fresh process (see `_bench`'s docstring)."""

from __future__ import annotations

import gc
import math
import multiprocessing as mp
import re
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from _bench_config import BenchConfig, ldtok_options, model_config
from _bench_steps import BaselineTrainStep, LdtokTrainStep, StepLosses, baseline_encoder, ldtok_encoder, loss_config
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

from ldtok.meters import ThroughputMeter, peak_memory_mib


@dataclass
class Case:
    """One measurement: `side` (`"baseline"` or `"ldtok"`) running `task` on `preset` with the `weights`, ldtok
    under `setting`."""

    config: BenchConfig
    preset: str
    task: str
    side: str
    weights: str
    setting: str = "equal"


@dataclass
class CaseResult:
    """What one case measured.

    Args:
        images_per_s (`float`): over the timed steps (wall clock, `seconds`).
        peak_memory_mib (`float`): peak over the steps: CUDA allocator peak, or the CPU process's `ru_maxrss` with its
            high-water mark reset after building (one-time build costs, e.g. the VGG16 classifier that `lpips` builds
            and drops, are left out); where that reset is impossible (not Linux) `peak_scope` is `"process"`.
        start_memory_mib (`float`): memory held when the steps began (models, inputs; CPU: also the libraries).
        build_peak_memory_mib (`float`): peak before the steps (building included).
        cpu_seconds (`float`): CPU time of the process over the timed steps (all threads), a check on the wall clock.
        loss (`float`, *optional*): the last step's generator loss (train cases).
        threads (`int`): torch's intra-op threads (CPU: `images_per_s / threads` is the rate per core).
        flops_per_step (`float`): FLOPs of one step (`torch.utils.flop_counter`, counted on the first warm-up step).
        tflops (`float`): achieved `flops_per_step * steps / seconds`, in TFLOP/s.
        mfu (`float`, *optional*): `tflops` over the GPU's dense peak for the case's dtype (`peak_tflops`), CUDA only.
    """

    images_per_s: float
    peak_memory_mib: float
    start_memory_mib: float
    build_peak_memory_mib: float
    peak_scope: str
    seconds: float
    cpu_seconds: float
    loss: float | None = None
    threads: int = 1
    flops_per_step: float = 0.0
    tflops: float = 0.0
    mfu: float | None = None
    batch_size: int = 1

    @property
    def peak_memory_per_image_mib(self) -> float:
        """Peak memory over the batch size: what one more image per step costs, at most."""
        return self.peak_memory_mib / self.batch_size

    @property
    def images_per_s_per_core(self) -> float:
        return self.images_per_s / self.threads


def _current_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return peak_memory_mib(device)
    return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE).group(1)) / 2**10


def _reset_peak_memory(device: torch.device) -> bool:
    """Restart the peak measure from the current memory; False where that is not possible."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:  # Linux: resets the RSS high-water mark, which ru_maxrss reports, to the current RSS
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def run_case(case: Case) -> CaseResult:
    """Build the case's models, run `warmup + steps` steps on a fixed random batch, measure."""
    cfg = case.config
    device = torch.device(cfg.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model = model_config(case.preset, cfg.resolution)
    weights = Path(case.weights)
    ldtok = case.side == "ldtok"
    torch.manual_seed(cfg.seed)
    opts = ldtok_options(cfg, case.setting)
    options = {"options": opts} if ldtok else {}
    if case.task == "train":
        cls = LdtokTrainStep if ldtok else BaselineTrainStep
        if not ldtok:
            options["lightning"] = cfg.baseline == "lightning"
        step_fn = cls(model=model, loss=loss_config(cfg), weights=weights, device=device, lr=cfg.lr,
                      betas=tuple(cfg.adam_betas), max_grad_norm=cfg.max_grad_norm, **options)
    else:
        encode = (ldtok_encoder if ldtok else baseline_encoder)(model=model, weights=weights, device=device, **options)

        def step_fn(x: Tensor, step: int) -> Tensor:
            return encode(x)
    generator = torch.Generator().manual_seed(cfg.seed)
    x = torch.rand(cfg.batch_size, 3, cfg.resolution, cfg.resolution, generator=generator) * 2 - 1  # (B, 3, R, R)
    x = x.to(device, memory_format=torch.channels_last if ldtok and opts.channels_last else torch.contiguous_format)

    gc.collect()
    build_peak = peak_memory_mib(device)
    scope = "steps" if _reset_peak_memory(device) else "process"
    start = _current_memory_mib(device)
    meter = ThroughputMeter(warmup=cfg.warmup)
    out, cpu_start, flops = None, 0.0, 0.0
    for step in range(cfg.warmup + cfg.steps):
        if step == cfg.warmup:
            cpu_start = time.process_time()
        meter.start()
        if step == 0 and cfg.warmup > 0:  # FLOPs of one step, counted outside the timed steps
            with FlopCounterMode(display=False) as counter:
                out = step_fn(x, step)
            flops = float(counter.get_total_flops())
        else:
            out = step_fn(x, step)
        meter.stop(cfg.batch_size)
    loss = float(out.generator) if isinstance(out, StepLosses) else None
    assert loss is None or math.isfinite(loss), f"{case.side} {case.task} {case.preset}: non-finite loss {loss}"
    tflops = flops * cfg.steps / meter.seconds / 1e12
    peak = peak_tflops(device, opts.precision if ldtok else "fp32")
    return CaseResult(images_per_s=meter.rate(), peak_memory_mib=peak_memory_mib(device), start_memory_mib=start,
                      build_peak_memory_mib=build_peak, peak_scope=scope, seconds=meter.seconds,
                      cpu_seconds=time.process_time() - cpu_start, loss=loss, threads=torch.get_num_threads(),
                      flops_per_step=flops, tflops=tflops, mfu=tflops / peak if peak else None,
                      batch_size=cfg.batch_size)


# Dense tensor-core peaks (TFLOP/s) by GPU name and dtype; fp32 runs as TF32 where the trainer enables it.
PEAK_TFLOPS = {"H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 494.0},
               "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 494.0},
               "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0}}


def peak_tflops(device: torch.device, precision: str) -> float | None:
    """The GPU's dense peak for `precision`, when its name is in `PEAK_TFLOPS`; `None` on CPU or unknown GPUs."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in PEAK_TFLOPS.items():
        if key in name:
            return peaks[precision]
    return None


def run_in_fresh_process(case: Case) -> CaseResult:
    # ru_maxrss is a per-process peak: one process per case. A fork server imports torch & co. once for all of them.
    if "forkserver" in mp.get_all_start_methods():
        context = mp.get_context("forkserver")
        context.set_forkserver_preload([__name__])
    else:
        context = mp.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(run_case, case).result()


def run_here(case: Case) -> CaseResult:
    gc.collect()
    torch.cuda.empty_cache()
    return run_case(case)


# ------------------------------------------------------------------------------------------------ benchmark
