"""Issue 13's latent-shaping options as trainer config keys, in-process: validation, the per-batch draws, and which
parameters each loss term reaches (KL, VQGAN, VQ-VAE-2)."""

import pytest
import torch

from ldtok.config import ConfigError, from_dict
from ldtok.losses import LossConfig, build_loss
from ldtok.losses.shaping import equivariance_term
from ldtok.models import build_model
from ldtok.models.config import ModelConfig
from ldtok.shaping.alignment import AlignmentProjection, FrozenVisionEncoder
from ldtok.shaping.equivariance import SpatialTransform
from ldtok.shaping.trainable import apply_trainable
from ldtok.training import AutoencoderStep, RunConfig
from ldtok.training import shaping as training_shaping
from ldtok.training.shaping import Alignment, BatchShaping, check_shaping_family, latent_channels

TINY = dict(block_out_channels=[32, 64], layers_per_block=1, latent_channels=4, norm_num_groups=8)
FAMILIES = ["kl", "vqgan", "vqvae2"]
# only the term under test: no pixel, perceptual, KL or quantizer term
SILENT = dict(rec_weight=0.0, perceptual="none", perceptual_weight=0.0, kl_weight=0.0, quant_weight=0.0,
              disc_weight=0.0)


@pytest.fixture
def dino_dir(tmp_path):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                          image_size=32, patch_size=4)
    Dinov2Model(config).save_pretrained(tmp_path / "dino")
    return tmp_path / "dino"


def run_config(**sections) -> RunConfig:
    return from_dict(RunConfig, {"data": {"resolution": 32}, **sections})


# ------------------------------------------------------------------------------------------------ config keys
def test_every_option_defaults_off():
    config = RunConfig()
    tc, lc = config.train, config.loss
    assert (lc.equivariance_weight, lc.equivariance_prob, lc.equivariance_transforms, lc.equivariance_scales) == (
        0.0, 0.5, ["scale", "rotate", "flip"], [0.5, 0.75])
    assert (lc.align_weight, lc.align_model, lc.align_margin_cos, lc.align_margin_dist) == (0.0, None, 0.5, 0.25)
    assert (tc.latent_noise, tc.latent_noise_schedule, tc.mask_ratio, tc.mask_ratio_schedule, tc.mask_patch_size,
            tc.trainable) == (0.0, "constant", 0.0, "constant", 0, "all")
    assert training_shaping.shaping_keys_on(config) == []


@pytest.mark.parametrize("section, key, value, message", [
    ("loss", "align_weight", 0.5, r"^loss\.align_model: is required when loss\.align_weight > 0"),
    ("loss", "equivariance_transforms", ["shear"], r"^loss\.equivariance_transforms: needs a non-empty subset"),
    ("loss", "equivariance_scales", [1.5], r"^loss\.equivariance_scales: needs factors in \(0, 1\)"),
    ("loss", "equivariance_prob", 2.0, r"^loss\.equivariance_prob: must be <= 1"),
    ("train", "mask_ratio", 1.0, r"^train\.mask_ratio: must be < 1"),
    ("train", "latent_noise_schedule", "step", r"^train\.latent_noise_schedule: "),
    ("train", "trainable", "quantizer", r"^train\.trainable: "),
])
def test_bad_values_are_one_line_errors_naming_the_key(section, key, value, message):
    with pytest.raises(ConfigError, match=message) as e:
        run_config(**{section: {key: value}})
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("override", [{"loss": {"equivariance_weight": 0.1}}, {"train": {"latent_noise": 0.1}},
                                      {"train": {"mask_ratio": 0.5}}, {"train": {"trainable": "decoder"}},
                                      {"loss": {"align_weight": 0.1, "align_model": "dino"}}])
def test_other_families_refuse_the_options_in_one_line(override):
    config = run_config(model={"type": "mlp"}, **override)
    with pytest.raises(ConfigError, match=r"implemented for model.type kl, vqgan, vqvae2, not 'mlp'") as e:
        check_shaping_family(config)
    assert "\n" not in str(e.value)
    check_shaping_family(run_config(model={"type": "kl"}, **override))  # fine for the families that have them


def test_a_mask_patch_that_does_not_tile_the_image_is_one_line():
    with pytest.raises(ConfigError, match=r"^train.mask_patch_size=5: data.resolution=32 is not a multiple"):
        BatchShaping(run_config(train={"mask_ratio": 0.5, "mask_patch_size": 5}), downsample_factor=4)
    assert BatchShaping(run_config(train={"mask_ratio": 0.5}), downsample_factor=8).patch == 8


def test_a_missing_alignment_directory_is_one_line(tmp_path):
    from ldtok.errors import LdtokError

    with pytest.raises(LdtokError, match=r"loss.align_model=.*no config.json") as e:
        Alignment.build(str(tmp_path / "nowhere"), model=build_model(ModelConfig(type="kl", **TINY)))
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------------ per-batch draws
def test_the_transform_is_the_same_on_every_rank_noise_and_masks_differ_and_draws_repeat(monkeypatch):
    config = run_config(loss={"equivariance_weight": 1.0}, train={"latent_noise": 0.5, "mask_ratio": 0.5})
    shaper = BatchShaping(config, downsample_factor=4)
    x = torch.rand(2, 3, 32, 32) * 2 - 1

    def draw(rank: int, step: int):
        monkeypatch.setattr(training_shaping, "rank", lambda: rank)
        x_in, shaping = shaper.draw(x, step=step, micro=step % 3)
        noise = shaping.noisy(torch.zeros(2, 4, 8, 8))
        return x_in, shaping.transform, noise

    transforms = set()
    for step in range(12):
        (x0, t0, n0), (x1, t1, n1) = draw(0, step), draw(1, step)
        assert t0 == t1, "every rank decodes the same transformed latent (the same DDP graph)"
        assert not torch.equal(x0, x1) and not torch.equal(n0, n1), "masks and noise differ between ranks"
        again = draw(1, step)
        assert torch.equal(again[0], x1) and again[1] == t1 and torch.equal(again[2], n1), "a resume redraws them"
        assert (x0 == 0).float().mean() == pytest.approx(0.5, abs=0.05)  # half the 4x4 patches hidden
        transforms.add(t0)
    assert None in transforms and len(transforms) > 2, "p = 0.5: some batches without the term, several T"


def test_the_probability_test_does_not_change_the_transform_drawn():
    """The transform is drawn whether or not the term is on, so p only decides; it never shifts later draws."""
    on = BatchShaping(run_config(loss={"equivariance_weight": 1.0, "equivariance_prob": 1.0}), downsample_factor=4)
    off = BatchShaping(run_config(loss={"equivariance_weight": 1.0, "equivariance_prob": 0.0}), downsample_factor=4)
    x = torch.zeros(1, 3, 32, 32)
    for step in range(5):
        _, shaping_on = on.draw(x, step=step)
        _, shaping_off = off.draw(x, step=step)
        assert shaping_off is None and shaping_on.transform is not None and not shaping_on.transform.is_identity


def test_schedules_reach_the_draws():
    shaper = BatchShaping(run_config(train={"latent_noise": 0.4, "latent_noise_schedule": "linear_decay",
                                            "max_steps": 10}), downsample_factor=4)
    x = torch.zeros(1, 3, 32, 32)
    assert shaper.draw(x, step=0)[1].noise_gamma == pytest.approx(0.4)
    assert shaper.draw(x, step=5)[1].noise_gamma == pytest.approx(0.2)
    assert shaper.draw(x, step=10)[1] is None  # decayed to 0: nothing to shape


# ------------------------------------------------------------------------------------------------ gradient routing
def _grads(module) -> dict[str, bool]:
    return {n: p.grad is not None and bool(p.grad.abs().sum() > 0) for n, p in module.named_parameters()}


def _sides(model) -> tuple[bool, bool]:
    """(some encoder-side parameter got a gradient, some decoder-side one did)."""
    from ldtok.shaping.trainable import is_decoder_parameter

    grads = _grads(model)
    return (any(g for n, g in grads.items() if not is_decoder_parameter(n)),
            any(g for n, g in grads.items() if is_decoder_parameter(n)))


@pytest.mark.parametrize("kind", FAMILIES)
def test_the_equivariance_term_reaches_encoder_and_decoder(kind):
    from ldtok.shaping.options import LatentShaping

    torch.manual_seed(0)
    model = build_model(ModelConfig(type=kind, **TINY)).train()
    cfg = LossConfig(**{**SILENT, "rec_weight": 1.0}, equivariance_weight=1.0)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    for transform in (SpatialTransform(rotate=1), SpatialTransform(scale=0.5), SpatialTransform(flip=True)):
        model.zero_grad()
        out = model(x, shaping=LatentShaping(transform=transform))
        terms = {}
        term = equivariance_term(cfg, None, x, out, transform, terms)
        assert term is not None and "equivariance" in terms
        term.backward()
        assert _sides(model) == (True, True), transform


@pytest.mark.parametrize("kind", FAMILIES)
def test_the_alignment_term_reaches_encoder_and_projection_never_decoder_or_frozen_model(kind, dino_dir):
    torch.manual_seed(0)
    model = build_model(ModelConfig(type=kind, **TINY)).train()
    frozen = FrozenVisionEncoder.from_directory(dino_dir)
    projection = AlignmentProjection(latent_channels=latent_channels(model), feature_dim=frozen.hidden_size)
    loss_fn = build_loss(LossConfig(**SILENT, align_weight=1.0, align_model=str(dino_dir)))
    step = AutoencoderStep(model=model, loss_fn=loss_fn, alignment=Alignment(frozen, projection))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    gen = step.generator(x, step=0)
    assert {"align_cos", "align_dist"} <= set(gen.terms)
    gen.loss.backward()
    assert _sides(model) == (True, False)
    assert all(_grads(projection).values())
    assert all(p.grad is None for p in frozen.parameters()) and not frozen.training


@pytest.mark.parametrize("kind", FAMILIES)
def test_with_noise_and_masking_the_loss_is_on_the_clean_image_and_reaches_both_halves(kind):
    torch.manual_seed(0)
    model = build_model(ModelConfig(type=kind, **TINY)).train()
    config = run_config(train={"latent_noise": 0.5, "mask_ratio": 0.5})
    loss_fn = build_loss(LossConfig(perceptual="none", perceptual_weight=0.0, disc_weight=0.0))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    x_in, shaping = BatchShaping(config, downsample_factor=4).draw(x, step=0)
    assert not torch.equal(x_in, x) and shaping.noise_gamma == 0.5
    gen = AutoencoderStep(model=model, loss_fn=loss_fn).generator(x, step=0, x_in=x_in, shaping=shaping)
    assert gen.terms["rec"] == pytest.approx(float((gen.output.sample.detach() - x).abs().mean()), rel=1e-5)
    gen.loss.backward()
    assert _sides(model) == (True, True)


@pytest.mark.parametrize("kind", FAMILIES)
def test_a_frozen_half_stays_in_eval_through_train_and_deep_copies(kind):
    import copy

    model = build_model(ModelConfig(type=kind, **TINY))
    frozen = apply_trainable(model, "decoder")
    model.eval()
    model.train()
    assert all(not m.training for f in frozen for m in f.modules())
    assert any(m.training for m in model.modules())  # the decoder does train
    twin = copy.deepcopy(model)  # the weight EMA's copy behaves the same
    twin.train()
    assert sum(not m.training for m in twin.modules()) == sum(not m.training for m in model.modules())
