"""Issue 13 item 5: `ldtok encode`'s `write_latent_stats` stores per-channel `latents_mean` / `latents_std` in the
exported diffusers config, which `AutoencoderKL.from_pretrained` then exposes."""

import pytest
import torch
from latent_helpers import encode, image_folder, shard_tensors, tiny_kl

from ldtok.errors import LdtokError


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return image_folder(tmp_path_factory.mktemp("images"))


def test_write_latent_stats_stores_per_channel_statistics_that_from_pretrained_exposes(folder, tmp_path):
    from diffusers import AutoencoderKL

    model = tiny_kl(tmp_path / "kl")
    assert AutoencoderKL.from_pretrained(model).config.latents_mean is None
    result = encode(model, tmp_path / "shards", folder, write_latent_stats=True)
    stats = result.statistics
    vae = AutoencoderKL.from_pretrained(model)
    assert list(vae.config.latents_mean) == pytest.approx(stats["channel_mean"])
    assert list(vae.config.latents_std) == pytest.approx(stats["channel_std"])
    assert len(vae.config.latents_mean) == 4 and vae.config.scaling_factor == pytest.approx(stats["scaling_factor"])
    assert result.scaling_written["latents_std"] == stats["channel_std"]
    # the per-channel statistics of the stored (unscaled) latents
    z = torch.cat([t for k, t in sorted(shard_tensors(tmp_path / "shards").items()) if k.endswith("/mean")])
    assert z.shape[1] == 4
    torch.testing.assert_close(z.double().mean(dim=(0, 2, 3)), torch.tensor(stats["channel_mean"]).double(),
                               rtol=0, atol=0.05)


def test_write_scaling_factor_alone_leaves_latents_mean_unset(folder, tmp_path):
    from diffusers import AutoencoderKL

    model = tiny_kl(tmp_path / "kl")
    encode(model, tmp_path / "shards", folder, write_scaling_factor=True)
    assert AutoencoderKL.from_pretrained(model).config.latents_mean is None


def test_write_latent_stats_needs_a_kl_model(folder, tmp_path):
    from ldtok.models import ModelConfig, build_model
    from ldtok.quantizers import QuantizerConfig

    torch.manual_seed(0)
    quantizer = QuantizerConfig(codebook_size=16, codebook_dim=4, kmeans_init=False)
    build_model(ModelConfig(type="vqgan", block_out_channels=[32, 64], layers_per_block=1, norm_num_groups=32,
                            latent_channels=4, sample_size=32, quantizer=quantizer)).eval().export(tmp_path / "vq")
    with pytest.raises(LdtokError, match=r"^--write-latent-stats needs a KL model") as e:
        encode(tmp_path / "vq", tmp_path / "shards", folder, write_latent_stats=True)
    assert e.value.exit_code == 2


