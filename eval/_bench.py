"""Throughput and peak memory of ldtok's training step and encoder against an anchor-style baseline (`eval/bench.py`).

Benchmark code and its deliberately naive baseline live here, beside the library: `import ldtok` never loads them.

Each comparison runs two *cases* from the same weights, inputs and loss recipe:

- **baseline**, as the anchors' scripts (diffusers' `train_vqgan.py` / `train_autoencoderkl.py`, taming, LDM) do it:
  the plain diffusers model (`AutoencoderKL`, or `VQModel` with its own quantizer) loaded from ldtok's export,
  `lpips.LPIPS` called directly, the same `PatchDiscriminator`; fp32, eager, NCHW, separate forward calls (reals and
  fakes scored in two calls; the generator's GAN term runs the discriminator with live parameters, whose gradients are
  then dropped). Two bugs of those scripts are not copied, so both sides compute the same loss: the perceptual term
  is not under `torch.no_grad()`, and the discriminator's stray generator-step gradients are zeroed before its step.
- **ldtok**: `build_model` + `AutoencoderLoss` + `build_discriminator` through the trainer's own step
  (`ldtok.training.AutoencoderStep`: generator loss, backward, clip, step; discriminator loss, backward, clip, step)
  with the chosen precision (autocast on the autoencoder's and discriminator's forwards, as `Accelerator.prepare`
  does in training: the loss and its perceptual network stay fp32), channels-last and `torch.compile`.

Loss recipe: LDM's (L1 + LPIPS-VGG + KL 1e-6 or the quantizer loss + hinge PatchGAN with adaptive weight 0.5, on from
step 0) in ldtok's per-pixel scaling. Offline there is no ImageNet VGG: both sides use `lpips.LPIPS(net="vgg",
pnet_rand=True)`, a random backbone with the same compute. Inputs: one fixed random batch (no data loading).

Peak memory over the steps (warm-up included, building excluded): on CUDA `torch.cuda.max_memory_allocated` (cases
run in this process); on CPU `ru_maxrss` of a fresh process per case (forked from a server that has imported the
libraries, so every case starts from the same footprint), its high-water mark reset before the steps (Linux).
"""

from __future__ import annotations

import gc
import math
import multiprocessing as mp
import re
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from _bench_steps import (  # noqa: F401  (re-exported: the benchmark's public names)
    DTYPES,
    EQUAL,
    BaselineTrainStep,
    LdtokTrainStep,
    Options,
    StepLosses,
    baseline_encoder,
    ldtok_encoder,
    loss_config,
    prepare_weights,
)
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

from ldtok.config import check_choice, check_range, from_dict, invalid
from ldtok.errors import LdtokError
from ldtok.meters import ThroughputMeter, peak_memory_mib
from ldtok.models import ModelConfig
from ldtok.performance import resolve_mixed_precision
from ldtok.training import TrainConfig

PERCEPTUAL_NOTE = "perceptual: lpips.LPIPS(net='vgg', pnet_rand=True) on both sides (random VGG backbone, same compute)"
SETTINGS = ("equal", "defaults", "custom")
TASKS = ("train", "encode")


def describe_options(options: Options) -> str:
    """`"bf16, channels-last, fused AdamW"` and the like."""
    flags = {"channels-last": options.channels_last, "compile": options.compile, "fused AdamW": options.fused_adamw,
             "bf16 perceptual backbone": options.precision == "bf16"}  # loss.perceptual_precision=auto
    return ", ".join([options.precision, *(name for name, on in flags.items() if on)])


def ldtok_options(config: BenchConfig, setting: str) -> Options:
    """ldtok's options under `setting` (see `BenchConfig.settings`)."""
    if setting == "equal":
        return EQUAL
    if setting == "custom":
        return Options(precision=config.precision, channels_last=config.channels_last, compile=config.compile)
    defaults = TrainConfig()
    precision = resolve_mixed_precision(defaults.mixed_precision, torch.device(config.device))
    return Options(precision={"no": "fp32"}.get(precision, precision), channels_last=defaults.channels_last,
                   compile=defaults.compile, fused_adamw=True)


@dataclass
class BenchConfig:
    """What `run_benchmark` measures.

    Args:
        presets (`list[str]`): model presets of `ldtok.models.MODEL_PRESETS` (KL and VQGAN families).
        tasks (`list[str]`): `"train"` (a generator + discriminator step) and/or `"encode"` (images to latents /
            indices, no gradients).
        device (`"cpu"` or `"cuda"`): where both sides run.
        settings (`list[str]`): ldtok's side in each comparison: `"equal"` (fp32, eager, NCHW, plain AdamW: the
            baseline's settings, so the ratio is the algorithmic gain alone), `"defaults"` (the trainer's defaults,
            `ldtok.training.TrainConfig`: mixed precision `auto`, channels-last, fused AdamW, compile as configured),
            `"custom"` (`precision`, `channels_last`, `compile` below). The baseline is always fp32 eager.
        precision (`"fp32"`, `"bf16"` or `"fp16"`): the `custom` setting's autocast dtype (fp16 with a `GradScaler`).
        channels_last (`bool`): the `custom` setting's memory format for models and inputs.
        compile (`bool`): the `custom` setting: `torch.compile` the autoencoder and discriminator (train) or the
            encode function.
        batch_size (`int`): images per step.
        resolution (`int`): image height and width.
        steps (`int`): timed steps per case.
        warmup (`int`): untimed steps before them (one-time costs: allocator, compilation, k-means init).
        repeats (`int`): measure each side this many times, alternating baseline and ldtok, and keep each side's
            fastest run: robust to other processes sharing the machine.
        seed (`int`): weights and inputs.
        lr, adam_betas, max_grad_norm: the optimizers (AdamW) and gradient clipping; the trainer's defaults.
        disc_channels, disc_layers: the PatchGAN discriminator (LDM's 64 and 3 by default).
        baseline (`"single-forward"` or `"lightning"`): how the baseline's training step runs the autoencoder.
            `single-forward`: once per step, its reconstruction shared by both optimizers' losses (the leanest way to
            write it). `lightning`: once per optimizer, as taming's `VQModel` and LDM's `AutoencoderKL` do (Lightning
            calls `training_step(batch, batch_idx, optimizer_idx)` once per optimizer and each call starts with
            `self(x)`); the discriminator's call builds a graph only its detached reconstruction is read from.
    """

    presets: list[str] = field(default_factory=lambda: ["demo-kl"])
    tasks: list[str] = field(default_factory=lambda: ["train", "encode"])
    device: Literal["cpu", "cuda"] = "cpu"
    settings: list[str] = field(default_factory=lambda: ["equal", "defaults"])
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    channels_last: bool = False
    compile: bool = False
    batch_size: int = 8
    resolution: int = 64
    steps: int = 10
    warmup: int = 2
    repeats: int = 1
    seed: int = 0
    lr: float = 1e-4
    adam_betas: tuple[float, float] = (0.5, 0.9)
    max_grad_norm: float = 1.0
    disc_channels: int = 64
    disc_layers: int = 3
    baseline: Literal["single-forward", "lightning"] = "single-forward"

    def __post_init__(self):
        each_choice(self, "tasks", TASKS)
        check_choice(self, "baseline", ("single-forward", "lightning"))
        each_choice(self, "settings", SETTINGS)
        check_choice(self, "precision", tuple(DTYPES))
        for name in ("batch_size", "resolution", "steps", "repeats", "disc_channels", "disc_layers"):
            check_range(self, name, gt=0)
        check_range(self, "warmup", ge=0)
        if not self.presets:
            raise invalid("presets", "give at least one preset")
        for preset in self.presets:
            try:
                model_config(preset, self.resolution)  # unknown presets, families without a baseline
            except ValueError as e:
                raise invalid("presets", str(e).removeprefix("preset: ")) from None


def each_choice(section, field: str, allowed) -> None:
    """Every value of the list `section.field` is one of `allowed` (a `ConfigError` naming the first that is not)."""
    for value in getattr(section, field):
        if value not in allowed:
            raise invalid(field, f"unknown choice {value!r} (allowed: {', '.join(allowed)})")


def model_config(preset: str, resolution: int, overrides: dict | None = None) -> ModelConfig:
    """The preset's `ModelConfig` at `resolution`; `overrides` (`model.*` keys, validated) replace the preset's."""
    config = from_dict(ModelConfig, {"preset": preset, "sample_size": resolution, **(overrides or {})})
    if config.type not in ("kl", "vqgan"):
        raise ValueError(f"preset {preset!r} is a {config.type} model: no diffusers baseline exists for it")
    f = config.downsample_factor
    if resolution % f:
        raise ValueError(f"resolution {resolution} not divisible by preset {preset!r}'s downsampling factor {f}")
    return config

# ------------------------------------------------------------------------------------------------ cases


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


def _run_in_fresh_process(case: Case) -> CaseResult:
    # ru_maxrss is a per-process peak: one process per case. A fork server imports torch & co. once for all of them.
    if "forkserver" in mp.get_all_start_methods():
        context = mp.get_context("forkserver")
        context.set_forkserver_preload([__name__])
    else:
        context = mp.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(run_case, case).result()


def _run_here(case: Case) -> CaseResult:
    gc.collect()
    torch.cuda.empty_cache()
    return run_case(case)


# ------------------------------------------------------------------------------------------------ benchmark


@dataclass
class Row:
    """One comparison: `name` (e.g. `"train demo-kl"`), ldtok's `setting`, each side's fastest `CaseResult`, the
    images per second of every repeat (`runs`, by side; repeat i of both sides ran back to back) and the ratios."""

    name: str
    setting: str
    baseline: CaseResult
    ldtok: CaseResult
    runs: dict[str, list[float]] = field(default_factory=dict)

    @property
    def speedup(self) -> float:
        return self.ldtok.images_per_s / self.baseline.images_per_s

    @property
    def speedups(self) -> list[float]:
        """ldtok / baseline of each repeat, sorted: min, median and max give the spread."""
        return sorted(a / b for a, b in zip(self.runs["ldtok"], self.runs["baseline"]))

    @property
    def cpu_time_speedup(self) -> float:
        return self.baseline.cpu_seconds / self.ldtok.cpu_seconds

    @property
    def memory_ratio(self) -> float:
        return self.ldtok.peak_memory_mib / self.baseline.peak_memory_mib


def run_benchmark(config: BenchConfig, *, work_dir: str | Path | None = None,
                  log: Callable[[str], None] = lambda message: None) -> list[Row]:
    """Measure every (preset, task): the baseline and ldtok under each setting, `repeats` times, alternating. Weights
    go to `work_dir` (default: a temporary folder)."""
    if config.device == "cuda" and not torch.cuda.is_available():
        raise LdtokError("--device cuda: CUDA is not available")
    run = _run_in_fresh_process if config.device == "cpu" else _run_here
    rows = []
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        for preset in config.presets:
            weights = prepare_weights(config, model_config(preset, config.resolution), Path(tmp) / preset)
            for task in config.tasks:
                sides = [("baseline", "equal")] + [("ldtok", setting) for setting in config.settings]
                runs: dict[tuple[str, str], list[CaseResult]] = {side: [] for side in sides}
                for repeat in range(config.repeats):
                    for (side, setting), results in runs.items():
                        label = side if side == "baseline" else f"{side} ({setting})"
                        log(f"{task} {preset}: {label} ({repeat + 1}/{config.repeats}) ...")
                        results.append(run(Case(config=config, preset=preset, task=task, side=side,
                                                weights=str(weights), setting=setting)))
                baseline = runs[("baseline", "equal")]
                for setting in config.settings:
                    ldtok = runs[("ldtok", setting)]
                    rows.append(Row(name=f"{task} {preset}", setting=setting,
                                    baseline=max(baseline, key=lambda r: r.images_per_s),
                                    ldtok=max(ldtok, key=lambda r: r.images_per_s),
                                    runs={"baseline": [r.images_per_s for r in baseline],
                                          "ldtok": [r.images_per_s for r in ldtok]}))
    return rows
