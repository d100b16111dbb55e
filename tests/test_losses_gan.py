"""The GAN side of AutoencoderLoss (hinge / non-saturating objectives, LeCAM, the GAN schedule), LossConfig's
validation, and the PatchGAN discriminator."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from loss_helpers import OFF, Channel0, H, W, images
from torch import nn

from ldtok.config import ConfigError, load_config
from ldtok.discriminator import PatchDiscriminator
from ldtok.losses import AutoencoderLoss, LossConfig, build_discriminator, build_loss

ROOT = Path(__file__).resolve().parents[1]


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


@pytest.mark.parametrize("override, message", [
    ("loss.kl_weight=-1", "loss.kl_weight: must be >= 0, got -1.0"),
    ("loss.perceptual=lpips-squeeze", "loss.perceptual: unknown choice 'lpips-squeeze' (allowed: lpips-vgg, "),
    ("loss.lecam_decay=1", "loss.lecam_decay: must be < 1.0, got 1.0"),
    ("train.lr=-1", "train.lr: must be >= 0, got -1.0"),
    ("train.adam_betas=[0.5]", "train.adam_betas: needs 2 values, got [0.5]"),
])
def test_a_bad_value_is_a_config_error_naming_its_key(override, message):
    from ldtok.training import RunConfig

    with pytest.raises(ConfigError) as error:
        load_config(RunConfig, None, [override])
    assert str(error.value).startswith(message), str(error.value)


def test_a_training_script_reports_a_bad_loss_value_in_one_line_with_exit_code_2():
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tokenizers"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "train" / "vae.py"), "--config", str(ROOT / "configs" /
                             "demo-kl.yaml"), "loss.kl_weight=-1"], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == ["config error: loss.kl_weight: must be >= 0, got -1.0"]


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


@pytest.mark.parametrize("inp,weights,invisible", [("luma", (0.299, 0.587, 0.114), (0.114, 0.0, -0.299)),
                                                    ("grey", (1 / 3, 1 / 3, 1 / 3), (1.0, 0.0, -1.0))])
def test_grey_disc_inputs_see_one_grey_image_and_the_gan_gradient_follows_its_weights(inp, weights, invisible):
    """`loss.disc_input=luma|grey`: the discriminator gets one grey image of the real and reconstructed images
    alike, so a colour change that keeps it changes neither its logits nor the GAN term (`rgb`, the default, sees
    it), and the GAN gradient on the reconstruction is parallel to the view's weights at every pixel (for `grey`:
    equal in R, G and B)."""
    g = torch.Generator().manual_seed(0)
    x, x_rec = (torch.rand(2, 3, 8, 8, generator=g) * 2 - 1 for _ in range(2))
    w = torch.tensor(weights).view(1, 3, 1, 1)
    invisible = torch.tensor(invisible).view(1, 3, 1, 1)
    assert abs(float((invisible * w).sum())) < 1e-9
    disc = torch.nn.Conv2d(3, 1, 3, padding=1)  # sees each channel with its own weights

    def run(view, rec):
        loss_fn = AutoencoderLoss(config=LossConfig(**{**OFF, "disc_weight": 1.0, "disc_start": 0,
                                                       "adaptive_weight": False, "disc_input": view}), perceptual=None)
        rec = rec.clone().requires_grad_()
        g_loss, g_terms = loss_fn.generator_loss(x, rec, discriminator=disc, last_layer=None, step=0)
        g_loss.backward()
        d_loss, _ = loss_fn.discriminator_loss(x, rec, discriminator=disc, step=0)
        return g_terms["gan"], d_loss.detach(), rec.grad

    recolored = x_rec + 0.3 * invisible
    for view, same in ((inp, True), ("rgb", False)):
        gan, d_loss, _ = run(view, x_rec)
        gan2, d_loss2, _ = run(view, recolored)
        assert torch.allclose(gan, gan2, atol=1e-6) == same and torch.allclose(d_loss, d_loss2, atol=1e-6) == same
    _, _, grad = run(inp, x_rec)
    ratio = grad / w
    assert grad.abs().sum() > 0 and torch.allclose(ratio, ratio[:, :1].expand_as(ratio), atol=1e-7, rtol=1e-4)
    _, _, grad_rgb = run("rgb", x_rec)
    assert not torch.allclose(grad_rgb / w, (grad_rgb / w)[:, :1].expand_as(grad_rgb), atol=1e-6)
    with pytest.raises(ConfigError, match="disc_input"):
        LossConfig(disc_input="lab")
