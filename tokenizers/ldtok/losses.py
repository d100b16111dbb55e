"""The autoencoder loss: reconstruction + perceptual + KL / quantizer + adaptive-weight PatchGAN (+ LeCAM).

Scaling convention: every term is a per-pixel mean. Reconstruction and perceptual are means over pixels; the KL term is
LDM's per-sample KL sum (nats, summed over latent channels and positions, averaged over the batch) divided by the
number of image values `3 * H * W`. LDM's `LPIPSWithDiscriminator` sums its NLL over pixels instead, so each of our
terms is LDM's divided by the same constant `3 * H * W` (the adaptive GAN weight is a gradient-norm ratio against the
NLL, so it scales by the same constant too). LDM's weights (`kl_weight=1e-6`, `perceptual_weight=1.0`,
`disc_weight=0.5`) therefore carry over unchanged, and Adam, invariant to a constant loss scale, takes the same steps
(up to its epsilon and the adaptive weight's 1e-4 / clamp). The quantizer term is taming's VQGAN convention (per-pixel
mean NLL + `quant_weight * (beta * commit + codebook)`), which is already per-pixel.

Who owns what: the loss has no trainable parameters. The perceptual network is injected (frozen, see
`ldtok.perceptual`) and is left out of the loss's `state_dict` (it is rebuilt from its shipped files; the state dict
then only holds the LeCAM statistics). The discriminator is a separate model with its own optimizer (build it with
`build_discriminator(config)`); both loss methods receive it. The generator loss evaluates it with detached parameters
through `torch.func.functional_call` on the unwrapped module, so it never writes discriminator gradients and never
runs the DDP wrapper's forward; the discriminator loss calls the (possibly wrapped) discriminator exactly once.

The adaptive GAN weight costs one backward through the perceptual net and the discriminator, not two as in taming /
LDM: `ldtok.adaptive_weight` takes both losses' gradients at the reconstruction once and returns a loss with the same
value and parameter gradients.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ldtok import regularizers as reg
from ldtok.adaptive_weight import adaptive_gan_loss
from ldtok.discriminator import PatchDiscriminator
from ldtok.outputs import AutoencoderOutput, QuantizerOutput
from ldtok.perceptual import PERCEPTUAL_NETS, build_perceptual

if TYPE_CHECKING:
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution


@dataclass
class LossConfig:
    """Weights and switches of `AutoencoderLoss` (and the discriminator's shape).

    Args:
        reconstruction (`"l1"`, `"l2"` or `"bce"`, defaults to `"l1"`): pixel loss, mean over all values; `bce`:
            Bernoulli likelihood, the decoder's output read as logits against the image mapped to [0, 1] (the trainer
            then builds the model with a logits decoder; `mlp` and `vae2` models).
        rec_weight (`float`, defaults to 1.0): weight of the pixel loss in the NLL.
        perceptual (`str`, defaults to `"lpips-vgg"`): perceptual network (`ldtok.perceptual.PERCEPTUAL_NETS`:
            `"lpips-vgg"`, `"lpips-alex"`, `"stlpips-vgg"`, `"stlpips-alex"` or `"none"`).
        perceptual_weight (`float`, defaults to 1.0): weight of the mean perceptual distance in the NLL (0 skips it
            and `build_loss` then builds no network).
        perceptual_random_init (`bool`, defaults to `False`): random perceptual backbone; tests and offline mechanics
            only, the distance is meaningless.
        disc_loss (`"hinge"` or `"non_saturating"`, defaults to `"hinge"`): GAN objective (both on logits).
        disc_weight (`float`, defaults to 0.5): GAN weight; multiplies the adaptive weight when that is on. 0 disables
            the GAN entirely (`disc_active` is then always False).
        disc_start (`int`, defaults to 50001): first step (global optimizer step) with a GAN term / discriminator step.
        disc_channels (`int`, defaults to 64): width of the discriminator's first conv.
        disc_layers (`int`, defaults to 3): stride-2 convs in the PatchGAN discriminator.
        adaptive_weight (`bool`, defaults to `True`): scale the GAN term by
            `||grad_last NLL|| / (||grad_last GAN|| + 1e-4)` (taming / LDM).
        adaptive_weight_max (`float`, defaults to 1e4): upper clamp of that ratio.
        lecam_weight (`float`, defaults to 0.0): weight of the LeCAM regulariser on the discriminator (Tseng et al.
            2021); 0 disables it.
        lecam_decay (`float`, defaults to 0.999): EMA decay of LeCAM's mean real / fake logits.
        kl_weight (`float`, defaults to 1e-6): weight of the KL term (KL models).
        kl_warmup_steps (`int`, defaults to 0): KL weight ramps linearly from 0 to `kl_weight` over these steps; 0 = no
            warm-up.
        free_bits (`float`, defaults to 0.0): per-latent-channel KL floor in nats (per sample, summed over positions);
            channels below it get no KL gradient. 0 disables it.
        quant_weight (`float`, defaults to 1.0): weight of the quantizers' losses (VQ models).
        kl_schedule (`"linear"` or `"cyclical"`), kl_cycles (`int`, 4), kl_ratio (`float`, 0.5), kl_total_steps
            (`int`, *optional*, defaults to `train.max_steps`): the KL weight's schedule, see
            `ldtok.regularizers.kl_weight_at` (linear: over `kl_warmup_steps`; cyclical: Fu et al. 2019).
        sparsity (`"none"`, `"l1"` or `"kl"`), sparsity_weight (`float`, 0), sparsity_target (`float`, 0.05): the
            sparse-autoencoder penalty on the latent code (`ldtok.regularizers.sparsity_penalty`).
        contractive_weight (`float`, 0), contractive_samples (`int`, 1): the contractive penalty, the per-sample
            squared Frobenius norm of the encoder's Jacobian, estimated in the model's forward with this many random
            projections (`ldtok.regularizers.jacobian_frobenius_sq`).
    """

    reconstruction: Literal["l1", "l2", "bce"] = "l1"
    rec_weight: float = 1.0
    perceptual: str = "lpips-vgg"
    perceptual_weight: float = 1.0
    perceptual_random_init: bool = False
    disc_loss: Literal["hinge", "non_saturating"] = "hinge"
    disc_weight: float = 0.5
    disc_start: int = 50001
    disc_channels: int = 64
    disc_layers: int = 3
    adaptive_weight: bool = True
    adaptive_weight_max: float = 1e4
    lecam_weight: float = 0.0
    lecam_decay: float = 0.999
    kl_weight: float = 1e-6
    kl_warmup_steps: int = 0
    free_bits: float = 0.0
    quant_weight: float = 1.0
    kl_schedule: Literal["linear", "cyclical"] = "linear"
    kl_cycles: int = 4
    kl_ratio: float = 0.5
    kl_total_steps: int | None = None
    sparsity: Literal["none", "l1", "kl"] = "none"
    sparsity_weight: float = 0.0
    sparsity_target: float = 0.05
    contractive_weight: float = 0.0
    contractive_samples: int = 1

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise `ValueError` naming the first field with a value out of its range."""
        choices = {
            "reconstruction": ("l1", "l2", "bce"),
            "disc_loss": ("hinge", "non_saturating"),
            "perceptual": PERCEPTUAL_NETS,
            "kl_schedule": reg.KL_SCHEDULES,
            "sparsity": reg.SPARSITY_KINDS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"LossConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in (
            "rec_weight",
            "perceptual_weight",
            "disc_weight",
            "disc_start",
            "adaptive_weight_max",
            "lecam_weight",
            "kl_weight",
            "kl_warmup_steps",
            "free_bits",
            "quant_weight",
            "sparsity_weight",
            "contractive_weight",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"LossConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        if not 0.0 <= self.lecam_decay < 1.0:
            raise ValueError(f"LossConfig.lecam_decay must be in [0, 1), got {self.lecam_decay!r}")
        reg.validate_classic(self)


def build_discriminator(config: LossConfig) -> PatchDiscriminator:
    """The PatchGAN discriminator described by `config` (GroupNorm, logits out)."""
    # 3 channels whatever the images have: the loss shows greyscale images to it replicated to RGB (see `_rgb`)
    return PatchDiscriminator(in_channels=3, channels=config.disc_channels, num_layers=config.disc_layers)


def build_loss(config: LossConfig, *, max_steps: int | None = None) -> AutoencoderLoss:
    """`AutoencoderLoss` with its perceptual network built from `config` (none when `perceptual_weight == 0`);
    `max_steps` (the run's `train.max_steps`) is the cyclical KL schedule's span unless `kl_total_steps` is set."""
    if config.kl_schedule == "cyclical" and config.kl_total_steps is None:
        if max_steps is None:
            raise ValueError("loss.kl_schedule=cyclical needs loss.kl_total_steps (or build_loss(max_steps=...))")
        config = replace(config, kl_total_steps=max_steps)
    perceptual = None
    if config.perceptual_weight > 0:
        perceptual = build_perceptual(config.perceptual, random_init=config.perceptual_random_init)
    return AutoencoderLoss(config=config, perceptual=perceptual)


class AutoencoderLoss(nn.Module):
    """Generator and discriminator losses of KL / VQ autoencoders (see the module docstring for the scaling).

    Args:
        config (`LossConfig`): weights and switches.
        perceptual (`nn.Module`, *optional*): frozen perceptual distance, `perceptual(x, y) -> (B,)` on images in
            `[-1, 1]` (see `ldtok.perceptual.build_perceptual`); `None` skips the perceptual term.

    Buffers: `lecam_ema` `(2,)` (EMA of the mean real and fake logits) and `lecam_count` `()` (updates so far); they
    are the loss's whole `state_dict`, to checkpoint for exact resume when LeCAM is on.
    """

    def __init__(self, *, config: LossConfig, perceptual: nn.Module | None):
        super().__init__()
        config.validate()
        if perceptual is not None and any(p.requires_grad for p in perceptual.parameters()):
            raise ValueError("the perceptual network must be frozen (requires_grad False); use build_perceptual")
        self.config = config
        self.perceptual = perceptual
        self.register_buffer("lecam_ema", torch.zeros(2))  # [real, fake]
        self.register_buffer("lecam_count", torch.zeros((), dtype=torch.long))
        # Frozen perceptual weights stay out of checkpoints (tens of MB, rebuilt from the installed packages).
        self.register_state_dict_post_hook(_drop_perceptual_keys)
        self.register_load_state_dict_post_hook(_ignore_perceptual_keys)

    # ------------------------------------------------------------------------------------------ schedules

    def disc_active(self, step: int) -> bool:
        """Whether the GAN term and the discriminator step are on at `step`."""
        return step >= self.config.disc_start and self.config.disc_weight > 0

    def kl_weight_at(self, step: int) -> float:
        """KL weight at `step` under `kl_schedule` (linear warm-up, or cyclical)."""
        cfg = self.config
        return reg.kl_weight_at(step, weight=cfg.kl_weight, schedule=cfg.kl_schedule, warmup_steps=cfg.kl_warmup_steps,
                                total_steps=cfg.kl_total_steps, cycles=cfg.kl_cycles, ratio=cfg.kl_ratio)

    # ------------------------------------------------------------------------------------------ generator

    def generator_loss(
        self,
        x: Tensor,
        x_rec: Tensor,
        *,
        discriminator: nn.Module | None,
        last_layer: Tensor | None,
        step: int,
        posterior: DiagonalGaussianDistribution | None = None,
        quant: QuantizerOutput | list[QuantizerOutput] | None = None,
        output: AutoencoderOutput | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The autoencoder's loss.

        Args:
            x (`Tensor` of shape `(B, 3, H, W)`): input images in `[-1, 1]`.
            x_rec (`Tensor` of shape `(B, 3, H, W)`): reconstructions.
            discriminator (`nn.Module`, *optional*): the discriminator (possibly DDP/Accelerate-wrapped); required once
                `disc_active(step)`. Evaluated with detached parameters: it receives no gradient.
            last_layer (`Tensor`, *optional*): the decoder's last weight (`model.last_layer` of the unwrapped model),
                for the adaptive weight. Without it, or without autograd (eval, `torch.no_grad`), the GAN weight is
                `disc_weight`.
            step (`int`): global step (GAN start, KL warm-up).
            posterior (`DiagonalGaussianDistribution`, *optional*): KL models' posterior (`.mean`, `.logvar`).
            quant (`QuantizerOutput` or a list of them, *optional*): VQ models' quantizer outputs.
            output (`AutoencoderOutput`, *optional*): the model's whole output, for the terms that need more than
                the reconstruction: `logits` (`bce`), `latents` (sparsity), `contractive`, `kl_maps` (hierarchical
                VAEs, one KL per level with free bits per level).

        Returns:
            `(loss, terms)`: the scalar loss to backpropagate, and detached scalars for logging: `loss`, `rec`,
            `perceptual`, `nll`, `kl` (free-bits KL per image value, unweighted), `kl_nats` (raw per-sample KL),
            `quant` (unweighted sum of the quantizer losses), `gan` (unweighted generator GAN loss) and
            `adaptive_weight` (the GAN term's weight, `disc_weight` included), `kl_<level>` (hierarchical KL per
            level, nats), `sparsity`, `contractive` (unweighted); only the keys that apply.
        """
        cfg = self.config
        _, C, H, W = x.shape
        assert x_rec.shape == x.shape, f"reconstruction shape {tuple(x_rec.shape)} != input shape {tuple(x.shape)}"
        terms: dict[str, Tensor] = {}

        rec = reg.reconstruction_term(cfg, x, x_rec, output)
        terms["rec"] = rec
        nll = cfg.rec_weight * rec
        if self.perceptual is not None and cfg.perceptual_weight > 0:
            perceptual = self.perceptual(_rgb(x), _rgb(x_rec)).float().mean()
            terms["perceptual"] = perceptual
            nll = nll + cfg.perceptual_weight * perceptual
        terms["nll"] = nll
        rest = torch.zeros((), device=x.device)  # the terms that do not pass through the decoder's output
        posterior = posterior if posterior is not None or output is None else output.posterior
        if output is not None and output.kl_maps is not None:
            kl, kl_nats, per_level = reg.hierarchical_kl(output.kl_maps, free_bits=cfg.free_bits, num_values=C * H * W)
            terms.update({f"kl_{name}": v for name, v in per_level.items()})
        elif posterior is not None:
            kl, kl_nats = self._kl(posterior, num_values=C * H * W)
        if posterior is not None or (output is not None and output.kl_maps is not None):
            terms["kl"], terms["kl_nats"] = kl, kl_nats
            rest = rest + self.kl_weight_at(step) * kl
        rest = rest + reg.classic_regularizers(cfg, output, terms)  # sparsity, contractive: encoder-side terms

        if quant is not None:
            quants = quant if isinstance(quant, (list, tuple)) else [quant]
            quant_loss = torch.stack([q.loss.float() for q in quants]).sum()
            terms["quant"] = quant_loss
            rest = rest + cfg.quant_weight * quant_loss

        loss = nll + rest
        if self.disc_active(step):
            if discriminator is None:
                raise ValueError(f"step {step} >= disc_start {cfg.disc_start}: generator_loss needs the discriminator")
            logits_fake = _call_with_detached_parameters(discriminator, _rgb(x_rec)).float()
            if cfg.disc_loss == "hinge":
                gan = -logits_fake.mean()
            else:
                gan = F.softplus(-logits_fake).mean()
            terms["gan"] = gan
            if self._can_adapt(nll, gan, last_layer):
                # logits decoders (bce): x_rec = f(logits), and the bce term reads the logits themselves
                pivot = output.logits if output is not None and output.logits is not None else x_rec
                loss, terms["adaptive_weight"] = adaptive_gan_loss(
                    pivot, nll=nll, gan=gan, rest=rest, last_layer=last_layer, disc_weight=cfg.disc_weight,
                    max_ratio=cfg.adaptive_weight_max,
                )
            else:
                terms["adaptive_weight"] = torch.tensor(cfg.disc_weight, device=x.device)
                loss = loss + terms["adaptive_weight"] * gan

        terms["loss"] = loss
        return loss, {k: v.detach() for k, v in terms.items()}

    def _kl(self, posterior: DiagonalGaussianDistribution, *, num_values: int) -> tuple[Tensor, Tensor]:
        """(free-bits KL / num_values, raw per-sample KL in nats) of a diagonal Gaussian against N(0, I)."""
        mean, logvar = posterior.mean.float(), posterior.logvar.float()
        kl_map = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)  # (B, C_lat, h, w) nats
        kl_channels = kl_map.sum(dim=(2, 3)).mean(dim=0)  # (C_lat,) per-sample nats of each latent channel
        kl_nats = kl_channels.sum()
        if self.config.free_bits > 0:
            # max(kl_c, floor): a channel under its floor costs a constant, so its posterior gets no KL gradient.
            kl_channels = kl_channels.clamp(min=self.config.free_bits)
        return kl_channels.sum() / num_values, kl_nats

    def _can_adapt(self, nll: Tensor, gan: Tensor, last_layer: Tensor | None) -> bool:
        """Whether the adaptive GAN weight can be formed: it is on, and autograd reaches the decoder's last layer."""
        return bool(
            self.config.adaptive_weight
            and last_layer is not None
            and torch.is_grad_enabled()
            and last_layer.requires_grad
            and nll.requires_grad
            and gan.requires_grad
        )

    # ------------------------------------------------------------------------------------------ discriminator

    def discriminator_loss(
        self, x: Tensor, x_rec: Tensor, *, discriminator: nn.Module, step: int
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The discriminator's loss; the caller runs it only when `disc_active(step)`.

        Args:
            x (`Tensor` of shape `(B, 3, H, W)`): real images.
            x_rec (`Tensor` of shape `(B, 3, H, W)`): reconstructions (detached here).
            discriminator (`nn.Module`): the (possibly wrapped) discriminator, called once on `cat([x, x_rec])`.
            step (`int`): global step (part of the interface; the schedule is the caller's `disc_active`).

        Returns:
            `(loss, terms)` with detached `disc_loss` (the returned loss, LeCAM included), `logits_real`,
            `logits_fake` (batch means) and `lecam` (the unweighted regulariser, when `lecam_weight > 0`).

        LeCAM's EMAs are updated in training mode only (`self.training`, like BatchNorm's running statistics) and are
        averaged over processes when torch.distributed is initialised, so every rank holds the same buffers.
        """
        cfg = self.config
        B = x.shape[0]
        logits = discriminator(_rgb(torch.cat([x, x_rec.detach()], dim=0))).float()  # (2B, 1, h, w)
        logits_real, logits_fake = logits[:B], logits[B:]
        if cfg.disc_loss == "hinge":
            loss = F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean()
        else:
            loss = F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean()
        terms = {"logits_real": logits_real.mean(), "logits_fake": logits_fake.mean()}

        if cfg.lecam_weight > 0:
            if self.training:
                self._update_lecam(terms["logits_real"].detach(), terms["logits_fake"].detach())
            ema_real, ema_fake = self.lecam_ema[0], self.lecam_ema[1]
            lecam = F.relu(logits_real - ema_fake).pow(2).mean() + F.relu(ema_real - logits_fake).pow(2).mean()
            terms["lecam"] = lecam
            loss = loss + cfg.lecam_weight * lecam

        terms["disc_loss"] = loss
        return loss, {k: v.detach() for k, v in terms.items()}

    @torch.no_grad()
    def _update_lecam(self, mean_real: Tensor, mean_fake: Tensor) -> None:
        means = torch.stack([mean_real, mean_fake]).to(self.lecam_ema)  # (2,)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(means)
            means /= dist.get_world_size()
        if self.lecam_count.item() == 0:  # start from the first observation rather than a biased zero
            self.lecam_ema.copy_(means)
        else:
            self.lecam_ema.lerp_(means, 1.0 - self.config.lecam_decay)
        self.lecam_count += 1


def _rgb(x: Tensor) -> Tensor:
    """Greyscale `(B, 1, H, W)` replicated to 3 channels (the perceptual nets and the discriminator see RGB)."""
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def _unwrap(module: nn.Module) -> nn.Module:
    """The module inside DDP-style wrappers (`.module`, as Accelerate's `prepare` gives) and torch.compile's
    (`._orig_mod`)."""
    while True:
        if isinstance(getattr(module, "module", None), nn.Module):
            module = module.module
        elif isinstance(getattr(module, "_orig_mod", None), nn.Module):
            module = module._orig_mod
        else:
            return module


def _call_with_detached_parameters(discriminator: nn.Module, x: Tensor) -> Tensor:
    # Gradients reach x only: nothing accumulates in the discriminator's .grad, and the DDP wrapper's forward (which
    # arms its reducer for a backward that will not come from the generator loss) is never run.
    module = _unwrap(discriminator)
    params = {name: p.detach() for name, p in module.named_parameters()}
    return torch.func.functional_call(module, params, (x,))


def _drop_perceptual_keys(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + "perceptual.")]:
        del state_dict[key]


def _ignore_perceptual_keys(module: nn.Module, incompatible_keys) -> None:
    for keys in (incompatible_keys.missing_keys, incompatible_keys.unexpected_keys):
        keys[:] = [k for k in keys if ".perceptual." not in "." + k]
