"""AutoencoderLoss, PatchDiscriminator and the perceptual networks, on tiny CPU models."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from loss_helpers import OFF, H, W, images
from torch import nn

from ldtok.discriminator import PatchDiscriminator
from ldtok.losses import AutoencoderLoss, LossConfig
from ldtok.outputs import AutoencoderOutput, QuantizerOutput
from ldtok.perceptual import build_perceptual

LATENT = 4

class ToyAutoencoder(nn.Module):
    """conv encoder -> (mean, logvar) or a straight-through VQ -> conv decoder, whose last conv is `last_layer`."""

    def __init__(self, *, vq: bool = False):
        super().__init__()
        self.vq = vq
        self.encoder = nn.Conv2d(3, LATENT if vq else 2 * LATENT, 3, stride=2, padding=1)
        self.codebook = nn.Parameter(torch.randn(8, LATENT)) if vq else None
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(LATENT, 8, 4, stride=2, padding=1), nn.SiLU(), nn.Conv2d(8, 3, 3, padding=1)
        )

    @property
    def last_layer(self) -> torch.Tensor:
        return self.decoder[-1].weight

    def forward(self, x: torch.Tensor) -> AutoencoderOutput:
        h = self.encoder(x)  # (B, 2*LATENT or LATENT, H/2, W/2)
        if not self.vq:
            posterior = DiagonalGaussianDistribution(h)
            return AutoencoderOutput(sample=self.decoder(posterior.sample()), posterior=posterior)
        B, C, h_, w_ = h.shape
        flat = h.permute(0, 2, 3, 1).reshape(-1, C)  # (B*h*w, C)
        indices = torch.cdist(flat, self.codebook).argmin(dim=1)
        z_q = self.codebook[indices].reshape(B, h_, w_, C).permute(0, 3, 1, 2)  # (B, C, h, w)
        commit, codebook = F.mse_loss(h, z_q.detach()), F.mse_loss(h.detach(), z_q)
        quant = QuantizerOutput(
            quantized=h + (z_q - h).detach(),
            indices=indices.reshape(B, h_, w_),
            loss=0.25 * commit + codebook,
            commit_loss=commit,
            codebook_loss=codebook,
            perplexity=torch.tensor(1.0),
            usage=torch.tensor(1.0),
        )
        return AutoencoderOutput(sample=self.decoder(quant.quantized), quant=quant)


class CountingWrapper(nn.Module):
    """Stands for a DDP/Accelerate wrapper: `.module`, and a forward that counts its calls."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.module(x)


@pytest.fixture(scope="module")
def lpips_random():
    return build_perceptual("lpips-vgg", random_init=True)


@pytest.fixture(scope="module")
def stlpips_alex():
    return build_perceptual("stlpips-alex")


def grad_norm(params) -> float:
    return sum(float(p.grad.norm()) for p in params if p.grad is not None)


# ------------------------------------------------------------------------------------------------ gradients


@pytest.mark.parametrize("term", ["rec", "perceptual", "colour", "kl", "quant", "gan"])
def test_each_term_reaches_the_autoencoder(term, lpips_random):
    torch.manual_seed(0)
    ae = ToyAutoencoder(vq=term == "quant")
    disc = PatchDiscriminator(channels=8, num_layers=2)
    weights = {
        "rec": {"rec_weight": 1.0},
        "perceptual": {"perceptual_weight": 1.0, "perceptual": "lpips-vgg"},
        "colour": {"colour_weight": 1.0},
        "kl": {"kl_weight": 1.0},
        "quant": {"quant_weight": 1.0},
        "gan": {"disc_weight": 1.0, "disc_start": 0, "adaptive_weight": False},
    }[term]
    loss_fn = AutoencoderLoss(
        config=LossConfig(**{**OFF, **weights}), perceptual=lpips_random if term == "perceptual" else None
    )
    x = images()
    out = ae(x)
    loss, terms = loss_fn.generator_loss(
        x, out.sample, discriminator=disc, last_layer=ae.last_layer, step=10, posterior=out.posterior, quant=out.quant
    )
    loss.backward()
    assert term in terms and terms[term] != 0
    assert grad_norm(ae.encoder.parameters()) > 0, f"{term} does not reach the encoder"
    if term in ("kl", "quant"):  # latent-space terms touch the encoder (and codebook) only
        assert grad_norm(ae.decoder.parameters()) == 0
    else:
        assert grad_norm(ae.decoder.parameters()) > 0, f"{term} does not reach the decoder"
    if term == "quant":
        assert ae.codebook.grad is not None and ae.codebook.grad.norm() > 0
    assert all(p.grad is None for p in disc.parameters())


def test_total_is_the_weighted_sum_of_the_terms(stlpips_alex):
    torch.manual_seed(0)
    ae, disc = ToyAutoencoder(), PatchDiscriminator(channels=8, num_layers=2)
    cfg = LossConfig(
        perceptual="stlpips-alex",
        perceptual_weight=0.7,
        rec_weight=2.0,
        kl_weight=0.1,
        disc_start=5,
        disc_weight=0.5,
        kl_warmup_steps=20,
    )
    loss_fn = AutoencoderLoss(config=cfg, perceptual=stlpips_alex)
    x = images()
    out = ae(x)
    loss, t = loss_fn.generator_loss(
        x, out.sample, discriminator=disc, last_layer=ae.last_layer, step=10, posterior=out.posterior
    )
    assert set(t) == {"loss", "rec", "perceptual", "nll", "kl", "kl_nats", "gan", "adaptive_weight"}
    assert torch.allclose(t["nll"], 2.0 * t["rec"] + 0.7 * t["perceptual"])
    assert torch.allclose(t["kl"], t["kl_nats"] / (3 * H * W))  # no free bits: the raw KL per image value
    expected = t["nll"] + 0.1 * (10 / 20) * t["kl"] + t["adaptive_weight"] * t["gan"]
    assert torch.allclose(loss, expected) and torch.allclose(t["loss"], loss.detach())
    assert torch.allclose(t["rec"], (out.sample - x).abs().mean())
    # The loss trains nothing itself and keeps only its LeCAM statistics in checkpoints.
    assert not [p for p in loss_fn.parameters() if p.requires_grad]
    assert set(loss_fn.state_dict()) == {"lecam_ema", "lecam_count"}
    loss_fn.load_state_dict({"lecam_ema": torch.ones(2), "lecam_count": torch.tensor(3)})  # strict
    assert loss_fn.lecam_count == 3
    loss_fn.train()
    assert not stlpips_alex.training  # frozen networks stay in eval mode


def test_generator_loss_leaves_the_discriminator_alone_and_discriminator_loss_the_autoencoder():
    torch.manual_seed(0)
    ae = ToyAutoencoder()
    disc = CountingWrapper(PatchDiscriminator(channels=8, num_layers=2))
    loss_fn = AutoencoderLoss(config=LossConfig(perceptual="none", disc_start=0), perceptual=None)
    x = images()
    out = ae(x)
    g_loss, terms = loss_fn.generator_loss(
        x, out.sample, discriminator=disc, last_layer=ae.last_layer, step=0, posterior=out.posterior
    )
    g_loss.backward()
    assert disc.calls == 0, "the generator loss must not run the wrapper's (DDP) forward"
    assert all(p.grad is None for p in disc.parameters())
    assert grad_norm(ae.parameters()) > 0 and terms["gan"] != 0

    ae.zero_grad(set_to_none=True)
    out = ae(x)
    d_loss, d_terms = loss_fn.discriminator_loss(x, out.sample, discriminator=disc, step=0)
    d_loss.backward()
    assert disc.calls == 1, "real and fake go through the discriminator in one forward"
    assert all(p.grad is None for p in ae.parameters())
    assert grad_norm(disc.parameters()) > 0
    assert set(d_terms) == {"disc_loss", "logits_real", "logits_fake"}


# ------------------------------------------------------------------------------------------ adaptive weight


class ScaledDecoder(nn.Module):
    """x_rec = w * u with a scalar weight w: both gradients w.r.t. w have closed forms."""

    def __init__(self, u: torch.Tensor):
        super().__init__()
        self.u = u
        self.w = nn.Parameter(torch.tensor([0.3]))

    def forward(self):
        return self.w * self.u


def test_adaptive_weight_is_the_gradient_norm_ratio_and_is_clamped():
    g = torch.Generator().manual_seed(0)
    u, x = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    a = torch.tensor([0.5, -1.0, 2.0])
    disc = nn.Conv2d(3, 1, 1, bias=False)  # logits = sum_c a_c x_c
    disc.weight.data.copy_(a.view(1, 3, 1, 1))
    dec = ScaledDecoder(u)
    w = dec.w.item()
    # L2 nll = mean((w u - x)^2): d/dw = 2 mean((w u - x) u).
    # Hinge g = -mean(sum_c a_c w u_c): d/dw = -mean(sum_c a_c u_c).
    nll_grad = 2 * ((w * u - x) * u).mean()
    gan_grad = -(a.view(1, 3, 1, 1) * u).sum(dim=1).mean()
    ratio = (nll_grad.abs() / (gan_grad.abs() + 1e-4)).item()

    def weight(**overrides):
        cfg = LossConfig(
            **{**OFF, "rec_weight": 1.0, "reconstruction": "l2", "disc_weight": 0.5, "disc_start": 0, **overrides}
        )
        x_rec = dec()
        _, terms = AutoencoderLoss(config=cfg, perceptual=None).generator_loss(
            x, x_rec, discriminator=disc, last_layer=dec.w, step=0
        )
        return terms["adaptive_weight"].item()

    assert math.isclose(weight(), 0.5 * ratio, rel_tol=1e-5)
    assert math.isclose(weight(adaptive_weight_max=ratio / 4), 0.5 * ratio / 4, rel_tol=1e-5)  # clamped
    assert weight(adaptive_weight=False) == 0.5
    with torch.no_grad():  # evaluation: no autograd, falls back to disc_weight
        assert weight() == 0.5
    assert dec.w.grad is None and disc.weight.grad is None  # autograd.grad accumulates nothing


# ---------------------------------------------------------------------------------------------------- KL


def posterior_params(B: int = 2) -> torch.Tensor:
    """(B, 2*LATENT, 2, 2): channel 0 far from the prior, the other channels almost on it."""
    mean = torch.full((B, LATENT, 2, 2), 0.01)
    mean[:, 0] = 3.0
    logvar = torch.full((B, LATENT, 2, 2), 0.02)
    return torch.cat([mean, logvar], dim=1).requires_grad_(True)


def test_free_bits_stop_the_kl_gradient_of_channels_under_the_floor():
    params = posterior_params()
    x = images()
    cfg = LossConfig(**{**OFF, "kl_weight": 1.0, "free_bits": 0.5})
    loss, terms = AutoencoderLoss(config=cfg, perceptual=None).generator_loss(
        x, x.clone(), discriminator=None, last_layer=None, step=0, posterior=DiagonalGaussianDistribution(params)
    )
    loss.backward()
    mean, logvar = params.chunk(2, dim=1)
    kl_map = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar)
    per_channel = kl_map.sum(dim=(2, 3)).mean(dim=0)  # (LATENT,) nats
    assert per_channel[0] > 0.5 and (per_channel[1:] < 0.5).all()
    assert torch.allclose(terms["kl_nats"], per_channel.sum())
    assert torch.allclose(terms["kl"], (per_channel[0] + 0.5 * (LATENT - 1)) / (3 * H * W))
    grad_mean, grad_logvar = params.grad.chunk(2, dim=1)
    assert grad_mean[:, 0].abs().min() > 0 and grad_logvar[:, 0].abs().min() > 0
    assert (grad_mean[:, 1:] == 0).all() and (grad_logvar[:, 1:] == 0).all()


def test_kl_warmup_is_linear():
    params = posterior_params()
    x = images()
    loss_fn = AutoencoderLoss(config=LossConfig(**{**OFF, "kl_weight": 1e-2, "kl_warmup_steps": 100}), perceptual=None)
    values = []
    for step in (0, 25, 50, 100, 400):
        loss, terms = loss_fn.generator_loss(
            x, x.clone(), discriminator=None, last_layer=None, step=step, posterior=DiagonalGaussianDistribution(params)
        )
        values.append(loss.item() / terms["kl"].item())
    assert values == pytest.approx([0.0, 2.5e-3, 5e-3, 1e-2, 1e-2])
