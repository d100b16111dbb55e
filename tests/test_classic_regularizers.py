"""The classic regularizers: sparsity (L1 / KL), contractive (Hutchinson estimate of the encoder Jacobian), the
cyclical KL schedule, the Bernoulli likelihood; each reaches the gradients it should and nothing else."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ldtok.config import ConfigError, load_config
from ldtok.losses import AutoencoderLoss, LossConfig, build_loss
from ldtok.models import ModelConfig, build_model
from ldtok.regularizers import (
    bernoulli_nll,
    exact_jacobian_frobenius_sq,
    jacobian_frobenius_sq,
    kl_weight_at,
    sparsity_penalty,
)
from ldtok.training import RunConfig


def plain_loss(**kw) -> AutoencoderLoss:
    base = dict(perceptual="none", perceptual_weight=0.0, disc_weight=0.0, reconstruction="l2", kl_weight=0.0)
    return build_loss(LossConfig(**{**base, **kw}), max_steps=100)


def mlp_ae(*, contractive_samples=0, deterministic=True, logits=False):
    torch.manual_seed(0)
    config = ModelConfig(type="mlp", in_channels=1, sample_size=4, block_out_channels=[8], latent_channels=3,
                         deterministic=deterministic)
    return build_model(config, decoder_logits=logits, contractive_samples=contractive_samples)


def grads(model, loss_fn, x, *, seed=0):
    """d loss / d parameter of every parameter, split into encoder and decoder."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(x)
    loss, terms = loss_fn.generator_loss(x, out.sample, discriminator=None, last_layer=None, step=0, output=out)
    loss.backward()
    enc = torch.cat([p.grad.flatten() for p in model.vae.encoder.parameters()])
    dec = torch.cat([p.grad.flatten() for p in model.vae.decoder.parameters()])
    return enc, dec, terms


X = torch.rand(6, 1, 4, 4, generator=torch.Generator().manual_seed(1)) * 2 - 1


# ------------------------------------------------------------------------------------------ KL schedules


def test_cyclical_schedule_at_hand_checked_steps():
    # 100 steps, 4 cycles -> period 25; ramp over the first half (12.5 steps) of each
    at = dict(weight=2.0, schedule="cyclical", total_steps=100, cycles=4, ratio=0.5)
    expected = {0: 0.0, 5: 2.0 * 5 / 12.5, 10: 2.0 * 10 / 12.5, 12.5: 2.0, 13: 2.0, 24: 2.0, 25: 0.0, 30: 0.8,
                50: 0.0, 99: 2.0, 100: 0.0}
    for step, value in expected.items():
        assert kl_weight_at(step, **at) == pytest.approx(value), step
    # ratio 1: a saw-tooth over the whole period
    assert kl_weight_at(15, weight=1.0, schedule="cyclical", total_steps=60, cycles=3, ratio=1.0) == pytest.approx(0.75)


def test_linear_schedule_is_the_old_warmup_and_the_loss_uses_the_configured_schedule():
    assert kl_weight_at(5, weight=1.0, schedule="linear", warmup_steps=10) == 0.5
    assert kl_weight_at(50, weight=1.0, schedule="linear", warmup_steps=10) == 1.0
    assert kl_weight_at(0, weight=3.0, schedule="linear") == 3.0
    loss = build_loss(LossConfig(perceptual_weight=0, kl_weight=1.0, kl_schedule="cyclical", kl_cycles=2,
                                 kl_ratio=0.5), max_steps=40)  # kl_total_steps <- train.max_steps
    assert loss.config.kl_total_steps == 40
    assert [loss.kl_weight_at(s) for s in (0, 5, 10, 19, 20, 25)] == pytest.approx([0, 0.5, 1, 1, 0, 0.5])


def test_cyclical_kl_weight_scales_only_the_kl_gradient():
    model = mlp_ae(deterministic=False)
    cyc = plain_loss(kl_weight=1.0, kl_schedule="cyclical", kl_cycles=4, kl_total_steps=100)
    model.zero_grad()
    torch.manual_seed(0)
    out = model(X)
    loss0, terms = cyc.generator_loss(X, out.sample, discriminator=None, last_layer=None, step=0, output=out)
    # step 0: weight 0, the KL costs nothing
    assert terms["kl"] > 0 and float(loss0.detach()) == pytest.approx(float(terms["nll"]))
    torch.manual_seed(0)
    out = model(X)
    loss5, terms5 = cyc.generator_loss(X, out.sample, discriminator=None, last_layer=None, step=5, output=out)
    assert float(loss5.detach()) == pytest.approx(float(terms5["nll"] + 0.4 * terms5["kl"]))


# ------------------------------------------------------------------------------------------ Bernoulli likelihood


def test_bce_equals_binary_cross_entropy_with_logits_on_a_hand_case():
    logits = torch.tensor([[[[0.0, 2.0], [-1.0, 3.0]]]])
    x = torch.tensor([[[[-1.0, 1.0], [0.0, 1.0]]]])  # targets 0, 1, 0.5, 1
    expected = F.binary_cross_entropy_with_logits(logits, (x + 1) / 2)
    by_hand = (math.log(2) + math.log1p(math.exp(-2)) + (0.5 * math.log1p(math.exp(-1)) + 0.5 * math.log1p(math.e))
               + math.log1p(math.exp(-3))) / 4
    assert bernoulli_nll(logits, x) == pytest.approx(float(expected))
    assert bernoulli_nll(logits, x) == pytest.approx(by_hand)


def test_bce_reconstruction_reads_the_decoder_output_as_logits():
    model = mlp_ae(logits=True)
    loss_fn = plain_loss(reconstruction="bce")
    out = model(X)
    assert torch.allclose(out.sample, torch.sigmoid(out.logits) * 2 - 1)
    logits = out.logits.detach().requires_grad_(True)
    loss, terms = loss_fn.generator_loss(X, torch.sigmoid(logits) * 2 - 1, discriminator=None, last_layer=None,
                                         step=0, output=type(out)(sample=out.sample, logits=logits))
    loss.backward()
    # d mean-BCE / d logit = (sigmoid(logit) - target) / N: the Bernoulli gradient, nothing else
    torch.testing.assert_close(logits.grad, (torch.sigmoid(logits) - (X + 1) / 2) / X.numel())
    with pytest.raises(ValueError, match="logits"):
        loss_fn.generator_loss(X, out.sample, discriminator=None, last_layer=None, step=0)


def test_bce_needs_a_logits_family():
    with pytest.raises(ConfigError, match="mlp or vae2"):
        build_model(ModelConfig(type="kl", block_out_channels=[32, 64]), decoder_logits=True)


# ------------------------------------------------------------------------------------------ sparsity


def test_sparsity_penalties_by_hand():
    z = torch.tensor([[[[1.0]], [[-2.0]]], [[[3.0]], [[0.0]]]])  # (B=2, C=2, 1, 1)
    assert sparsity_penalty(z, kind="l1", target=0.05) == pytest.approx(1.5)
    rho_hat = torch.sigmoid(z).mean(0).flatten()  # per unit
    rho = 0.1
    expected = (rho * torch.log(rho / rho_hat) + (1 - rho) * torch.log((1 - rho) / (1 - rho_hat))).mean()
    assert sparsity_penalty(z, kind="kl", target=rho) == pytest.approx(float(expected))
    assert sparsity_penalty(torch.full((4, 3, 2, 2), math.log(0.1 / 0.9)), kind="kl", target=0.1) == pytest.approx(
        0.0, abs=1e-6)  # at the target rate it costs nothing


@pytest.mark.parametrize("kind", ["l1", "kl"])
def test_sparsity_reaches_the_encoder_only(kind):
    model = mlp_ae()
    enc0, dec0, _ = grads(model, plain_loss(), X)
    enc1, dec1, terms = grads(model, plain_loss(sparsity=kind, sparsity_weight=0.5), X)
    assert terms["sparsity"] > 0
    torch.testing.assert_close(dec1, dec0, rtol=0, atol=0)  # the code's penalty has no decoder gradient
    assert not torch.allclose(enc1, enc0)


# ------------------------------------------------------------------------------------------ contractive


def test_hutchinson_estimate_matches_the_exact_jacobian_of_a_tiny_mlp():
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    x = torch.randn(4, 1, 2, 3)
    exact = exact_jacobian_frobenius_sq(encoder, x)
    leaf = x.clone().requires_grad_(True)
    estimate = jacobian_frobenius_sq(encoder(leaf), leaf, samples=4000, generator=torch.Generator().manual_seed(0))
    assert float(estimate) == pytest.approx(float(exact), rel=0.05)
    # and by hand for a linear map: ||W||_F^2 for every sample
    linear = nn.Sequential(nn.Flatten(), nn.Linear(6, 3))
    w = linear[1].weight
    assert float(exact_jacobian_frobenius_sq(linear, x)) == pytest.approx(float(w.pow(2).sum()), rel=1e-6)


def test_contractive_term_reaches_the_encoder_only():
    model = mlp_ae(contractive_samples=2)
    torch.manual_seed(3)
    out = model(X)
    assert out.contractive is not None and out.contractive > 0
    enc0, dec0, _ = grads(model, plain_loss(), X)
    enc1, dec1, terms = grads(model, plain_loss(contractive_weight=0.3), X)
    assert terms["contractive"] > 0
    torch.testing.assert_close(dec1, dec0, rtol=0, atol=0)
    assert not torch.allclose(enc1, enc0)
    model.eval()
    assert model(X).contractive is None  # only the training forward pays for it


def test_contractive_needs_the_estimate_and_a_supported_family():
    with pytest.raises(ValueError, match="contractive"):
        grads(mlp_ae(), plain_loss(contractive_weight=0.3), X)
    with pytest.raises(ConfigError, match="kl and mlp"):
        build_model(ModelConfig(type="vae2", block_out_channels=[32, 64]), contractive_samples=1)


# ------------------------------------------------------------------------------------------ config checks


@pytest.mark.parametrize("override, key", [
    ("loss.sparsity=l2", "loss.sparsity"),
    ("loss.kl_schedule=cosine", "loss.kl_schedule"),
    ("loss.sparsity_target=1.5", "loss.sparsity_target"),
    ("loss.sparsity_weight=0.1", "loss.sparsity"),
    ("loss.kl_ratio=0", "loss.kl_ratio"),
    ("loss.contractive_samples=0", "loss.contractive_samples"),
])
def test_bad_regularizer_keys_are_config_errors_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(RunConfig, None, [override])


def test_cyclical_with_a_linear_warmup_is_refused():
    with pytest.raises(ConfigError, match="kl_warmup_steps"):
        load_config(RunConfig, None, ["loss.kl_schedule=cyclical", "loss.kl_warmup_steps=10"])
