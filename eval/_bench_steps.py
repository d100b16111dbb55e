"""The two sides of `eval/bench.py`: ldtok's training step and encoder, and the anchor-style baseline's.

Both start from the weights `prepare_weights` writes; see `eval/_bench.py` for how they are measured.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import diffusers
import lpips
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from ldtok.discriminator import PatchDiscriminator
from ldtok.losses import AutoencoderLoss, LossConfig, build_discriminator
from ldtok.models import ModelConfig, build_model
from ldtok.perceptual import build_perceptual
from ldtok.performance import adamw, perceptual_dtype
from ldtok.training import AutoencoderStep

if TYPE_CHECKING:
    from _bench_config import BenchConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MIXED = {"fp32": "no"}  # an Options.precision as Accelerate's mixed_precision


@dataclass(frozen=True)
class Options:
    """How ldtok's side runs: autocast dtype, memory format, `torch.compile`, fused AdamW."""

    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    fused_adamw: bool = False


EQUAL = Options()  # the baseline's own settings


def loss_config(config: BenchConfig) -> LossConfig:
    """LDM's recipe with the GAN on from step 0 and the random-backbone LPIPS; the baseline implements exactly this."""
    return LossConfig(
        reconstruction="l1", perceptual="lpips-vgg", perceptual_random_init=True, perceptual_weight=1.0,
        disc_loss="hinge", disc_weight=0.5, disc_start=0, adaptive_weight=True, kl_weight=1e-6, quant_weight=1.0,
        disc_channels=config.disc_channels, disc_layers=config.disc_layers,
    )


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
    """ldtok's training step (`ldtok.training.AutoencoderStep`, without Accelerate), called as
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
        self.loss_fn = AutoencoderLoss(config=loss, perceptual=perceptual).to(device, memory_format=memory_format)
        # as the trainer: `loss.perceptual_precision=auto` runs the frozen backbone in bf16 in bf16 runs
        perceptual.set_backbone_precision(perceptual_dtype(loss.perceptual_precision, MIXED.get(precision, precision)))
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
                _autocast_forward(module, device.type, DTYPES[precision])
        self.model = torch.compile(self.raw_model) if compile else self.raw_model
        self.disc = torch.compile(self.raw_disc) if compile else self.raw_disc
        self.model.train()
        self.disc.train()
        self.step = AutoencoderStep(model=self.model, loss_fn=self.loss_fn, disc=self.disc)  # the trainer's own step

    def _update(self, loss: Tensor, optimizer: torch.optim.Optimizer, module: nn.Module) -> Tensor:
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(module.parameters(), self.max_grad_norm)
        self.scaler.step(optimizer)
        optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def __call__(self, x: Tensor, step: int) -> StepLosses:
        gen = self.step.generator(x, step=step)
        self._update(gen.loss, self.opt_g, self.model)
        disc = self.step.discriminator(x, gen, step=step)
        if disc is not None:
            self._update(disc.loss, self.opt_d, self.disc)
        self.scaler.update()
        return StepLosses(generator=gen.terms["loss"], discriminator=disc.terms["disc_loss"] if disc is not None
                          else torch.zeros(()))


class BaselineTrainStep:
    """The anchor-style step (module docstring): a diffusers model, `lpips.LPIPS` and the PatchGAN, fp32 and eager.
    Arguments as for `LdtokTrainStep`. VQ: diffusers' quantizer trains its codebook by gradient and does not
    normalize (ldtok's EMA / l2-normalized codebooks pick other codes; the compute is the same)."""

    def __init__(self, *, model: ModelConfig, loss: LossConfig, weights: Path, device: torch.device,
                 lr: float = 1e-4, betas: tuple[float, float] = (0.5, 0.9), max_grad_norm: float = 1.0,
                 lightning: bool = False):
        self.lightning = lightning  # the autoencoder's forward once per optimizer (BenchConfig.baseline)
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

    def _forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """`(reconstruction, KL or commitment term)`, as the autoencoder's forward of taming / LDM."""
        cfg = self.loss
        _, C, H, W = x.shape
        if self.kl:
            posterior = self.vae.encode(x).latent_dist
            x_rec = self.vae.decode(posterior.sample()).sample
            return x_rec, cfg.kl_weight * posterior.kl().mean() / (C * H * W)  # LDM's KL sum per sample, per value
        x_rec, commit_loss = self.vae(x, return_dict=False)
        return x_rec, cfg.quant_weight * commit_loss

    def __call__(self, x: Tensor, step: int) -> StepLosses:
        cfg = self.loss
        # autoencoder step
        x_rec, reg = self._forward(x)
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
        if self.lightning:  # Lightning's second `training_step` call (optimizer_idx=1) starts with `self(x)` again
            x_rec, _ = self._forward(x)
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
        with torch.autocast(device.type, dtype=DTYPES[precision], enabled=precision != "fp32"):
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
