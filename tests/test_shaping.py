"""Latent-shaping building blocks (ldtok.shaping): transforms, corruption, alignment, trainable halves."""

import pytest
import torch

from ldtok.errors import LdtokError
from ldtok.models import build_model
from ldtok.models.config import ModelConfig
from ldtok.shaping.alignment import (
    AlignmentProjection,
    FrozenConvEncoder,
    FrozenVisionEncoder,
    alignment_terms,
    build_align_encoder,
)
from ldtok.shaping.corruption import add_latent_noise, mask_patches, patch_mask, scheduled, step_generator
from ldtok.shaping.equivariance import SpatialTransform, sample_transform
from ldtok.shaping.trainable import apply_trainable, trainable_parameters

TINY = dict(block_out_channels=[32, 64], layers_per_block=1, latent_channels=4, norm_num_groups=8)


def test_transforms_compose_to_identity_and_scale_pairs_consistently():
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(SpatialTransform(rotate=1).apply(SpatialTransform(rotate=3).apply(x)), x)
    assert torch.equal(SpatialTransform(flip=True).apply(SpatialTransform(flip=True).apply(x)), x)
    assert not torch.equal(SpatialTransform(rotate=1).apply(x), x)
    z, img = torch.randn(2, 4, 8, 8), torch.randn(2, 3, 32, 32)
    tz, timg = SpatialTransform(scale=0.75).apply_pair(z, img)
    assert tz.shape == (2, 4, 6, 6) and timg.shape == (2, 3, 24, 24)  # the image keeps the factor-4 relation
    tz, timg = SpatialTransform(rotate=1, flip=True).apply_pair(z, img)
    assert torch.equal(timg, torch.flip(torch.rot90(img, 1, (-2, -1)), (-1,)))


@pytest.mark.parametrize("kind", ["kl", "vqgan"])
def test_equivariance_trains_under_bf16_autocast(kind):
    """The default mixed precision on CPUs with AMX and on GPUs is bf16: the scale transform (antialiased bilinear,
    which has no CPU bf16 kernel) runs in fp32 there and gives the autocast dtype back."""
    from ldtok.shaping.options import LatentShaping

    z = torch.randn(2, 4, 8, 8, dtype=torch.bfloat16)
    assert SpatialTransform(scale=0.5).apply(z).dtype == torch.bfloat16
    model = build_model(ModelConfig(type=kind, **TINY))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, shaping=LatentShaping(transform=SpatialTransform(scale=0.5, rotate=1)))
    assert out.equivariant_sample.shape == (2, 3, 16, 16)
    out.equivariant_sample.float().mean().backward()
    assert any(p.grad is not None for p in model.parameters())


def test_sample_transform_is_reproducible_never_identity_and_checks_kinds():
    draws = [sample_transform(step_generator(0, s, 0, 1), kinds=["scale", "rotate", "flip"]) for s in range(30)]
    again = [sample_transform(step_generator(0, s, 0, 1), kinds=["scale", "rotate", "flip"]) for s in range(30)]
    assert draws == again and not any(t.is_identity for t in draws)
    assert {t.scale for t in draws} >= {0.5, 0.75} and any(t.rotate for t in draws) and any(t.flip for t in draws)
    only_flip = {sample_transform(step_generator(0, s, 0, 1), kinds=["flip"]) for s in range(5)}
    assert only_flip == {SpatialTransform(flip=True)}
    with pytest.raises(ValueError, match="subset"):
        sample_transform(torch.Generator(), kinds=["shear"])


def test_schedules():
    assert scheduled(0.2, step=50, max_steps=100, schedule="constant") == 0.2
    assert scheduled(0.2, step=50, max_steps=100, schedule="linear_decay") == pytest.approx(0.1)
    assert scheduled(0.2, step=100, max_steps=100, schedule="cosine_decay") == pytest.approx(0.0)
    assert scheduled(0.2, step=25, max_steps=100, schedule="linear_warmup") == pytest.approx(0.05)
    with pytest.raises(ValueError, match="schedule"):
        scheduled(0.2, step=0, max_steps=1, schedule="exp")


def test_latent_noise_is_bounded_reproducible_and_passes_gradients():
    z = torch.zeros(8, 4, 32, 32, requires_grad=True)
    noisy = add_latent_noise(z, 0.3, step_generator(1, 2, 0, 0))
    stds = noisy.detach().flatten(1).std(dim=1)
    assert (stds < 0.3 * 1.1).all() and stds.max() > 0.05 and len(set(stds.tolist())) == 8  # σ ~ U[0, γ] per sample
    assert torch.equal(noisy, add_latent_noise(z, 0.3, step_generator(1, 2, 0, 0)))
    assert not torch.equal(noisy, add_latent_noise(z, 0.3, step_generator(1, 2, 1, 0)))  # another rank
    noisy.sum().backward()
    assert torch.equal(z.grad, torch.ones_like(z))
    assert add_latent_noise(z, 0.0, torch.Generator()) is z


def test_patch_masks_hide_exact_whole_patches():
    keep = patch_mask((3, 3, 32, 32), ratio=0.5, patch=8, generator=step_generator(0, 0, 0, 2))
    cells = keep.view(3, 4, 8, 4, 8)
    assert torch.equal(cells.amax(dim=(2, 4)), cells.amin(dim=(2, 4)))  # constant inside each 8x8 patch
    assert (cells[:, :, 0, :, 0] == 0).sum(dim=(1, 2)).tolist() == [8, 8, 8]  # exactly half of 16 patches per sample
    x = torch.randn(3, 3, 32, 32)
    masked = mask_patches(x, ratio=0.5, patch=8, generator=step_generator(0, 0, 0, 2))
    assert torch.equal(masked, x * keep) and not torch.equal(masked, x)
    with pytest.raises(ValueError, match="multiple"):
        patch_mask((1, 3, 30, 30), ratio=0.5, patch=8, generator=torch.Generator())


@pytest.fixture
def dino_dir(tmp_path):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                          image_size=32, patch_size=4)
    Dinov2Model(config).save_pretrained(tmp_path / "dino")
    return tmp_path / "dino"


@pytest.mark.parametrize("align_model", ["dino", "stlpips-alex", "stlpips-vgg"])
def test_alignment_model_stays_frozen_and_only_encoder_and_projection_get_gradients(dino_dir, align_model):
    frozen = build_align_encoder(str(dino_dir) if align_model == "dino" else align_model)
    frozen.train()
    assert not any(m.training for m in frozen.modules())
    assert not any(p.requires_grad for p in frozen.parameters())
    model = build_model(ModelConfig(type="kl", **TINY))
    proj = AlignmentProjection(latent_channels=4, feature_dim=frozen.hidden_size)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    z = model(x).latents  # (2, 4, 16, 16)
    feats = frozen(x, grid=tuple(z.shape[-2:]))
    width = {"dino": 32, "stlpips-alex": 256, "stlpips-vgg": 512}[align_model]
    assert frozen.hidden_size == width and feats.shape == (2, width, 16, 16) and not feats.requires_grad
    assert feats.std() > 0
    term_cos, term_dist = alignment_terms(proj(z), feats)
    (term_cos + term_dist).backward()
    assert all(p.grad is None for p in frozen.parameters())
    assert proj.proj.weight.grad.abs().sum() > 0
    assert model.vae.encoder.conv_in.weight.grad.abs().sum() > 0
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.vae.decoder.parameters())


def test_alignment_terms_vanish_when_aligned():
    f = torch.randn(2, 8, 4, 4)
    term_cos, term_dist = alignment_terms(f.clone(), f)
    assert term_cos == 0 and term_dist == 0
    term_cos, term_dist = alignment_terms(-f, f)
    assert term_cos > 1 and term_dist == 0  # opposite vectors: same distance matrix, wrong directions


def test_alignment_model_loads_only_from_a_local_directory(tmp_path):
    with pytest.raises(LdtokError, match="not a local transformers model directory") as e:
        FrozenVisionEncoder.from_directory("facebook/dinov2-small")
    assert "\n" not in str(e.value)
    with pytest.raises(LdtokError, match="no config.json"):
        FrozenVisionEncoder.from_directory(tmp_path)
    with pytest.raises(LdtokError, match="not a local transformers model directory"):
        build_align_encoder("stlpips-squeeze")  # not built in: taken for a directory, never for a download


def test_builtin_alignment_model_is_the_trained_stlpips_backbone():
    from ldtok.perceptual import build_perceptual

    frozen, lpips = FrozenConvEncoder("stlpips-vgg"), build_perceptual("stlpips-vgg").net
    for name, tensor in lpips.net.state_dict().items():
        torch.testing.assert_close(frozen.backbone.state_dict()[name], tensor, rtol=0, atol=0)
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    grid_4 = frozen(x, grid=(4, 4))  # 64 px in, stride 16: the backbone's own relu5_3 map, area-resampled
    own = lpips.net(lpips.scaling_layer(x))[-1]
    torch.testing.assert_close(grid_4, torch.nn.functional.adaptive_avg_pool2d(own, (4, 4)), rtol=1e-4, atol=1e-5)


def _latent_space(out) -> list[torch.Tensor]:
    """What a prior would see: the KL latents, or every level's quantized latents and indices."""
    if out.latents is not None:
        return [out.latents]
    quants = out.quant if isinstance(out.quant, list) else [out.quant]
    return [t for q in quants for t in (q.quantized, q.indices)]


@pytest.mark.parametrize("kind", ["kl", "vqgan", "vqvae2"])
def test_decoder_only_training_keeps_encoder_weights_and_latents_bit_identical(kind):
    torch.manual_seed(0)
    model = build_model(ModelConfig(type=kind, **TINY))
    frozen = apply_trainable(model, "decoder")
    assert frozen and all(not m.training for m in frozen)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    model.eval()
    before_latents = _latent_space(model(x))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    before_buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    model.train()  # the frozen half stays in eval by itself (a VQ codebook's EMA does not move)
    assert all(not m.training for m in frozen)
    opt = torch.optim.SGD(trainable_parameters(model), lr=0.1)
    for _ in range(2):
        out = model(x)
        (out.sample - x).abs().mean().backward()
        opt.step()
        opt.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("decoder" in n or "post_quant_conv" in n for n in changed)
    assert all(torch.equal(b, before_buffers[n]) for n, b in model.named_buffers() if "decoder" not in n)
    model.eval()
    assert all(torch.equal(a, b) for a, b in zip(_latent_space(model(x)), before_latents, strict=True))


@pytest.mark.parametrize("kind", ["kl", "vqgan", "vqvae2"])
def test_forward_with_shaping_decodes_noisy_and_transformed_latents(kind):
    from ldtok.shaping.options import LatentShaping

    torch.manual_seed(0)
    model = build_model(ModelConfig(type=kind, **TINY)).eval()  # eval: KL uses the mean, no codebook update
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    plain = model(x)
    assert plain.equivariant_sample is None
    same = model(x, shaping=LatentShaping())
    assert torch.equal(same.sample, plain.sample) and same.equivariant_sample is None
    noisy = model(x, shaping=LatentShaping(noise_gamma=0.5, generator=step_generator(0, 0, 0, 0)))
    assert not torch.allclose(noisy.sample, plain.sample)
    for transform, size in ((SpatialTransform(rotate=1), 32), (SpatialTransform(scale=0.5), 16)):
        out = model(x, shaping=LatentShaping(transform=transform))
        assert torch.equal(out.sample, plain.sample)  # the reconstruction itself is unchanged
        assert out.equivariant_sample.shape == (2, 3, size, size)
    # rotating a latent and decoding it is not the same as rotating the decoded image (the decoder is not
    # equivariant before training): the term has something to learn
    out = model(x, shaping=LatentShaping(transform=SpatialTransform(rotate=1)))
    assert not torch.allclose(out.equivariant_sample, SpatialTransform(rotate=1).apply(plain.sample), atol=1e-3)
