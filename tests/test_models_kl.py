import torch
from diffusers import AutoencoderKL

from ldtok.ema import ModelEMA
from ldtok.models import KLAutoencoder, ModelConfig

TINY = dict(type="kl", block_out_channels=[32, 64], layers_per_block=1, latent_channels=4, norm_num_groups=32,
            sample_size=32, mid_block_add_attention=False)


def tiny_model(**overrides) -> KLAutoencoder:
    torch.manual_seed(0)
    return KLAutoencoder.from_config(ModelConfig(**{**TINY, **overrides}))


def test_forward_shapes_and_posterior():
    model = tiny_model()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    out = model(x)
    assert out.sample.shape == (2, 3, 32, 32)
    assert out.posterior.mean.shape == (2, 4, 16, 16)  # f2 for two levels
    assert out.quant is None
    assert model.last_layer is model.vae.decoder.conv_out.weight


def test_deterministic_mode_has_no_posterior_and_no_noise():
    model = tiny_model(deterministic=True).train()
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    a, b = model(x), model(x)
    assert a.posterior is None
    torch.testing.assert_close(a.sample, b.sample)


def test_export_then_from_pretrained_gives_identical_outputs(tmp_path):
    model = tiny_model().eval()
    model.set_latent_statistics(scaling_factor=1.7)
    model.export(tmp_path / "vae")
    loaded, info = AutoencoderKL.from_pretrained(tmp_path / "vae", output_loading_info=True)
    assert all(not v for v in info.values()), info  # no missing / unexpected / mismatched keys
    assert loaded.config.scaling_factor == 1.7
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        ours = model(x).sample
        theirs = loaded(x, sample_posterior=False).sample
    assert torch.equal(ours, theirs)
    assert not list(tmp_path.glob(".vae*")), "temporary export directory left behind"


def test_ema_averages_parameters_and_copies_buffers():
    model = torch.nn.BatchNorm1d(3)  # has both parameters and buffers
    ema = ModelEMA(model, decay=0.5, warmup=False)
    with torch.no_grad():
        model.weight.fill_(3.0)
        model.running_mean.fill_(7.0)
    ema.update(model)
    torch.testing.assert_close(ema.model.weight, torch.full((3,), 2.0))  # 0.5 * 1 + 0.5 * 3
    torch.testing.assert_close(ema.model.running_mean, torch.full((3,), 7.0))  # copied, not averaged
    restored = ModelEMA(model, decay=0.5, warmup=False)
    restored.load_state_dict(ema.state_dict())
    assert restored.num_updates == 1 and torch.equal(restored.model.weight, ema.model.weight)
