"""The autoencoder loss module: `AutoencoderLoss` (generator and discriminator losses), `build_loss`,
`build_discriminator`. The scaling convention and who owns what: see `ldtok.losses`."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldtok import regularizers as reg
from ldtok.adaptive_weight import adaptive_gan_loss
from ldtok.discriminator import PatchDiscriminator
from ldtok.distributed import all_reduce_, world_size
from ldtok.outputs import AutoencoderOutput, QuantizerOutput
from ldtok.perceptual import build_perceptual

from .colour import colour_term
from .config import LossConfig
from .shaping import shaping_terms

if TYPE_CHECKING:
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    from ldtok.shaping.equivariance import SpatialTransform


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
        transform: SpatialTransform | None = None,
        alignment: tuple[Tensor, Tensor] | None = None,
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
                VAEs, one KL per level with free bits per level), `equivariant_sample` (EQ-VAE).
            transform (`SpatialTransform`, *optional*): the batch's EQ-VAE transform, when `output` holds the
                decoding of the transformed latent (`loss.equivariance_weight`).
            alignment (`tuple[Tensor, Tensor]`, *optional*): `(projected latent, frozen features)`, both
                `(B, D, h, w)`, for the alignment term (`loss.align_weight`).

        Returns:
            `(loss, terms)`: the scalar loss to backpropagate, and detached scalars for logging: `loss`, `rec`,
            `perceptual`, `colour` (unweighted), `nll`, `kl` (free-bits KL per image value, unweighted), `kl_nats`
            (raw per-sample KL),
            `quant` (unweighted sum of the quantizer losses), `gan` (unweighted generator GAN loss) and
            `adaptive_weight` (the GAN term's weight, `disc_weight` included), `kl_<level>` (hierarchical KL per
            level, nats), `sparsity`, `contractive`, `equivariance`, `align_cos`, `align_dist` (unweighted); only
            the keys that apply.
        """
        cfg = self.config
        _, C, H, W = x.shape
        assert x_rec.shape == x.shape, f"reconstruction shape {tuple(x_rec.shape)} != input shape {tuple(x.shape)}"
        terms: dict[str, Tensor] = {}

        rec = reg.reconstruction_term(cfg, x, x_rec, output)
        terms["rec"] = rec
        nll = cfg.rec_weight * rec
        if self.perceptual is not None and cfg.perceptual_weight > 0:
            perceptual = self.perceptual(view(x, cfg.perceptual_input), view(x_rec, cfg.perceptual_input))
            perceptual = perceptual.float().mean()
            terms["perceptual"] = perceptual
            nll = nll + cfg.perceptual_weight * perceptual
        beside = 0.0  # the colour term when it is left out of the NLL that sets the adaptive GAN weight
        if cfg.colour_weight > 0:
            terms["colour"] = colour_term(x, x_rec, pool=cfg.colour_pool, channels=cfg.colour_channels)
            if cfg.colour_in_adaptive_weight:
                nll = nll + cfg.colour_weight * terms["colour"]
            else:
                beside = cfg.colour_weight * terms["colour"]
        terms["nll"] = nll + beside
        rest = self._latent_terms(terms, step=step, num_values=C * H * W, posterior=posterior, quant=quant,
                                  output=output)
        rest = rest + shaping_terms(cfg, self.perceptual, x, output=output, transform=transform, alignment=alignment,
                                    terms=terms) + beside

        loss = nll + rest
        if self.disc_active(step):
            loss = self._gan_term(terms, x_rec, discriminator=discriminator, last_layer=last_layer, step=step,
                                  nll=nll, rest=rest, output=output)
        terms["loss"] = loss
        return loss, {k: v.detach() for k, v in terms.items()}

    def _latent_terms(self, terms: dict[str, Tensor], *, step: int, num_values: int,
                      posterior: DiagonalGaussianDistribution | None, quant, output: AutoencoderOutput | None
                      ) -> Tensor:
        """The weighted terms that do not pass through the decoder's output (KL, encoder-side regularizers,
        quantizer losses); adds their unweighted values to `terms`."""
        cfg = self.config
        rest = torch.zeros((), device=terms["rec"].device)
        posterior = posterior if posterior is not None or output is None else output.posterior
        if output is not None and output.kl_maps is not None:
            kl, kl_nats, per_level = reg.hierarchical_kl(output.kl_maps, free_bits=cfg.free_bits, num_values=num_values)
            terms.update({f"kl_{name}": v for name, v in per_level.items()})
        elif posterior is not None:
            kl, kl_nats = self._kl(posterior, num_values=num_values)
        if posterior is not None or (output is not None and output.kl_maps is not None):
            terms["kl"], terms["kl_nats"] = kl, kl_nats
            rest = rest + self.kl_weight_at(step) * kl
        rest = rest + reg.classic_regularizers(cfg, output, terms)  # sparsity, contractive: encoder-side terms
        if quant is not None:
            quants = quant if isinstance(quant, (list, tuple)) else [quant]
            quant_loss = torch.stack([q.loss.float() for q in quants]).sum()
            terms["quant"] = quant_loss
            rest = rest + cfg.quant_weight * quant_loss
        return rest

    def _gan_term(self, terms: dict[str, Tensor], x_rec: Tensor, *, discriminator: nn.Module | None,
                  last_layer: Tensor | None, step: int, nll: Tensor, rest: Tensor,
                  output: AutoencoderOutput | None) -> Tensor:
        """The whole generator loss once the GAN is on: `nll + rest +` the (adaptively) weighted GAN term, the weight
        set by `nll` alone; adds `gan` and `adaptive_weight` to `terms`."""
        cfg = self.config
        if discriminator is None:
            raise ValueError(f"step {step} >= disc_start {cfg.disc_start}: generator_loss needs the discriminator")
        logits_fake = _call_with_detached_parameters(discriminator, view(x_rec, cfg.disc_input)).float()
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
            return loss
        terms["adaptive_weight"] = torch.tensor(cfg.disc_weight, device=x_rec.device)
        return nll + rest + terms["adaptive_weight"] * gan

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
        logits = discriminator(view(torch.cat([x, x_rec.detach()], dim=0), cfg.disc_input)).float()  # (2B, 1, h, w)
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
        if world_size() > 1:  # every rank holds the same statistics
            all_reduce_(means)
            means /= world_size()
        if self.lecam_count.item() == 0:  # start from the first observation rather than a biased zero
            self.lecam_ema.copy_(means)
        else:
            self.lecam_ema.lerp_(means, 1.0 - self.config.lecam_decay)
        self.lecam_count += 1


def _rgb(x: Tensor) -> Tensor:
    """Greyscale `(B, 1, H, W)` replicated to 3 channels (the perceptual nets and the discriminator see RGB)."""
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


LUMA_WEIGHTS = (0.299, 0.587, 0.114)  # Rec. 601


def view(x: Tensor, kind: str) -> Tensor:
    """What a perceptual net or the discriminator sees of `(B, C, H, W)` images (`loss.perceptual_input`,
    `loss.disc_input`): `"rgb"` the images (greyscale replicated to 3 channels); `"luma"` their Rec. 601 luma, and
    `"grey"` their channel mean, replicated to 3 channels. The gradient of a loss on the `grey` view is equal in R, G
    and B at every pixel; on the `luma` view it is parallel to `LUMA_WEIGHTS`, which also moves the colour."""
    if kind == "rgb" or x.shape[1] == 1:
        return _rgb(x)
    if kind == "luma":
        w = x.new_tensor(LUMA_WEIGHTS).view(1, 3, 1, 1)
        return (x * w).sum(dim=1, keepdim=True).expand(-1, 3, -1, -1)
    if kind == "grey":
        return x.mean(dim=1, keepdim=True).expand(-1, 3, -1, -1)
    raise ValueError(f"unknown view {kind!r}: expected rgb, luma or grey")


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
