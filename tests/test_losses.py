"""AutoencoderLoss, PatchDiscriminator and the perceptual networks, on tiny CPU models."""

from __future__ import annotations

import math
import sys
import types
from urllib.error import URLError

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from torch import nn

from ldtok.discriminator import PatchDiscriminator
from ldtok.errors import LdtokError
from ldtok.losses import AutoencoderLoss, LossConfig, build_discriminator, build_loss
from ldtok.outputs import AutoencoderOutput, QuantizerOutput
from ldtok.perceptual import PerceptualWeightsUnavailable, build_perceptual

H = W = 32
LATENT = 4

# Every weight off: a test switches on the terms it looks at.
OFF = {
    "rec_weight": 0.0,
    "perceptual_weight": 0.0,
    "kl_weight": 0.0,
    "quant_weight": 0.0,
    "disc_weight": 0.0,
    "perceptual": "none",
}


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


class Channel0(nn.Module):
    """A parameter-free 'discriminator' whose logits are channel 0 of its input: hand-made logits."""

    def forward(self, x):
        return x[:, :1]


@pytest.fixture(scope="module")
def lpips_random():
    return build_perceptual("lpips-vgg", random_init=True)


@pytest.fixture(scope="module")
def stlpips_alex():
    return build_perceptual("stlpips-alex")


def images(seed: int = 0, batch: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, H, W, generator=g) * 2 - 1


def grad_norm(params) -> float:
    return sum(float(p.grad.norm()) for p in params if p.grad is not None)


# ------------------------------------------------------------------------------------------------ gradients


@pytest.mark.parametrize("term", ["rec", "perceptual", "kl", "quant", "gan"])
def test_each_term_reaches_the_autoencoder(term, lpips_random):
    torch.manual_seed(0)
    ae = ToyAutoencoder(vq=term == "quant")
    disc = PatchDiscriminator(channels=8, num_layers=2)
    weights = {
        "rec": {"rec_weight": 1.0},
        "perceptual": {"perceptual_weight": 1.0, "perceptual": "lpips-vgg"},
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


# ------------------------------------------------------------------------------------------- GAN objectives


REAL, FAKE = [0.5, 2.0], [-2.0, 0.3]


def logit_images(values: list[float]) -> torch.Tensor:
    return torch.tensor(values).view(-1, 1, 1, 1).expand(-1, 3, 4, 4).clone()  # channel 0 holds the logit


@pytest.mark.parametrize("kind", ["hinge", "non_saturating"])
def test_gan_losses_on_hand_made_logits(kind):
    cfg = LossConfig(**{**OFF, "disc_weight": 1.0, "disc_start": 0, "disc_loss": kind})
    loss_fn = AutoencoderLoss(config=cfg, perceptual=None)
    x, x_rec = logit_images(REAL), logit_images(FAKE)
    d_loss, d_terms = loss_fn.discriminator_loss(x, x_rec, discriminator=Channel0(), step=0)
    _, g_terms = loss_fn.generator_loss(x, x_rec, discriminator=Channel0(), last_layer=None, step=0)

    def sp(v: float) -> float:  # softplus
        return math.log1p(math.exp(v))

    if kind == "hinge":
        expected_d = (0.5 + 0.0) / 2 + (0.0 + 1.3) / 2
        expected_g = -(-2.0 + 0.3) / 2
    else:
        expected_d = (sp(-0.5) + sp(-2.0)) / 2 + (sp(-2.0) + sp(0.3)) / 2
        expected_g = (sp(2.0) + sp(-0.3)) / 2
    assert d_loss.item() == pytest.approx(expected_d, rel=1e-6)
    assert g_terms["gan"].item() == pytest.approx(expected_g, rel=1e-6)
    assert d_terms["logits_real"].item() == pytest.approx(1.25) and d_terms["logits_fake"].item() == pytest.approx(
        -0.85
    )


def test_lecam_buffers_follow_the_logits_in_training_mode_only():
    cfg = LossConfig(**{**OFF, "disc_weight": 1.0, "disc_start": 0, "lecam_weight": 0.1, "lecam_decay": 0.9})
    loss_fn = AutoencoderLoss(config=cfg, perceptual=None)
    x, x_rec = logit_images(REAL), logit_images(FAKE)
    loss, terms = loss_fn.discriminator_loss(x, x_rec, discriminator=Channel0(), step=0)
    assert loss_fn.lecam_ema.tolist() == pytest.approx([1.25, -0.85]) and loss_fn.lecam_count == 1
    # reg = mean(relu(real - ema_fake)^2) + mean(relu(ema_real - fake)^2)
    reg = ((0.5 + 0.85) ** 2 + (2.0 + 0.85) ** 2) / 2 + ((1.25 + 2.0) ** 2 + (1.25 - 0.3) ** 2) / 2
    assert terms["lecam"].item() == pytest.approx(reg, rel=1e-6)
    assert loss.item() == pytest.approx(0.9 + 0.1 * reg, rel=1e-6)

    loss_fn.discriminator_loss(logit_images([3.0, 3.0]), logit_images([-1.0, -1.0]), discriminator=Channel0(), step=1)
    assert loss_fn.lecam_ema.tolist() == pytest.approx([0.9 * 1.25 + 0.1 * 3.0, 0.9 * -0.85 + 0.1 * -1.0])
    loss_fn.eval()
    before = loss_fn.lecam_ema.clone()
    loss_fn.discriminator_loss(x, x_rec, discriminator=Channel0(), step=2)
    assert torch.equal(loss_fn.lecam_ema, before) and loss_fn.lecam_count == 2


def test_disc_active_schedule():
    loss_fn = AutoencoderLoss(config=LossConfig(perceptual="none", disc_start=10), perceptual=None)
    assert not loss_fn.disc_active(9) and loss_fn.disc_active(10) and loss_fn.disc_active(11)
    off = AutoencoderLoss(config=LossConfig(perceptual="none", disc_start=0, disc_weight=0.0), perceptual=None)
    assert not off.disc_active(100)
    x = images()
    _, terms = loss_fn.generator_loss(x, x.clone(), discriminator=None, last_layer=None, step=9)
    assert "gan" not in terms
    with pytest.raises(ValueError, match="needs the discriminator"):
        loss_fn.generator_loss(x, x.clone(), discriminator=None, last_layer=None, step=10)


def test_config_rejects_out_of_range_values():
    with pytest.raises(ValueError, match="reconstruction"):
        LossConfig(reconstruction="l3")
    with pytest.raises(ValueError, match="perceptual"):
        LossConfig(perceptual="lpips-squeeze")
    with pytest.raises(ValueError, match="kl_weight"):
        LossConfig(kl_weight=-1.0)
    assert build_loss(LossConfig(perceptual_weight=0.0)).perceptual is None  # nothing built when unused


# ------------------------------------------------------------------------------------------- discriminator


def test_patch_discriminator_layout():
    disc = build_discriminator(LossConfig(disc_channels=16, disc_layers=3))
    assert disc(images()).shape == (2, 1, H // 8 - 2, W // 8 - 2)
    kinds = {type(m) for m in disc.modules()}
    assert nn.GroupNorm in kinds and not kinds & {nn.BatchNorm2d, nn.SyncBatchNorm, nn.Sigmoid}
    convs = [m for m in disc.modules() if isinstance(m, nn.Conv2d)]
    assert [c.stride[0] for c in convs] == [2, 2, 2, 1, 1] and all(c.kernel_size == (4, 4) for c in convs)
    assert [c.out_channels for c in convs] == [16, 32, 64, 128, 1]
    assert abs(convs[3].weight.std().item() - 0.02) < 2e-3 and convs[3].bias is None
    plain = PatchDiscriminator(channels=8, num_layers=2, norm="none")
    assert not any(isinstance(m, nn.GroupNorm) for m in plain.modules())
    assert all(m.bias is not None for m in plain.modules() if isinstance(m, nn.Conv2d))
    with pytest.raises(ValueError, match="norm"):
        PatchDiscriminator(norm="batch")


# --------------------------------------------------------------------------------------------- perceptual


def forbid_downloads(monkeypatch):
    """Offline as a user without network sees it: torch.hub's download raises URLError (nothing else is replaced)."""
    calls = []

    def offline(url, dst, *args, **kwargs):
        calls.append(url)
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    return calls


def test_lpips_backbone_loads_through_torchvision_and_offline_names_the_file_and_dir(monkeypatch, tmp_path):
    calls = forbid_downloads(monkeypatch)
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    checkpoints = tmp_path / "hub" / "checkpoints"
    with pytest.raises(PerceptualWeightsUnavailable) as error:
        build_perceptual("lpips-vgg")
    # torchvision's normal loading asked for the download (a connected machine would have fetched it there).
    assert len(calls) == 1 and calls[0].endswith("/vgg16-397923af.pth")
    message = str(error.value)
    assert "\n" not in message and isinstance(error.value, LdtokError)
    assert "vgg16-397923af.pth" in message and str(checkpoints) in message and "$TORCH_HOME/hub/checkpoints" in message
    assert "URLError" in message and "stlpips-vgg" in message
    # A corrupt cached file gives the same advice plus the cause, not a raw unpickling error, and no download.
    checkpoints.mkdir(parents=True, exist_ok=True)
    (checkpoints / "alexnet-owt-7be5be79.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(PerceptualWeightsUnavailable, match="alexnet-owt-7be5be79.pth.*loading failed"):
        build_perceptual("lpips-alex")
    assert len(calls) == 1
    # A random backbone needs no file at all.
    assert build_perceptual("lpips-alex", random_init=True) is not None and len(calls) == 1


def test_stlpips_alex_is_offline_frozen_and_a_distance(monkeypatch, stlpips_alex):
    forbid_downloads(monkeypatch)
    net = build_perceptual("stlpips-alex")
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    x = images(0)
    y = images(1).requires_grad_(True)
    assert torch.equal(net(x, x), torch.zeros(2))
    d = net(x, y)
    assert d.shape == (2,) and (d > 0).all()
    d.sum().backward()
    assert y.grad.abs().sum() > 0
    assert build_perceptual("none") is None


def test_stlpips_matches_the_package_implementation(monkeypatch, stlpips_alex):
    # The package's modules import IPython and torchsummary (not dependencies) without using them on this path.
    ipython, torchsummary = types.ModuleType("IPython"), types.ModuleType("torchsummary")
    ipython.embed, torchsummary.summary = (lambda *a, **k: None), (lambda *a, **k: None)
    monkeypatch.setitem(sys.modules, "IPython", ipython)
    monkeypatch.setitem(sys.modules, "torchsummary", torchsummary)
    from stlpips_pytorch import stlpips

    reference = stlpips.LPIPS(net="alex", variant="shift_tolerant", verbose=False).eval()
    x, y = images(0), images(1)
    with torch.no_grad():
        assert torch.allclose(stlpips_alex(x, y), reference(x, y).flatten(), rtol=1e-5, atol=1e-7)
