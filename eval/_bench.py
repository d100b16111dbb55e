"""Throughput and peak memory of ldtok's training step and encoder against an anchor-style baseline (`eval/bench.py`).

Benchmark code and its deliberately naive baseline live here, beside the library: `import ldtok` never loads them.

Each comparison runs two *cases* from the same weights, inputs and loss recipe:

- **baseline**, as the anchors' scripts (diffusers' `train_vqgan.py` / `train_autoencoderkl.py`, taming, LDM) do it:
  the plain diffusers model (`AutoencoderKL`, or `VQModel` with its own quantizer) loaded from ldtok's export,
  `lpips.LPIPS` called directly, the same `PatchDiscriminator`; fp32, eager, NCHW, separate forward calls (reals and
  fakes scored in two calls; the generator's GAN term runs the discriminator with live parameters, whose gradients are
  then dropped). Two bugs of those scripts are not copied, so both sides compute the same loss: the perceptual term
  is not under `torch.no_grad()`, and the discriminator's stray generator-step gradients are zeroed before its step.
- **ldtok**: `build_model` + `AutoencoderLoss` + `build_discriminator`, the body of `ldtok.training.train`'s loop
  (generator loss, backward, clip, step; discriminator loss, backward, clip, step) with the chosen precision (autocast
  on the autoencoder's and discriminator's forwards, as `Accelerator.prepare` does in training: the loss and its
  perceptual network stay fp32), channels-last and `torch.compile`.

Loss recipe: LDM's (L1 + LPIPS-VGG + KL 1e-6 or the quantizer loss + hinge PatchGAN with adaptive weight 0.5, on from
step 0) in ldtok's per-pixel scaling. Offline there is no ImageNet VGG: both sides use `lpips.LPIPS(net="vgg",
pnet_rand=True)`, a random backbone with the same compute. Inputs: one fixed random batch (no data loading).

Peak memory over the steps (warm-up included, building excluded): on CUDA `torch.cuda.max_memory_allocated` (cases
run in this process); on CPU `ru_maxrss` of a fresh process per case (forked from a server that has imported the
libraries, so every case starts from the same footprint), its high-water mark reset before the steps (Linux).
"""

from __future__ import annotations

import gc
import json
import math
import multiprocessing as mp
import re
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import diffusers
import lpips
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from ldtok.atomic import write_text_atomic
from ldtok.config import from_dict
from ldtok.discriminator import PatchDiscriminator
from ldtok.losses import AutoencoderLoss, LossConfig, build_discriminator
from ldtok.meters import ThroughputMeter, peak_memory_mib
from ldtok.models import ModelConfig, build_model
from ldtok.perceptual import build_perceptual
from ldtok.performance import adamw, resolve_mixed_precision
from ldtok.training import TrainConfig, autoencoder_step

PERCEPTUAL_NOTE = "perceptual: lpips.LPIPS(net='vgg', pnet_rand=True) on both sides (random VGG backbone, same compute)"
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SETTINGS = ("equal", "defaults", "custom")


@dataclass(frozen=True)
class Options:
    """How ldtok's side runs: autocast dtype, memory format, `torch.compile`, fused AdamW."""

    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    fused_adamw: bool = False


EQUAL = Options()  # the baseline's own settings


def describe_options(options: Options) -> str:
    """`"bf16, channels-last, fused AdamW"` and the like."""
    flags = {"channels-last": options.channels_last, "compile": options.compile, "fused AdamW": options.fused_adamw}
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
        presets (`list[str]`): model presets (`ldtok.models.MODEL_PRESETS`; KL and VQGAN families).
        tasks (`list[str]`): `"train"` (a generator + discriminator step) and/or `"encode"` (images to latents /
            indices, no gradients).
        device (`"cpu"` or `"cuda"`).
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

    def __post_init__(self):
        for task in self.tasks:
            assert task in ("train", "encode"), f"unknown task {task!r}: choose train and/or encode"
        for setting in self.settings:
            assert setting in SETTINGS, f"unknown setting {setting!r}: choose from {SETTINGS}"
        assert self.precision in _DTYPES, f"precision must be one of {tuple(_DTYPES)}, got {self.precision!r}"
        assert self.steps > 0 and self.warmup >= 0, f"steps must be > 0, warmup >= 0; got {self.steps}, {self.warmup}"
        assert self.repeats > 0, f"repeats must be > 0, got {self.repeats}"
        for preset in self.presets:
            model_config(preset, self.resolution)  # raises for unknown presets and families without a baseline


def loss_config(config: BenchConfig) -> LossConfig:
    """LDM's recipe with the GAN on from step 0 and the random-backbone LPIPS; the baseline implements exactly this."""
    return LossConfig(
        reconstruction="l1", perceptual="lpips-vgg", perceptual_random_init=True, perceptual_weight=1.0,
        disc_loss="hinge", disc_weight=0.5, disc_start=0, adaptive_weight=True, kl_weight=1e-6, quant_weight=1.0,
        disc_channels=config.disc_channels, disc_layers=config.disc_layers,
    )


def model_config(preset: str, resolution: int, overrides: dict | None = None) -> ModelConfig:
    """The preset's `ModelConfig` at `resolution`; `overrides` (`model.*` keys, validated) replace the preset's."""
    config = from_dict(ModelConfig, {"preset": preset, "sample_size": resolution, **(overrides or {})})
    if config.type not in ("kl", "vqgan"):
        raise ValueError(f"preset {preset!r} is a {config.type} model: no diffusers baseline exists for it")
    f = config.downsample_factor
    assert resolution % f == 0, f"resolution {resolution} not divisible by preset {preset!r}'s downsampling factor {f}"
    return config


# ------------------------------------------------------------------------------------------------ weights


def prepare_weights(config: BenchConfig, model: ModelConfig, directory: str | Path) -> Path:
    """Write the weights both sides start from into `directory`: ldtok's model (`ldtok.safetensors`), its diffusers
    export (`diffusers/`, the baseline's model), the discriminator and the perceptual network."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    ae = build_model(model)
    _save(ae, directory / "ldtok.safetensors")
    ae.export(directory / "diffusers")
    _save(build_discriminator(loss_config(config)), directory / "discriminator.safetensors")
    _save(build_perceptual("lpips-vgg", random_init=True).net, directory / "perceptual.safetensors")
    return directory


def _save(module: nn.Module, path: Path) -> None:
    # clone: LPIPS registers its heads twice (`lins.k` and `link`), and safetensors refuses shared storage
    save_file({k: v.detach().cpu().clone() for k, v in module.state_dict().items()}, str(path))


@torch.no_grad()
def _load(module: nn.Module, path: Path) -> nn.Module:
    """Copy weights in tensor by tensor (no second full copy of the model, which would count in the peak memory)."""
    state = module.state_dict()
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        assert keys == set(state), f"{path}: keys differ from the model's: {sorted(keys ^ set(state))[:5]}"
        for key in keys:
            state[key].copy_(f.get_tensor(key))
    return module


def _lpips_vgg() -> lpips.LPIPS:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torchvision\..*")
        return lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False)


def _diffusers_model(directory: Path) -> nn.Module:
    """The exported diffusers model (`AutoencoderKL` / `VQModel`, per its `_class_name`), with its weights."""
    name = json.loads((directory / "config.json").read_text())["_class_name"]
    cls = getattr(diffusers, name)
    return _load(cls.from_config(cls.load_config(directory)), directory / "diffusion_pytorch_model.safetensors")


# ------------------------------------------------------------------------------------------------ steps


@dataclass
class StepLosses:
    """The scalars of one training step (detached): `generator` (the autoencoder's loss) and `discriminator`."""

    generator: Tensor
    discriminator: Tensor


def _autocast_forward(module: nn.Module, device_type: str, dtype: torch.dtype) -> None:
    # What `Accelerator.prepare` does to each prepared model under mixed precision: only its forward is autocast.
    forward = module.forward

    def autocast_forward(*args, **kwargs):
        with torch.autocast(device_type, dtype=dtype):
            return forward(*args, **kwargs)

    module.forward = autocast_forward


class LdtokTrainStep:
    """ldtok's training step (`ldtok.training.autoencoder_step`, without Accelerate), called as
    `step_fn(x, step) -> StepLosses`. `weights`: a `prepare_weights` folder; the other arguments as in `BenchConfig`.
    """

    def __init__(self, *, model: ModelConfig, loss: LossConfig, weights: Path, device: torch.device,
                 options: Options = EQUAL, lr: float = 1e-4, betas: tuple[float, float] = (0.5, 0.9),
                 max_grad_norm: float = 1.0):
        precision, channels_last, compile = options.precision, options.channels_last, options.compile
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.raw_model = _load(build_model(model), weights / "ldtok.safetensors")
        self.raw_model.to(device, memory_format=memory_format)
        self.raw_disc = _load(build_discriminator(loss), weights / "discriminator.safetensors")
        self.raw_disc.to(device, memory_format=memory_format)
        perceptual = build_perceptual(loss.perceptual, random_init=loss.perceptual_random_init)
        _load(perceptual.net, weights / "perceptual.safetensors")
        self.loss_fn = AutoencoderLoss(config=loss, perceptual=perceptual).to(device)
        if options.fused_adamw:
            self.opt_g = adamw(self.raw_model.parameters(), lr=lr, betas=betas, weight_decay=0.0, device=device)
            self.opt_d = adamw(self.raw_disc.parameters(), lr=lr, betas=betas, weight_decay=0.0, device=device)
        else:
            self.opt_g = torch.optim.AdamW(self.raw_model.parameters(), lr=lr, betas=betas, weight_decay=0.0)
            self.opt_d = torch.optim.AdamW(self.raw_disc.parameters(), lr=lr, betas=betas, weight_decay=0.0)
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        self.max_grad_norm = max_grad_norm
        if precision != "fp32":
            for module in (self.raw_model, self.raw_disc):
                _autocast_forward(module, device.type, _DTYPES[precision])
        self.model = torch.compile(self.raw_model) if compile else self.raw_model
        self.disc = torch.compile(self.raw_disc) if compile else self.raw_disc
        self.model.train()
        self.disc.train()

    def _update(self, loss: Tensor, optimizer: torch.optim.Optimizer, module: nn.Module) -> Tensor:
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(module.parameters(), self.max_grad_norm)
        self.scaler.step(optimizer)
        optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def __call__(self, x: Tensor, step: int) -> StepLosses:
        terms = autoencoder_step(  # the trainer's own step function
            model=self.model, disc=self.disc, raw_disc=self.raw_disc, last_layer=self.raw_model.last_layer,
            loss_fn=self.loss_fn, opt_g=self.opt_g, opt_d=self.opt_d, x=x, x_in=x, step=step, update=self._update,
        )
        self.scaler.update()
        return StepLosses(generator=terms["loss"], discriminator=terms.get("disc_loss", torch.zeros(())))


class BaselineTrainStep:
    """The anchor-style step (module docstring): a diffusers model, `lpips.LPIPS` and the PatchGAN, fp32 and eager.
    Arguments as for `LdtokTrainStep`. VQ: diffusers' quantizer trains its codebook by gradient and does not
    normalize (ldtok's EMA / l2-normalized codebooks pick other codes; the compute is the same)."""

    def __init__(self, *, model: ModelConfig, loss: LossConfig, weights: Path, device: torch.device,
                 lr: float = 1e-4, betas: tuple[float, float] = (0.5, 0.9), max_grad_norm: float = 1.0):
        implemented = {"reconstruction": "l1", "rec_weight": 1.0, "disc_loss": "hinge", "adaptive_weight": True,
                       "lecam_weight": 0.0, "kl_warmup_steps": 0, "free_bits": 0.0}
        for name, value in implemented.items():
            assert getattr(loss, name) == value, f"the baseline implements loss.{name}={value!r} only"
        self.loss = loss
        self.kl = model.type == "kl"
        self.vae = _diffusers_model(weights / "diffusers").to(device).train()
        self.disc = _load(PatchDiscriminator(in_channels=3, channels=loss.disc_channels, num_layers=loss.disc_layers),
                          weights / "discriminator.safetensors").to(device).train()
        self.lpips = _load(_lpips_vgg(), weights / "perceptual.safetensors").to(device).eval().requires_grad_(False)
        self.opt_g = torch.optim.AdamW(self.vae.parameters(), lr=lr, betas=betas, weight_decay=0.0)
        self.opt_d = torch.optim.AdamW(self.disc.parameters(), lr=lr, betas=betas, weight_decay=0.0)
        self.max_grad_norm = max_grad_norm

    def __call__(self, x: Tensor, step: int) -> StepLosses:
        cfg = self.loss
        _, C, H, W = x.shape
        # autoencoder step
        if self.kl:
            posterior = self.vae.encode(x).latent_dist
            x_rec = self.vae.decode(posterior.sample()).sample
            reg = cfg.kl_weight * posterior.kl().mean() / (C * H * W)  # LDM's KL sum per sample, per image value
        else:
            x_rec, commit_loss = self.vae(x, return_dict=False)
            reg = cfg.quant_weight * commit_loss
        rec_loss = (x_rec - x).abs().mean()
        p_loss = self.lpips(x_rec, x).mean()
        nll_loss = rec_loss + cfg.perceptual_weight * p_loss
        g_loss = -self.disc(x_rec).mean()
        last_layer = self.vae.decoder.conv_out.weight
        nll_grads = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
        g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
        d_weight = torch.clamp(torch.norm(nll_grads) / (torch.norm(g_grads) + 1e-4), 0.0, cfg.adaptive_weight_max)
        loss = nll_loss + reg + d_weight.detach() * cfg.disc_weight * g_loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.vae.parameters(), self.max_grad_norm)
        self.opt_g.step()
        self.opt_g.zero_grad(set_to_none=True)
        # discriminator step
        self.opt_d.zero_grad(set_to_none=True)  # the generator loss's backward filled these
        logits_real = self.disc(x.detach())
        logits_fake = self.disc(x_rec.detach())
        d_loss = F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean()
        d_loss.backward()
        torch.nn.utils.clip_grad_norm_(self.disc.parameters(), self.max_grad_norm)
        self.opt_d.step()
        self.opt_d.zero_grad(set_to_none=True)
        return StepLosses(generator=loss.detach(), discriminator=d_loss.detach())


def ldtok_encoder(*, model: ModelConfig, weights: Path, device: torch.device,
                  options: Options = EQUAL) -> Callable[[Tensor], Tensor]:
    """ldtok's encoding: `encode_latents` (KL: the posterior's mean) or `encode_to_indices` (VQ), eval mode."""
    precision, channels_last, compile = options.precision, options.channels_last, options.compile
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    ae = _load(build_model(model), weights / "ldtok.safetensors").to(device, memory_format=memory_format).eval()
    encode = ae.encode_latents if model.type == "kl" else ae.encode_to_indices
    encode = torch.compile(encode) if compile else encode

    @torch.inference_mode()
    def run(x: Tensor) -> Tensor:
        with torch.autocast(device.type, dtype=_DTYPES[precision], enabled=precision != "fp32"):
            return encode(x)

    return run


def baseline_encoder(*, model: ModelConfig, weights: Path, device: torch.device) -> Callable[[Tensor], Tensor]:
    """The diffusers way: `vae.encode(x).latent_dist.mode()`, or `VQModel.encode` + its quantizer's indices."""
    vae = _diffusers_model(weights / "diffusers").to(device).eval()

    @torch.no_grad()
    def run(x: Tensor) -> Tensor:
        if model.type == "kl":
            return vae.encode(x).latent_dist.mode()
        _, _, (_, _, indices) = vae.quantize(vae.encode(x).latents)
        return indices

    return run


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
                      flops_per_step=flops, tflops=tflops, mfu=tflops / peak if peak else None)


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
    assert config.device != "cuda" or torch.cuda.is_available(), "device cuda requested, but CUDA is not available"
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


def format_table(rows: list[Row], *, device: str = "cpu") -> str:
    """The ratio table: throughput (best run, and per core on CPU / TFLOP/s and MFU on CUDA) and peak memory of both
    sides; ratios ldtok / baseline, with the min-median-max over the repeats."""
    cuda = device == "cuda"
    extra = ("baseline TFLOP/s", "ldtok TFLOP/s", "ldtok MFU") if cuda else ("baseline img/s/core", "ldtok img/s/core")
    header = ("name", "setting", "baseline img/s", "ldtok img/s", "ratio", "min-med-max", *extra, "baseline peak MiB",
              "ldtok peak MiB", "mem ratio")
    lines = []
    for r in rows:
        spread = r.speedups
        cells = [r.name, r.setting, f"{r.baseline.images_per_s:.2f}", f"{r.ldtok.images_per_s:.2f}",
                 f"{r.speedup:.2f}x", f"{spread[0]:.2f}-{statistics.median(spread):.2f}-{spread[-1]:.2f}"]
        if cuda:
            mfu = f"{100 * r.ldtok.mfu:.1f}%" if r.ldtok.mfu is not None else "-"
            cells += [f"{r.baseline.tflops:.1f}", f"{r.ldtok.tflops:.1f}", mfu]
        else:
            cells += [f"{r.baseline.images_per_s_per_core:.2f}", f"{r.ldtok.images_per_s_per_core:.2f}"]
        cells += [f"{r.baseline.peak_memory_mib:.0f}", f"{r.ldtok.peak_memory_mib:.0f}", f"{r.memory_ratio:.2f}x"]
        lines.append(cells)
    widths = [max(len(line[i]) for line in [header, *lines]) for i in range(len(header))]

    def fmt(cells) -> str:
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *map(fmt, lines)])


def environment(config: BenchConfig) -> dict:
    """Versions and hardware, for the JSON report."""
    env = {"python": sys.version.split()[0], "torch": torch.__version__, "diffusers": diffusers.__version__,
           "threads": torch.get_num_threads()}
    if config.device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    return env


def write_report(path: str | Path, config: BenchConfig, rows: list[Row]) -> None:
    """Write the rows, the config and the environment as JSON (atomically)."""
    memory = ("torch.cuda.max_memory_allocated over the steps" if config.device == "cuda" else
              "ru_maxrss of a fresh process per case, high-water mark reset after building (see peak_scope)")
    report = {
        "config": asdict(config),
        "environment": environment(config),
        "notes": [PERCEPTUAL_NOTE, f"peak memory: {memory}", "ratios are ldtok / baseline",
                  "baseline: diffusers model + lpips + PatchDiscriminator, fp32, eager",
                  "inputs: one fixed random batch; images_per_s: each side's fastest of `repeats` runs"],
        "rows": [{"name": r.name, "setting": r.setting, "options": asdict(ldtok_options(config, r.setting)),
                  "baseline": asdict(r.baseline), "ldtok": asdict(r.ldtok), "speedup": r.speedup,
                  "speedup_min_median_max": [r.speedups[0], statistics.median(r.speedups), r.speedups[-1]],
                  "cpu_time_speedup": r.cpu_time_speedup, "memory_ratio": r.memory_ratio,
                  "ldtok_images_per_s_per_core": r.ldtok.images_per_s_per_core,
                  "baseline_images_per_s_per_core": r.baseline.images_per_s_per_core,
                  "runs_images_per_s": r.runs} for r in rows],
    }
    write_text_atomic(path, json.dumps(report, indent=2) + "\n")


__all__ = [
    "BaselineTrainStep", "BenchConfig", "Case", "CaseResult", "LdtokTrainStep", "Row", "StepLosses", "baseline_encoder",
    "format_table", "ldtok_encoder", "loss_config", "model_config", "prepare_weights", "run_benchmark", "run_case",
    "write_report",
]
