"""Small-image models and data: the MLP VAE / AE, the conv families on 32x32 greyscale, the hierarchical KL-VAE, the
bundled digits and greyscale HF datasets."""

import numpy as np
import pytest
import torch

from ldtok.config import ConfigError
from ldtok.data import DataConfig, build_dataset, collate
from ldtok.data.digits_dataset import digits_split_indices
from ldtok.losses import LossConfig, build_discriminator, build_loss
from ldtok.models import ModelConfig, build_model, load_tokenizer
from ldtok.models.vae2 import VAE2, gaussian_kl_map
from ldtok.quantizers import QuantizerConfig
from ldtok.regularizers import hierarchical_kl

TINY_VAE2 = dict(type="vae2", in_channels=1, block_out_channels=[32, 32], layers_per_block=1, latent_channels=3,
                 norm_num_groups=16, sample_size=32, mid_block_add_attention=False)


def grey(n=2, side=32, seed=0):
    return torch.rand(n, 1, side, side, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ------------------------------------------------------------------------------------------ MLP


@pytest.mark.parametrize("deterministic", [False, True])
def test_mlp_autoencoder_shapes_2d_latent_and_reload(tmp_path, deterministic):
    model = build_model(ModelConfig(type="mlp", in_channels=1, sample_size=28, block_out_channels=[64, 32],
                                    latent_channels=2, deterministic=deterministic), decoder_logits=True)
    x = grey(side=28)
    out = model(x)
    assert out.sample.shape == x.shape and out.latents.shape == (2, 2, 1, 1)
    assert (out.posterior is None) == deterministic
    assert out.sample.min() >= -1 and out.sample.max() <= 1  # the Bernoulli mean of the logits
    model.export(tmp_path / "mlp")
    loaded = load_tokenizer(tmp_path / "mlp")
    assert loaded.kind == "kl" and type(loaded).__name__ == "MLPVAEAutoencoder"
    model.eval()
    torch.testing.assert_close(loaded(x).sample, model(x).sample, rtol=0, atol=0)
    # one latent: the kernel the CPU picks for a batch of 1 may differ between the two copies of the weights (seen on
    # this AMX machine: 20 of 784 values 1 ulp apart); the same weights give the same decoding up to float rounding
    torch.testing.assert_close(loaded.decode_latents(torch.zeros(1, 2, 1, 1)), model.decode_latents(
        torch.zeros(1, 2, 1, 1)), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="takes"):
        model(grey(side=32))


# ------------------------------------------------------------------------------------------ conv families at 32 px


def test_kl_family_on_32px_greyscale_with_perceptual_and_gan_terms():
    model = build_model(ModelConfig(type="kl", in_channels=1, block_out_channels=[32, 64], sample_size=32,
                                    mid_block_add_attention=False))
    config = LossConfig(perceptual="lpips-vgg", perceptual_random_init=True, disc_start=0, disc_channels=16,
                        disc_layers=2, kl_weight=1e-6)
    loss_fn, disc = build_loss(config), build_discriminator(config)
    x = grey()
    out = model(x)
    assert out.sample.shape == (2, 1, 32, 32)
    loss, terms = loss_fn.generator_loss(x, out.sample, discriminator=disc, last_layer=model.last_layer, step=0,
                                         output=out)
    assert {"perceptual", "gan", "kl"} <= set(terms)
    loss.backward()
    assert model.vae.encoder.conv_in.weight.grad.abs().sum() > 0
    d_loss, _ = loss_fn.discriminator_loss(x, out.sample, discriminator=disc, step=0)  # greyscale shown as RGB
    assert torch.isfinite(d_loss)


@pytest.mark.parametrize("family", ["vqgan", "vqvae2"])
def test_vq_families_on_32px_greyscale(family):
    torch.manual_seed(0)
    model = build_model(ModelConfig(type=family, in_channels=1, block_out_channels=[32, 64], sample_size=32,
                                    latent_channels=8, mid_block_add_attention=False,
                                    quantizer=QuantizerConfig(codebook_size=16, codebook_dim=8)))
    out = model(grey(n=3))
    assert out.sample.shape == (3, 1, 32, 32) and out.quant is not None


# ------------------------------------------------------------------------------------------ hierarchical KL-VAE


def test_vae2_levels_kl_and_free_bits_per_level():
    torch.manual_seed(0)
    model = build_model(ModelConfig(**TINY_VAE2))
    x = grey(n=3)
    out = model(x)
    f = model.vae2.downsample_factor
    assert out.kl_maps["bottom"].shape == (3, 3, 32 // f, 32 // f)
    assert out.kl_maps["top"].shape == (3, 3, 16 // f, 16 // f)
    loss = build_loss(LossConfig(perceptual_weight=0, disc_weight=0, kl_weight=1.0))
    _, terms = loss.generator_loss(x, out.sample, discriminator=None, last_layer=None, step=0, output=out)
    assert float(terms["kl_nats"]) == pytest.approx(float(terms["kl_top"] + terms["kl_bottom"]), rel=1e-5)
    # free bits per level: channels under the floor get no KL gradient, in whichever level they are
    top = torch.full((2, 3, 2, 2), 0.01, requires_grad=True)  # 0.04 nats per channel: under the floor
    bottom = torch.full((2, 3, 4, 4), 0.5, requires_grad=True)  # 8 nats per channel: over it
    fb = build_loss(LossConfig(perceptual_weight=0, disc_weight=0, kl_weight=1.0, free_bits=1.0))
    kl, nats, per_level = hierarchical_kl(
        {"top": top, "bottom": bottom}, free_bits=fb.config.free_bits, num_values=100)
    assert float(per_level["top"].detach()) == pytest.approx(0.12)
    assert float(per_level["bottom"].detach()) == pytest.approx(24.0)
    assert float(kl.detach()) == pytest.approx((3 * 1.0 + 24.0) / 100)  # top: its floor, 3 x 1 nat
    kl.backward()
    assert top.grad.abs().sum() == 0
    torch.testing.assert_close(bottom.grad, torch.full_like(bottom, 1 / (2 * 100)))  # mean over the batch of 2


def test_vae2_bottom_kl_is_against_the_conditional_prior():
    q = torch.randn(2, 6, 4, 4)
    p = torch.randn(2, 6, 4, 4)
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution as G

    gq, gp = G(q), G(p)
    kl = gaussian_kl_map(gq, gp)
    expected = torch.distributions.kl_divergence(torch.distributions.Normal(gq.mean, gq.std),
                                                 torch.distributions.Normal(gp.mean, gp.std))
    torch.testing.assert_close(kl, expected, rtol=1e-4, atol=1e-5)
    standard = G(torch.zeros(2, 6, 4, 4))
    torch.testing.assert_close(gaussian_kl_map(gq), gaussian_kl_map(gq, standard))


def test_vae2_samples_top_down_and_reloads_with_identical_outputs(tmp_path):
    torch.manual_seed(0)
    model = build_model(ModelConfig(**TINY_VAE2), decoder_logits=True).eval()
    torch.nn.init.normal_(model.vae2.prior_bottom.weight, std=0.1)  # a trained, non-trivial conditional prior
    a = model.sample_prior(4, generator=torch.Generator().manual_seed(1))
    b = model.sample_prior(4, generator=torch.Generator().manual_seed(1))
    assert a.shape == (4, 1, 32, 32) and torch.equal(a, b) and a.min() >= -1 and a.max() <= 1
    assert not torch.equal(a, model.sample_prior(4, generator=torch.Generator().manual_seed(2)))
    # top-down: the bottom prior moves with the top latent
    side = 32 // (2 * model.vae2.downsample_factor)
    z_top = torch.randn(1, 3, side, side)
    _, p1 = model.vae2.bottom_distributions(None, z_top)
    _, p2 = model.vae2.bottom_distributions(None, z_top + 1)
    assert not torch.allclose(p1.mean, p2.mean)
    model.export(tmp_path / "vae2")
    loaded = load_tokenizer(tmp_path / "vae2")
    assert loaded.kind == "vae2" and isinstance(loaded.vae2, VAE2)
    x = grey()
    torch.testing.assert_close(loaded(x).sample, model(x).sample, rtol=0, atol=0)
    torch.testing.assert_close(loaded.sample_prior(4, generator=torch.Generator().manual_seed(1)), a, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ data


def test_digits_split_is_deterministic_disjoint_and_complete():
    train, val = digits_split_indices("train"), digits_split_indices("validation")
    assert len(train) + len(val) == 1797 and len(val) == 180
    assert not set(train) & set(val)
    assert np.array_equal(val, digits_split_indices("validation"))
    with pytest.raises(ValueError, match="splits"):
        digits_split_indices("test")


def test_digits_dataset_is_greyscale_labelled_and_resized():
    from sklearn.datasets import load_digits

    ds = build_dataset(DataConfig(source="digits", split="validation", resolution=28, channels=1,
                                  label_column="label"), train=False)
    batch = collate([ds[i] for i in range(5)])
    assert batch["pixel_values"].shape == (5, 1, 28, 28)
    assert batch["pixel_values"].min() >= -1 and batch["pixel_values"].max() <= 1
    digits = load_digits()
    assert batch["label"].tolist() == digits.target[digits_split_indices("validation")[:5]].tolist()
    rgb = build_dataset(DataConfig(source="digits", split="validation", resolution=32), train=False)[0]
    assert rgb["pixel_values"].shape == (3, 32, 32)  # channels default to 3 (grey replicated)
    assert torch.allclose(rgb["pixel_values"][0], rgb["pixel_values"][1], atol=1e-6)


def test_hf_greyscale_dataset_with_one_channel(tmp_path):
    import datasets
    from PIL import Image

    images = [Image.fromarray((np.arange(28 * 28).reshape(28, 28) * (i + 1) % 256).astype(np.uint8)) for i in range(3)]
    ds = datasets.Dataset.from_dict({"image": images, "label": [0, 1, 2]},
                                    features=datasets.Features({"image": datasets.Image(),
                                                                "label": datasets.Value("int64")}))
    (tmp_path / "mnist-like").mkdir()
    ds.to_parquet(str(tmp_path / "mnist-like" / "train.parquet"))
    data = DataConfig(source="hf", name=str(tmp_path / "mnist-like"), split="train", resolution=28, channels=1,
                      label_column="label", cache_dir=str(tmp_path / "cache"))
    item = build_dataset(data, train=False)[1]
    assert item["pixel_values"].shape == (1, 28, 28) and item["label"] == 1
    expected = torch.from_numpy(np.asarray(images[1], dtype=np.float32)) / 127.5 - 1
    torch.testing.assert_close(item["pixel_values"][0], expected, atol=1e-6, rtol=0)


def test_channels_must_be_1_or_3():
    from ldtok.config import load_config
    from ldtok.training import RunConfig

    with pytest.raises(ConfigError, match=r"^channels: .*must be 1 \(greyscale\) or 3"):
        DataConfig(channels=4)
    with pytest.raises(ConfigError, match=r"^data\.channels: "):  # from a config, the full dotted key
        load_config(RunConfig, None, ["data.channels=4"])


def test_data_and_model_channels_must_agree():
    from ldtok.config import load_config
    from ldtok.training import RunConfig

    with pytest.raises(ConfigError, match="model.in_channels"):
        load_config(RunConfig, None, ["data.channels=1"])
    from launch import ROOT

    assert load_config(RunConfig, ROOT / "configs" / "demo-mnist-vae.yaml").data.channels == 1
