"""The adaptive GAN weight with one backward through the perceptual net and the discriminator equals the two-pass
formulation of taming / LDM / diffusers' scripts: same weight, same parameter gradients (fp32, tight tolerance)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ldtok.losses import AutoencoderLoss, LossConfig, build_discriminator
from ldtok.losses.colour import colour_term
from ldtok.models import ModelConfig, build_model
from ldtok.perceptual import build_perceptual
from ldtok.quantizers import QuantizerConfig

TINY = {"block_out_channels": [32, 64], "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 32,
        "sample_size": 32, "mid_block_add_attention": False}
CONFIG = LossConfig(reconstruction="l1", perceptual="lpips-vgg", perceptual_weight=1.0, perceptual_random_init=True,
                    disc_start=0, disc_weight=0.5, disc_channels=16, disc_layers=2, kl_weight=1e-2, quant_weight=1.0)


def tiny_model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    config = ModelConfig(type=kind, **TINY)
    if kind != "kl":
        config.quantizer = QuantizerConfig(codebook_size=32, codebook_dim=4, kmeans_init=False, dead_code_steps=0)
    return build_model(config).train()


class BackwardCounter:
    """Counts the backward passes through a module (a full backward hook fires once per pass)."""

    def __init__(self, module: nn.Module):
        self.calls = 0
        module.register_full_backward_hook(lambda *_: self._count())

    def _count(self) -> None:
        self.calls += 1


def two_pass_step(model, loss_fn, disc, x):
    """taming's `LPIPSWithDiscriminator` shape: two `autograd.grad(..., retain_graph=True)`, then a full backward."""
    torch.manual_seed(1)
    out = model(x)
    x_rec = out.sample
    C, H, W = x.shape[1:]
    nll = (x_rec - x).abs().mean() + loss_fn.perceptual(x, x_rec).mean()
    rest = (loss_fn.kl_weight_at(0) * loss_fn._kl(out.posterior, num_values=C * H * W)[0] if out.posterior is not None
            else sum(q.loss for q in (out.quant if isinstance(out.quant, list) else [out.quant])))
    gan = -disc(x_rec).mean()
    last = model.last_layer
    nll_grad = torch.autograd.grad(nll, last, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(gan, last, retain_graph=True)[0]
    weight = (nll_grad.norm() / (gan_grad.norm() + 1e-4)).clamp(0, CONFIG.adaptive_weight_max).detach() * 0.5
    loss = nll + weight * gan + rest
    loss.backward()
    return loss.detach(), weight


def one_pass_step(model, loss_fn, disc, x):
    torch.manual_seed(1)
    out = model(x)
    loss, terms = loss_fn.generator_loss(x, out.sample, discriminator=disc, last_layer=model.last_layer, step=0,
                                         posterior=out.posterior, quant=out.quant)
    loss.backward()
    return loss.detach(), terms["adaptive_weight"]


@pytest.mark.parametrize("kind", ["kl", "vqgan", "vqvae2"])
def test_one_backward_gives_the_two_pass_gradients_and_weight(kind):
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    reference_model = tiny_model(kind)
    model = copy.deepcopy(reference_model)
    torch.manual_seed(2)
    disc = build_discriminator(CONFIG)
    loss_fn = AutoencoderLoss(config=CONFIG, perceptual=build_perceptual("lpips-vgg", random_init=True))
    perceptual_calls, disc_calls = BackwardCounter(loss_fn.perceptual), BackwardCounter(disc)

    ref_loss, ref_weight = two_pass_step(reference_model, loss_fn, disc, x)
    assert (perceptual_calls.calls, disc_calls.calls) == (2, 2)  # what the anchors pay every GAN step
    loss, weight = one_pass_step(model, loss_fn, disc, x)
    assert (perceptual_calls.calls, disc_calls.calls) == (3, 3)  # ldtok: one more of each, not two

    assert torch.allclose(loss, ref_loss, rtol=1e-6, atol=0)
    assert torch.allclose(weight, ref_weight, rtol=1e-5, atol=0)
    assert 0 < weight < CONFIG.adaptive_weight_max * 0.5  # a real ratio, not the clamp
    reference = dict(reference_model.named_parameters())
    assert {n for n, p in model.named_parameters() if p.grad is not None} == {
        n for n, p in reference.items() if p.grad is not None}
    names = [n for n, p in reference.items() if p.grad is not None]
    ours = torch.cat([dict(model.named_parameters())[n].grad.flatten() for n in names])
    ref = torch.cat([reference[n].grad.flatten() for n in names])
    # Up to float rounding: the sums run in another order. Per tensor, against the whole gradient's scale (biases
    # before a GroupNorm have gradients of rounding size only).
    assert (ours - ref).norm() / ref.norm() < 1e-5
    for n in names:
        assert torch.allclose(dict(model.named_parameters())[n].grad, reference[n].grad, rtol=1e-4,
                              atol=1e-6 * float(ref.abs().max())), n
    assert len(names) > 10


def test_the_rest_terms_keep_their_own_gradients():
    """KL reaches the encoder through the posterior, not through x_rec: dropping it would change encoder gradients."""
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    disc = build_discriminator(CONFIG)
    loss_fn = AutoencoderLoss(config=CONFIG, perceptual=build_perceptual("lpips-vgg", random_init=True))
    grads = []
    for kl_weight in (CONFIG.kl_weight, 0.0):
        model = tiny_model("kl")
        loss_fn.config = LossConfig(**{**CONFIG.__dict__, "kl_weight": kl_weight})
        one_pass_step(model, loss_fn, disc, x)
        grads.append(model.vae.encoder.conv_in.weight.grad.clone())
    assert not torch.allclose(grads[0], grads[1])


COLOUR_X = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(4)) * 2 - 1


def _flat_grad(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros(p.numel())
                      for p in model.parameters() if p.requires_grad])


def _colour_step(colour_weight: float, *, in_adaptive: bool):
    """One GAN step of a tiny VQGAN with the per-pixel colour term: (adaptive weight, all parameter gradients)."""
    torch.manual_seed(2)
    disc = build_discriminator(CONFIG)
    config = LossConfig(**{**CONFIG.__dict__, "colour_weight": colour_weight, "colour_pool": 1,
                           "colour_in_adaptive_weight": in_adaptive})
    loss_fn = AutoencoderLoss(config=config, perceptual=build_perceptual("lpips-vgg", random_init=True))
    model = tiny_model("vqgan")
    _, weight = one_pass_step(model, loss_fn, disc, COLOUR_X)
    return weight, _flat_grad(model)


def test_a_colour_term_left_out_of_the_adaptive_weight_does_not_raise_the_gan_weight_but_still_trains():
    no_colour, grad_none = _colour_step(0.0, in_adaptive=True)
    counted, grad_counted = _colour_step(4.0, in_adaptive=True)
    left_out, grad_left_out = _colour_step(4.0, in_adaptive=False)
    assert counted > no_colour * 1.05  # counted in the reference, the colour term raises the GAN's weight
    assert torch.allclose(left_out, no_colour, rtol=1e-5, atol=0)  # left out, the weight is taming's
    # ... and the colour term's own gradient is added in full: the step is the one without the term plus it
    model = tiny_model("vqgan")
    torch.manual_seed(1)
    (4.0 * colour_term(COLOUR_X, model(COLOUR_X).sample, pool=1, channels="ab")).backward()
    grad_colour = _flat_grad(model)
    assert grad_colour.norm() > 0.05 * grad_none.norm()
    assert (grad_left_out - grad_none - grad_colour).norm() < 1e-4 * grad_left_out.norm()
    assert not torch.allclose(grad_left_out, grad_counted, rtol=1e-3, atol=0)
