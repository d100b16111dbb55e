"""The colour term of the generator loss (`ldtok.losses.colour`, `loss.colour_weight`): the differentiable CIELAB
conversion against scikit-image, what the term sees (chroma, not lightness; regions, not pixels, when pooled), its
precision under autocast, its place in the NLL and its config checks."""

import pytest
import torch
from loss_helpers import OFF, images
from skimage.color import rgb2lab

from ldtok.config import ConfigError
from ldtok.losses import AutoencoderLoss, LossConfig
from ldtok.losses.colour import LAB_UNIT, colour_term, rgb_to_lab


def _grey(x: torch.Tensor) -> torch.Tensor:
    """The images with their colour removed (the channel mean copied to R, G and B)."""
    return x.mean(dim=1, keepdim=True).expand_as(x)


def test_rgb_to_lab_matches_skimage_and_has_finite_gradients_out_of_range():
    x = images(seed=3)
    ref = torch.from_numpy(rgb2lab(((x + 1) / 2).permute(0, 2, 3, 1).double().numpy())).permute(0, 3, 1, 2)
    assert torch.allclose(rgb_to_lab(x).double(), ref, atol=1e-3)
    # a decoder's raw output leaves [-1, 1]: no clamp, so no dead or infinite gradient there
    raw = torch.tensor([-1.6, -1.0, 0.0, 1.0, 1.4]).view(1, 1, 5, 1).expand(1, 3, 5, 1).clone().requires_grad_()
    rgb_to_lab(raw).sum().backward()
    assert torch.isfinite(raw.grad).all() and (raw.grad != 0).all()


def test_colour_term_sees_chroma_not_lightness():
    x = images(seed=0)
    assert colour_term(x, x.clone(), pool=1) == 0
    grey = _grey(x)
    assert colour_term(grey, (grey + 0.3).clamp(-1, 1), pool=1) < 1e-4  # lightness only: no chroma error
    half, none = 0.5 * x + 0.5 * grey, grey  # half and all of the colour gone
    t_half, t_none = colour_term(x, half, pool=1), colour_term(x, none, pool=1)
    assert 0 < t_half < t_none
    chroma = rgb_to_lab(x)[:, 1:]
    assert torch.allclose(t_none, chroma.abs().mean() / LAB_UNIT, rtol=1e-3)  # grey has a* = b* = 0
    assert colour_term(grey[:, :1], grey[:, :1] + 0.3, pool=1) == 0  # greyscale images have no chroma


def test_pooling_asks_for_the_colour_of_regions_not_of_pixels():
    x = torch.zeros(1, 3, 32, 32)
    x[:, 0] = 0.3  # a flat reddish image
    checker = ((torch.arange(32).view(-1, 1) + torch.arange(32).view(1, -1)) % 2).float() * 2 - 1  # +-1 per pixel
    noisy = x.clone()
    noisy[:, 1] += 0.2 * checker  # green flickers pixel to pixel, the 4x4 means keep the colour
    shifted = x.clone()
    shifted[:, 1] += 0.2  # the whole region turns greener
    assert colour_term(x, noisy, pool=1) > 10 * colour_term(x, noisy, pool=4)
    assert colour_term(x, shifted, pool=4) > 10 * colour_term(x, noisy, pool=4)


def test_colour_term_is_fp32_under_bf16_autocast():
    x = images()
    x_rec = (x * 0.8).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        t = colour_term(x.bfloat16(), x_rec.bfloat16(), pool=4)
    assert t.dtype == torch.float32
    assert torch.allclose(t, colour_term(x.bfloat16().float(), x_rec.bfloat16().float(), pool=4))


def test_colour_term_is_weighted_into_the_nll_and_off_by_default():
    x = images()
    x_rec = (0.7 * x).requires_grad_()
    cfg = LossConfig(**{**OFF, "rec_weight": 1.0, "colour_weight": 2.5, "colour_pool": 2})
    loss, terms = AutoencoderLoss(config=cfg, perceptual=None).generator_loss(
        x, x_rec, discriminator=None, last_layer=None, step=0)
    assert torch.allclose(terms["nll"], terms["rec"] + 2.5 * terms["colour"])
    assert torch.allclose(terms["colour"], colour_term(x, x_rec, pool=2))
    loss.backward()
    assert x_rec.grad is not None and x_rec.grad.abs().sum() > 0
    _, terms = AutoencoderLoss(config=LossConfig(**{**OFF, "rec_weight": 1.0}), perceptual=None).generator_loss(
        x, x_rec, discriminator=None, last_layer=None, step=0)
    assert "colour" not in terms and LossConfig().colour_weight == 0


@pytest.mark.parametrize("key,value", [("colour_weight", -1.0), ("colour_pool", 0)])
def test_bad_colour_settings_name_the_key(key, value):
    with pytest.raises(ConfigError, match=key):
        LossConfig(**{key: value})


def test_lab_channels_also_hold_the_lightness_of_each_region():
    x = images(seed=0)
    grey = _grey(x)
    lighter = (grey + 0.3).clamp(-1, 1)
    assert colour_term(grey, lighter, pool=4, channels="ab") < 1e-4  # the chroma alone lets lightness drift
    lab = colour_term(grey, lighter, pool=4, channels="lab")
    pooled = torch.nn.functional.avg_pool2d
    expected = (rgb_to_lab(pooled(lighter, 4))[:, 0] - rgb_to_lab(pooled(grey, 4))[:, 0]).abs().mean() / LAB_UNIT
    assert lab > 0.1 and torch.allclose(lab, expected, rtol=1e-3)
    half = 0.5 * x + 0.5 * grey  # "lab" keeps the whole chroma error and adds the lightness error to it
    ab, lab_half = colour_term(x, half, pool=4), colour_term(x, half, pool=4, channels="lab")
    light = (rgb_to_lab(pooled(half, 4))[:, 0] - rgb_to_lab(pooled(x, 4))[:, 0]).abs().mean() / LAB_UNIT
    assert torch.allclose(lab_half, ab + light, rtol=1e-4)
    cfg = LossConfig(**{**OFF, "rec_weight": 1.0, "colour_weight": 1.0, "colour_channels": "lab"})
    _, terms = AutoencoderLoss(config=cfg, perceptual=None).generator_loss(
        grey, lighter, discriminator=None, last_layer=None, step=0)
    assert torch.allclose(terms["colour"], lab)
    with pytest.raises(ConfigError, match="colour_channels"):
        LossConfig(colour_channels="rgb")


class _PerChannelL1(torch.nn.Module):
    """A hand-made frozen 'perceptual distance': the L1 of each channel, weighted 1 / 2 / 3, so that it tells the
    channels apart (a luma input gives three equal channels)."""

    def forward(self, a, b):
        w = torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1)
        return ((a - b).abs() * w).mean(dim=(1, 2, 3))


# (view, the per-channel weights of its grey image, a colour change that leaves that grey image unchanged)
GREY_VIEWS = [("luma", (0.299, 0.587, 0.114), (0.114, 0.0, -0.299)), ("grey", (1 / 3, 1 / 3, 1 / 3), (1.0, 0.0, -1.0))]


@pytest.mark.parametrize("inp,weights,invisible", GREY_VIEWS)
def test_grey_perceptual_inputs_see_one_grey_image_and_their_gradient_follows_its_weights(inp, weights, invisible):
    """`loss.perceptual_input=luma|grey`: the perceptual term compares one grey image per input, so a colour change
    that keeps it is invisible to the term (not to `rgb`), and the gradient on the reconstruction is parallel to the
    view's weights at every pixel: for `grey` equal in R, G and B (it changes no colour balance); for `luma` not."""
    from ldtok.losses.autoencoder import LUMA_WEIGHTS

    assert inp != "luma" or weights == LUMA_WEIGHTS
    x = images(seed=0)
    w = torch.tensor(weights).view(1, 3, 1, 1)
    invisible = torch.tensor(invisible).view(1, 3, 1, 1)
    assert abs(float((invisible * w).sum())) < 1e-9

    def perceptual(view, x_rec):
        cfg = LossConfig(**{**OFF, "perceptual_weight": 1.0, "perceptual": "stlpips-alex", "perceptual_input": view})
        x_rec = x_rec.clone().requires_grad_()
        loss, terms = AutoencoderLoss(config=cfg, perceptual=_PerChannelL1()).generator_loss(
            x, x_rec, discriminator=None, last_layer=None, step=0)
        loss.backward()
        return terms["perceptual"], x_rec.grad

    recolored = x + 0.2 * invisible
    grey_term, _ = perceptual(inp, recolored)
    rgb_term, _ = perceptual("rgb", recolored)
    assert grey_term < 1e-6 < rgb_term  # a colour change that keeps the grey image is invisible to that view only
    # a lighter image: its grey image is 0.2 * sum(w) higher in all three channels, weighted (1 + 2 + 3) / 3
    assert torch.allclose(perceptual(inp, x + 0.2)[0], torch.tensor(0.2 * sum(weights) * 2.0), rtol=1e-4)
    _, grad = perceptual(inp, x + 0.1 * torch.randn_like(x))
    ratio = grad / w
    assert (grad.abs().sum() > 0) and torch.allclose(ratio, ratio[:, :1].expand_as(ratio), atol=1e-6, rtol=1e-4)
    equal_channels = torch.allclose(grad, grad[:, :1].expand_as(grad), atol=1e-7, rtol=1e-4)
    assert equal_channels == (inp == "grey")
    with pytest.raises(ConfigError, match="perceptual_input"):
        LossConfig(perceptual_input="lab")
