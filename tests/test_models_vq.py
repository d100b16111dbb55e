"""VQGAN and VQ-VAE-2: shapes, index round trips, diffusers export / import, hierarchy, gradient paths."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import VQModel

from ldtok.models import ModelConfig
from ldtok.models.vqgan import VQGAN, indices_from_diffusers_vqmodel
from ldtok.models.vqvae2 import VQVAE2, VQVAE2Autoencoder, VQVAE2Indices
from ldtok.quantizers import QuantizerConfig

TINY = {"block_out_channels": [32, 64], "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 32,
        "sample_size": 32, "mid_block_add_attention": False}
K, D = 64, 4


def quantizer_config(**overrides) -> QuantizerConfig:
    return QuantizerConfig(**{"codebook_size": K, "codebook_dim": D, "kmeans_init": True, "kmeans_iters": 3,
                              "dead_code_steps": 0, **overrides})


def images(n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def tiny_vqgan(**quantizer_overrides) -> VQGAN:
    torch.manual_seed(0)
    config = ModelConfig(type="vqgan", **TINY)
    config.quantizer = quantizer_config(**quantizer_overrides)  # the field the lead engineer adds to ModelConfig
    return VQGAN.from_config(config)


def tiny_vqvae2(*, top_quantizer: QuantizerConfig | None = None, **quantizer_overrides) -> VQVAE2Autoencoder:
    torch.manual_seed(0)
    config = ModelConfig(type="vqvae2", **TINY)
    return VQVAE2Autoencoder.from_config(config, quantizer_config(**quantizer_overrides), top_quantizer=top_quantizer)


def trained_once(model):
    """One training-mode forward: k-means init and an EMA update, so the codebook is not the constructor's."""
    model.train()
    with torch.no_grad():
        model(images(4, seed=1))
    return model.eval()


# ---------------------------------------------------------------------------------------------------------- VQGAN


@pytest.mark.parametrize("l2_normalize", [False, True])
def test_vqgan_shapes_and_index_round_trip(l2_normalize):
    model = trained_once(tiny_vqgan(l2_normalize=l2_normalize))
    assert int(model.quantizer.initialized) == 1
    x = images()
    out = model(x)
    assert out.sample.shape == (2, 3, 32, 32) and out.posterior is None
    assert out.quant.quantized.shape == (2, D, 16, 16) and out.quant.indices.shape == (2, 16, 16)
    assert model.codebook_sizes == [K] and model.level_names == ["code"]
    assert model.last_layer is model.vqmodel.decoder.conv_out.weight

    model.train()  # encode_to_indices must not update the codebook or leave the model in eval mode
    before = {k: v.clone() for k, v in model.state_dict().items()}
    indices = model.encode_to_indices(x)
    assert model.training and model.quantizer.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert indices.shape == (2, 16, 16) and indices.dtype == torch.int64
    torch.testing.assert_close(indices, out.quant.indices, rtol=0, atol=0)
    model.eval()
    torch.testing.assert_close(model.decode_indices(indices), out.sample, rtol=0, atol=0)


@pytest.mark.parametrize("l2_normalize", [False, True])
def test_vqgan_export_decodes_our_indices_in_diffusers(tmp_path, l2_normalize):
    model = trained_once(tiny_vqgan(l2_normalize=l2_normalize))
    model.export(tmp_path / "vq")
    assert not list(tmp_path.glob(".vq*")), "temporary export directory left behind"
    loaded, info = VQModel.from_pretrained(tmp_path / "vq", output_loading_info=True)
    assert all(not v for v in info.values()), info  # no missing / unexpected / mismatched keys
    assert loaded.config.lookup_from_codebook and loaded.config.vq_embed_dim == D
    torch.testing.assert_close(loaded.quantize.embedding.weight, model.quantizer.export_codebook(), rtol=0, atol=0)

    x = images()
    indices = model.encode_to_indices(x)
    B, h, w = indices.shape
    with torch.no_grad():
        theirs = loaded.decode(indices, force_not_quantize=True, shape=(B, h, w, loaded.config.vq_embed_dim)).sample
    torch.testing.assert_close(theirs, model.decode_indices(indices), rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # the flag-independent recipe: look the codes up, decode (re-quantizing) them
        codes = loaded.quantize.get_codebook_entry(indices, (B, h, w, loaded.config.vq_embed_dim))
        torch.testing.assert_close(loaded.decode(codes).sample, theirs, rtol=1e-4, atol=1e-5)
    # the diffusers quantizer finds our indices: directly for plain codes, after normalizing the latents for l2 codes
    ours = indices_from_diffusers_vqmodel(loaded, x, l2_normalize=l2_normalize)
    assert torch.equal(ours, indices)


def test_diffusers_own_forward_reconstructs_like_ldtok(tmp_path):
    model = trained_once(tiny_vqgan())
    model.export(tmp_path / "vq")
    loaded = VQModel.from_pretrained(tmp_path / "vq")
    x = images()
    with torch.no_grad():
        # diffusers' straight-through `z + (z_q - z).detach()` rounds the code's value (ours is exactly z_q)
        torch.testing.assert_close(loaded(x).sample, model(x).sample, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("ema", [True, False])
def test_vqgan_init_from_diffusers_directory_keeps_the_codebook(tmp_path, ema):
    source = trained_once(tiny_vqgan())
    source.export(tmp_path / "vq")
    table = VQModel.from_pretrained(tmp_path / "vq").quantize.embedding.weight.detach()

    config = ModelConfig(type="vqgan", init_from=str(tmp_path / "vq"))
    model = VQGAN.from_config(config, quantizer_config(kmeans_init=True, ema=ema))
    q = model.quantizer
    assert torch.equal(q.embedding.detach(), table) and int(q.initialized) == 1
    if ema:
        assert torch.equal(q.embed_sum, table) and torch.equal(q.cluster_size, torch.ones(K))
    # the rest of the weights came along: same reconstructions as the source model
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x).sample, source(x).sample, rtol=0, atol=0)

    model.train()
    with torch.no_grad():
        out = model(images(4, seed=3))
    used = torch.bincount(out.quant.indices.flatten(), minlength=K) > 0
    if ema:  # the EMA moves the used codes only; k-means would have replaced every row
        assert torch.equal(q.embedding[~used], table[~used]) and (~used).any()
    else:
        assert torch.equal(q.embedding.detach(), table)

    with pytest.raises(ValueError, match="model.quantizer.codebook_size"):
        VQGAN.from_config(config, quantizer_config(codebook_size=32))


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        config = ModelConfig(type="vqgan", gradient_checkpointing=checkpointing, **TINY)
        model = VQGAN.from_config(config, quantizer_config(kmeans_init=False)).train()
        out = model(images(1))
        (out.sample.square().mean() + out.quant.loss).backward()
        vq = model.vqmodel
        assert vq.encoder.gradient_checkpointing == vq.decoder.gradient_checkpointing == checkpointing
        grads.append(model.vqmodel.encoder.conv_in.weight.grad)
    torch.testing.assert_close(grads[0], grads[1])
    # VQ-VAE-2: the same switch reaches its four diffusers encoders / decoders
    config = ModelConfig(type="vqvae2", gradient_checkpointing=True, **TINY)
    model = VQVAE2Autoencoder.from_config(config, quantizer_config()).vqvae2
    assert all(m.gradient_checkpointing for m in (model.encoder, model.encoder_top, model.decoder_top, model.decoder))


def test_vqgan_commit_loss_reaches_the_encoder_only():
    model = tiny_vqgan(kmeans_init=False).train()
    out = model(images())
    out.quant.commit_loss.backward()
    assert model.vqmodel.encoder.conv_in.weight.grad.abs().sum() > 0
    assert model.vqmodel.quant_conv.weight.grad.abs().sum() > 0
    assert model.vqmodel.decoder.conv_out.weight.grad is None


def test_vqgan_codebook_metrics():
    model = tiny_vqgan(dead_code_steps=1, usage_window=10)
    model.train()
    with torch.no_grad():
        for seed in range(3):
            model(images(seed=seed))
    metrics = model.codebook_metrics()
    assert set(metrics) == {"codebook_usage_window_pct", "codebook_restarts", "codebook_restarts_total"}
    assert 0 < metrics["codebook_usage_window_pct"] <= 100
    assert metrics["codebook_restarts_total"] == float(model.quantizer.num_restarts) > 0


# ------------------------------------------------------------------------------------------------------- VQ-VAE-2


def test_vqvae2_shapes_and_index_round_trip():
    model = trained_once(tiny_vqvae2())
    x = images()
    out = model(x)
    top, bottom = out.quant
    assert out.sample.shape == (2, 3, 32, 32)
    assert top.indices.shape == (2, 8, 8) and bottom.indices.shape == (2, 16, 16)  # factors 2f and f (f = 2)
    assert model.codebook_sizes == [K, K] and model.level_names == ["top", "bottom"]
    assert model.last_layer is model.vqvae2.decoder.conv_out.weight

    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    indices = model.encode_to_indices(x)
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert isinstance(indices, VQVAE2Indices) and indices.top.dtype == indices.bottom.dtype == torch.int64
    assert torch.equal(indices.top, top.indices) and torch.equal(indices.bottom, bottom.indices)
    model.eval()
    torch.testing.assert_close(model.decode_indices(*indices), out.sample, rtol=0, atol=0)

    metrics = model.codebook_metrics()
    assert {"codebook_usage_window_pct_top", "codebook_usage_window_pct_bottom", "codebook_restarts_top",
            "codebook_restarts_total_bottom"} <= set(metrics)


def test_vqvae2_save_and_load_round_trip(tmp_path):
    model = trained_once(tiny_vqvae2(l2_normalize=True))
    model.export(tmp_path / "vqvae2")
    assert not list(tmp_path.glob(".vqvae2*")), "temporary export directory left behind"
    loaded, info = VQVAE2.from_pretrained(tmp_path / "vqvae2", output_loading_info=True)
    assert all(not v for v in info.values()), info
    state, loaded_state = model.vqvae2.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys() and "quantize_top.embed_sum" in state  # training buffers kept
    assert all(torch.equal(state[k], loaded_state[k]) for k in state)
    x = images()
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x).sample, model(x).sample)
    ours, theirs = model.encode_to_indices(x), loaded.encode_to_indices(x)
    assert torch.equal(ours.top, theirs.top) and torch.equal(ours.bottom, theirs.bottom)

    # fine-tuning from the export: codebooks (sizes and content) from the checkpoint, training options from the config
    config = ModelConfig(type="vqvae2", init_from=str(tmp_path / "vqvae2"))
    resumed = VQVAE2Autoencoder.from_config(config, quantizer_config(l2_normalize=True, beta=0.5))
    assert resumed.vqvae2.quantize_bottom.beta == 0.5 and int(resumed.vqvae2.quantize_top.initialized) == 1
    assert torch.equal(resumed.vqvae2.quantize_top.embedding, model.vqvae2.quantize_top.embedding)
    with pytest.raises(ValueError, match="model.quantizer.l2_normalize"):
        VQVAE2Autoencoder.from_config(config, quantizer_config(l2_normalize=False))


def test_vqvae2_top_code_conditions_bottom_and_decoder():
    model = trained_once(tiny_vqvae2()).vqvae2
    x = images()
    top, bottom = model.encode_to_indices(x)
    # the decoder reads the top code
    other_top = (top + 1) % K
    assert not torch.allclose(model.decode_indices(other_top, bottom), model.decode_indices(top, bottom))
    # the bottom quantizer's input depends on the (decoded) top code
    with torch.no_grad():
        h = model.encoder(x)
        codes = model.quantize_top.codes_from_indices(top)
        other_codes = model.quantize_top.codes_from_indices(other_top)
        assert not torch.allclose(model.bottom_input(h, codes), model.bottom_input(h, other_codes))
        model.decoder_top.conv_out.weight.mul_(-3.0)  # change how the top code conditions the bottom
    new_top, new_bottom = model.encode_to_indices(x)
    assert torch.equal(new_top, top) and not torch.equal(new_bottom, bottom)


def test_vqvae2_commit_losses_reach_the_encoders():
    model = tiny_vqvae2(kmeans_init=False).vqvae2.train()
    top, bottom = model(images()).quant
    top.commit_loss.backward(retain_graph=True)
    assert model.encoder_top.conv_in.weight.grad.abs().sum() > 0
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0
    assert model.quant_conv_bottom.weight.grad is None and model.decoder.conv_out.weight.grad is None
    model.zero_grad(set_to_none=True)
    bottom.commit_loss.backward()
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0
    assert model.quant_conv_bottom.weight.grad.abs().sum() > 0
    assert model.decoder_top.conv_out.weight.grad.abs().sum() > 0  # through the straight-through top code
    assert model.decoder.conv_out.weight.grad is None


def test_vqvae2_per_level_codebooks_and_option_check():
    top = quantizer_config(codebook_size=16, codebook_dim=8, kmeans_init=False)
    model = tiny_vqvae2(top_quantizer=top, kmeans_init=False)
    out = model(images())
    assert model.codebook_sizes == [16, K]
    assert out.quant[0].quantized.shape == (2, 8, 8, 8) and out.quant[1].quantized.shape == (2, D, 16, 16)
    assert model.vqvae2.config.top_codebook_dim == 8
    with pytest.raises(ValueError, match="model.top_quantizer.beta"):
        tiny_vqvae2(top_quantizer=dataclasses.replace(quantizer_config(), beta=0.1))


@pytest.mark.parametrize("l2", [False, True])
def test_load_tokenizer_reads_an_exported_vqgan_back(tmp_path, l2):
    from ldtok.models import load_tokenizer

    model = tiny_vqgan(l2_normalize=l2)
    model.eval()
    model.export(tmp_path / "vq")
    loaded = load_tokenizer(tmp_path / "vq")
    assert loaded.kind == "vq" and loaded.quantizer.l2_normalize == model.quantizer.l2_normalize
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(loaded.encode_to_indices(x), model.encode_to_indices(x))
    assert loaded.config_sha256() == model.config_sha256()


def test_load_tokenizer_reads_kl_and_vqvae2(tmp_path):
    from ldtok.models import KLAutoencoder, load_tokenizer

    kl = KLAutoencoder.from_config(ModelConfig(type="kl", block_out_channels=[32, 64], layers_per_block=1,
                                               sample_size=32, mid_block_add_attention=False)).eval()
    kl.export(tmp_path / "kl")
    assert load_tokenizer(tmp_path / "kl").kind == "kl"
    v2 = tiny_vqvae2().eval()
    v2.export(tmp_path / "v2")
    loaded = load_tokenizer(tmp_path / "v2")
    assert loaded.kind == "vqvae2" and loaded.codebook_sizes == v2.codebook_sizes
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert all(torch.equal(a, b) for a, b in zip(loaded.encode_to_indices(x), v2.encode_to_indices(x)))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text('{"_class_name": "UNet2DModel"}')
    with pytest.raises(ValueError, match="UNet2DModel"):
        load_tokenizer(tmp_path / "bad")
