"""The `Tokenizer` interface (ldtok.models.base): every family answers the same questions (latent kind, shard
fields and dtypes, codebook sizes, encode to fields and decode back), the family and the latent kind are distinct
names, a VQGAN's inner diffusers `VQModel` still works through its own API, and VQ-VAE-2's chain is one method."""

from __future__ import annotations

import pytest
import torch

from ldtok.errors import LdtokError
from ldtok.latent_kinds import LATENT_KINDS
from ldtok.models import ModelConfig, build_model
from ldtok.models.base import Tokenizer
from ldtok.quantizers import QuantizerConfig

TINY = {"block_out_channels": [32, 64], "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 32,
        "sample_size": 32, "mid_block_add_attention": False}
VQ = QuantizerConfig(codebook_size=300, codebook_dim=4, kmeans_init=True, kmeans_iters=3, dead_code_steps=0)
FAMILIES = {  # family -> (config, latent kind, fields, stored dtypes at fp16, codebook sizes)
    "kl": (ModelConfig(type="kl", **TINY), "kl", ("mean", "logvar"), [torch.float16] * 2, []),
    "mlp": (ModelConfig(type="mlp", in_channels=1, sample_size=8, block_out_channels=[16], latent_channels=2),
            "kl", ("mean", "logvar"), [torch.float16] * 2, []),
    "vqgan": (ModelConfig(type="vqgan", **TINY, quantizer=VQ), "vq", ("indices",), [torch.int16], [300]),
    "vqgan-fsq": (ModelConfig(type="vqgan", **TINY, quantizer=QuantizerConfig(type="fsq", levels=[5, 4, 3, 3])),
                  "vq", ("indices",), [torch.uint8], [180]),
    "vqvae2": (ModelConfig(type="vqvae2", **TINY, quantizer=VQ), "vqvae2", ("indices_top", "indices_bottom"),
               [torch.int16] * 2, [300, 300]),
}


def trained_once(config: ModelConfig):
    """The model after one training-mode forward (k-means sets the codebooks), in eval mode."""
    torch.manual_seed(0)
    model = build_model(config).train()
    with torch.no_grad():
        model(images(config, 8, seed=1))
    return model.eval()


def images(config: ModelConfig, n: int = 2, seed: int = 0) -> torch.Tensor:
    C, R = config.in_channels, (config.sample_size if config.type == "mlp" else 32)
    return torch.rand(n, C, R, R, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_family_answers_the_interface(name):
    config, kind, fields, dtypes, sizes = FAMILIES[name]
    model = trained_once(config)
    assert isinstance(model, Tokenizer)
    assert model.family == config.type and model.latent_kind == kind == model.kind  # family != kind for vqgan/mlp
    assert model.latent is LATENT_KINDS[kind] and model.latent.fields == fields
    assert model.has_gaussian_latent == (kind == "kl")
    assert model.codebook_sizes == sizes
    assert model.shard_fields(dtype=torch.float16) == dict(zip(fields, dtypes))
    assert model.last_layer.requires_grad and model.last_layer.ndim >= 2
    x = images(config)
    encoded = model.encode_fields(x, dtype=torch.float16)
    assert list(encoded) == list(fields)
    if kind == "kl":
        assert all(t.dtype == torch.float16 for t in encoded.values())
        posterior = model.encode_posterior(x)
        assert torch.equal(encoded["mean"], posterior.mean.half())
    else:
        assert all(t.dtype == torch.int64 for t in encoded.values())
        assert max(int(t.max()) for t in encoded.values()) < max(sizes)
    # decoding the stored fields is the eval-mode reconstruction (KL: of the posterior mean, at fp32)
    exact = model.encode_fields(x)
    with torch.no_grad():
        assert torch.allclose(model.decode_fields(exact), model(x).sample, atol=1e-5)
    if kind == "kl":  # a posterior sample differs from the mean's decoding, reproducibly with a generator
        a = model.decode_fields(exact, sample=True, generator=torch.Generator().manual_seed(3))
        b = model.decode_fields(exact, sample=True, generator=torch.Generator().manual_seed(3))
        assert torch.equal(a, b) and not torch.allclose(a, model.decode_fields(exact))


def test_the_exported_quantized_autoencoder_is_a_tokenizer_too(tmp_path):
    from ldtok.models.quantized import QuantizedAutoencoder

    config = FAMILIES["vqgan-fsq"][0]
    model = trained_once(config)
    model.export(tmp_path / "fsq")
    exported = QuantizedAutoencoder.from_pretrained(tmp_path / "fsq").eval()
    assert isinstance(exported, Tokenizer) and (exported.family, exported.latent_kind) == ("vqgan", "vq")
    assert exported.codebook_sizes == [180] and exported.shard_fields() == {"indices": torch.uint8}
    x = images(config)
    fields = exported.encode_fields(x)
    assert torch.equal(fields["indices"], model.encode_to_indices(x))
    with torch.no_grad():
        assert torch.allclose(exported.decode_fields(fields), model(x).sample, atol=1e-5)


def test_a_family_without_a_shard_format_says_so_in_one_line():
    model = build_model(ModelConfig(type="vae2", **TINY)).eval()
    assert model.family == "vae2" and not model.has_gaussian_latent
    with pytest.raises(LdtokError, match=r"^model.type 'vae2' has no latent-shard format yet") as e:
        model.shard_fields()
    assert "\n" not in str(e.value)


def test_the_held_vqmodel_works_through_its_own_api():
    """`VQModel.forward`, `decode(latents)` and `decode(indices, force_not_quantize=True, shape=...)` use our
    quantizer (`QuantizerOutput` iterates as diffusers' triple; `get_codebook_entry` looks codes up)."""
    config = FAMILIES["vqgan"][0]
    model = trained_once(config)
    vq, x = model.vqmodel, images(config)
    with torch.no_grad():
        reference = model(x).sample
        assert torch.equal(vq(x).sample, reference)
        latents = vq.encode(x).latents  # (B, D, h, w), before quantization
        assert torch.equal(vq.decode(latents).sample, reference)
        indices = model.encode_to_indices(x)  # (B, h, w)
        B, h, w = indices.shape
        looked_up = vq.decode(indices, force_not_quantize=True, shape=(B, h, w, VQ.codebook_dim)).sample
        assert torch.allclose(looked_up, reference, atol=1e-5)
        quant, loss, (perplexity, _, idx) = vq.quantize(latents)  # diffusers' convention
        assert torch.equal(idx, indices) and loss.ndim == 0 and perplexity > 0
    assert vq.quantize is model.quantizer, "one quantizer module, registered once"
    model.train()  # re-quantizing latents for the evaluation's interpolations: eval semantics, modes restored
    with torch.no_grad():
        assert torch.equal(model.reconstruct_from_latents(model.encode_latents(x)), reference)
    assert model.quantizer.training
    assert sum(k.startswith("vqmodel.quantize.embedding") for k in model.state_dict()) == 1


def test_vqvae2_chain_is_one_method_used_by_forward_and_indices():
    model = trained_once(FAMILIES["vqvae2"][0]).vqvae2
    x = images(FAMILIES["vqvae2"][0])
    with torch.no_grad():
        h = model.encoder(x)
        top, bottom = model.quantize_features(h)
        indices = model.encode_to_indices(x)
        assert torch.equal(indices.top, top.indices) and torch.equal(indices.bottom, bottom.indices)
        assert torch.equal(model.reconstruct_from_features(h), model(x).sample)
    model.train()
    with torch.no_grad():
        model.reconstruct_from_features(h)
    assert model.quantize_top.training and model.quantize_bottom.training, "the modes are restored"
