"""The rotation trick, SimVQ, residual VQ and the validation of `model.quantizer`."""

from __future__ import annotations

import pytest
import torch

from ldtok.config import ConfigError, load_config
from ldtok.models.vqgan import VQGAN
from ldtok.quantizers import QuantizerConfig, ResidualVectorQuantizer, VectorQuantizer, build_quantizer
from ldtok.quantizers.vector_quantizer import rotate_to
from ldtok.training import RunConfig


def latents(C: int = 4, *, B: int = 2, H: int = 4, W: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(seed))


def forward_and_grad(gradient: str, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q = VectorQuantizer(codebook_size=8, codebook_dim=4, kmeans_init=False, dead_code_steps=0, gradient=gradient)
    q.eval()
    z = z.clone().requires_grad_(True)
    out = q(z)
    weights = torch.linspace(-1, 2, out.quantized.numel()).view_as(out.quantized)  # a loss that is not symmetric
    (out.quantized * weights).sum().backward()
    return out.quantized.detach(), out.indices, z.grad


def test_rotation_trick_keeps_the_forward_and_changes_the_gradient():
    z = latents()
    st_value, st_idx, st_grad = forward_and_grad("straight_through", z)
    rot_value, rot_idx, rot_grad = forward_and_grad("rotation", z)
    assert torch.equal(rot_value, st_value) and torch.equal(rot_idx, st_idx)  # bitwise the same forward
    weights = torch.linspace(-1, 2, st_value.numel()).view_as(st_value)
    assert torch.equal(st_grad, weights)  # straight-through: identity
    assert not torch.allclose(rot_grad, st_grad, atol=1e-3)


def test_rotate_to_maps_e_onto_q_with_the_rotation_and_scaling_as_jacobian():
    e = torch.randn(5, 4, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    q = torch.randn(5, 4, generator=torch.Generator().manual_seed(2))
    rotated = rotate_to(e, q)
    torch.testing.assert_close(rotated, q, rtol=1e-5, atol=1e-5)  # the value is (up to rounding) the code
    # the Jacobian of row 0 is lambda * R: orthogonal up to the scale ||q|| / ||e||
    jac = torch.autograd.functional.jacobian(lambda x: rotate_to(x, q[:1]), e[:1].detach()).reshape(4, 4)
    scale = (q[0].norm() / e[0].norm()).item()
    torch.testing.assert_close(jac @ jac.t() / scale**2, torch.eye(4), rtol=1e-4, atol=1e-4)


def test_simvq_trains_the_linear_map_of_a_frozen_basis_and_exports_the_folded_table():
    q = build_quantizer(QuantizerConfig(codebook_size=8, codebook_dim=4, ema=False, codebook_transform="linear",
                                        kmeans_init=True, dead_code_steps=0))
    assert isinstance(q.embedding, torch.Tensor) and not isinstance(q.embedding, torch.nn.Parameter)
    assert [name for name, _ in q.named_parameters()] == ["codebook_transform.weight"]
    z = latents()
    out = q(z)  # k-means writes the basis so that the *codes* are the centroids
    out.loss.backward()
    weight = q.codebook_transform.weight
    assert weight.grad is not None and weight.grad.abs().sum() > 0  # the codebook loss reaches the map
    with torch.no_grad():
        weight.add_(0.1 * torch.randn(4, 4, generator=torch.Generator().manual_seed(3)))
    torch.testing.assert_close(q.export_codebook(), q.embedding @ weight.detach().t())
    q.eval()
    out = q(z)
    assert torch.equal(q.codes_from_indices(out.indices), out.quantized)


def test_simvq_vqgan_exports_a_plain_vqmodel_with_the_folded_codebook(tmp_path):
    from diffusers import VQModel

    from ldtok.models import ModelConfig, load_tokenizer

    config = ModelConfig(type="vqgan", block_out_channels=[32, 64], norm_num_groups=32, latent_channels=4,
                         sample_size=32, quantizer=QuantizerConfig(codebook_size=16, codebook_dim=4, ema=False,
                                                                   codebook_transform="linear", kmeans_init=False))
    model = VQGAN.from_config(config)
    with torch.no_grad():
        model.quantizer.codebook_transform.weight.mul_(1.5)
    model.export(tmp_path / "simvq")
    vq = VQModel.from_pretrained(tmp_path / "simvq")
    torch.testing.assert_close(vq.quantize.embedding.weight, model.quantizer.export_codebook())
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    loaded = load_tokenizer(tmp_path / "simvq")
    model.eval()
    assert torch.equal(loaded.encode_to_indices(x), model.encode_to_indices(x))
    torch.testing.assert_close(loaded.decode_indices(model.encode_to_indices(x)), model(x).sample)


def test_residual_stages_quantize_what_the_previous_ones_left():
    rq = ResidualVectorQuantizer(num_stages=3, stage_options=dict(codebook_size=8, codebook_dim=4,
                                                                  kmeans_init=True, dead_code_steps=0))
    z = latents(B=8)
    out = rq(z)
    assert out.indices.shape == (8, 3, 4, 4) and len(out.stages) == 3
    torch.testing.assert_close(out.loss, sum(s.loss for s in out.stages))
    rq.eval()
    errors = []
    partial = torch.zeros_like(z)
    for s in range(3):
        partial = partial + rq.stage(s).codes_from_indices(rq(z).indices[:, s])
        errors.append(float((z - partial).pow(2).mean()))
    assert errors[0] > errors[1] > errors[2], errors  # every stage reduces the error
    # the straight-through gradient of the sum reaches the input
    rq.train()
    x = z.clone().requires_grad_(True)
    rq(x).quantized.sum().backward()
    assert torch.allclose(x.grad, torch.ones_like(x))


def test_quantize_dropout_drops_trailing_stages_reproducibly():
    def run():
        rq = ResidualVectorQuantizer(num_stages=4, quantize_dropout=0.9,
                                     stage_options=dict(codebook_size=8, codebook_dim=4, kmeans_init=False))
        return [int((rq(latents(seed=i)).indices[0, :, 0, 0] >= 0).sum()) for i in range(12)]

    active = run()
    assert active == run()  # seeded by the step, not by the global RNG: every rank drops the same stages
    assert min(active) < 4 and max(active) <= 4 and min(active) >= 1, active


@pytest.mark.parametrize(("override", "key"), [
    ("model.quantizer.type=lfq", None),
    ("model.quantizer.type=pq", "model.quantizer.type"),
    ("model.quantizer.type=fsq", "model.quantizer.levels"),
    ("model.quantizer.levels=[8, 5]", "model.quantizer.levels"),
    ("model.quantizer.gradient=rotate", "model.quantizer.gradient"),
    ("model.quantizer.codebook_transform=linear", "model.quantizer.codebook_transform"),
    ("model.quantizer.quantize_dropout=1.5", "model.quantizer.quantize_dropout"),
    ("model.quantizer.decay=1.0", "model.quantizer.decay"),
    ("model.quantizer.num_stages=0", "model.quantizer.num_stages"),
])
def test_quantizer_keys_are_validated_and_errors_name_the_key(override, key):
    base = ["model.type=vqgan", "model.quantizer.codebook_size=256"]
    if key is None:  # lfq derives codebook_size from codebook_dim: 256 = 2^8 is consistent
        cfg = load_config(RunConfig, None, [*base, "model.quantizer.codebook_dim=8", override])
        assert cfg.model.quantizer.codebook_size == 256
        return
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(RunConfig, None, [*base, override])


def test_derived_codebook_sizes_must_agree():
    fsq = QuantizerConfig(type="fsq", levels=[8, 8, 8, 5, 5, 5])
    assert (fsq.codebook_size, fsq.codebook_dim) == (64000, 6)
    # a section's own error names its key; from_dict (YAML / key=value) prefixes the section's dotted path
    with pytest.raises(ConfigError, match="^codebook_size: type lfq implies 262144, got 1000"):
        QuantizerConfig(type="lfq", codebook_dim=18, codebook_size=1000)
    with pytest.raises(ConfigError, match="^entropy_groups: must divide codebook_dim=18"):
        QuantizerConfig(type="lfq", codebook_dim=18, entropy_groups=4)
    base = ["model.type=vqgan", "model.quantizer.type=lfq", "model.quantizer.codebook_dim=18"]
    with pytest.raises(ConfigError, match=r"^model\.quantizer\.codebook_size: type lfq implies 262144, got 1000"):
        load_config(RunConfig, None, [*base, "model.quantizer.codebook_size=1000"])
    with pytest.raises(ConfigError, match=r"^model\.quantizer\.entropy_groups: must divide"):
        load_config(RunConfig, None, [*base, "model.quantizer.entropy_groups=4"])
    with pytest.raises(ConfigError, match="model.quantizer.type"):
        from ldtok.models import ModelConfig
        from ldtok.models.vqvae2 import VQVAE2Autoencoder

        VQVAE2Autoencoder.from_config(ModelConfig(type="vqvae2", block_out_channels=[32, 64], norm_num_groups=32,
                                                  quantizer=QuantizerConfig(type="residual")))
