"""FSQ / LFQ / BSQ against `vector-quantize-pytorch` where the definitions coincide; indices <-> codes round trips of
every quantizer; bf16 autocast picks the same codes as fp32."""

from __future__ import annotations

import pytest
import torch
from vector_quantize_pytorch import FSQ, LFQ

from ldtok.quantizers import (
    BinarySphericalQuantizer,
    FiniteScalarQuantizer,
    LookupFreeQuantizer,
    QuantizerConfig,
    build_quantizer,
)


def latents(C: int, *, B: int = 2, H: int = 4, W: int = 5, scale: float = 2.0, seed: int = 0) -> torch.Tensor:
    return scale * torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------ references
@pytest.mark.parametrize("levels", [[8, 8, 8, 5, 5, 5], [8, 6, 5], [7, 3]])
def test_fsq_equals_vector_quantize_pytorch(levels):
    z = latents(len(levels))
    ours = FiniteScalarQuantizer(levels=levels)
    reference = FSQ(levels=levels)  # no projection: dim == len(levels)
    ref_out, ref_idx = reference(z)
    out = ours(z)
    assert torch.equal(out.indices, ref_idx.long())
    torch.testing.assert_close(out.quantized, ref_out, rtol=0, atol=1e-6)
    assert ours.codebook_size == reference.codebook_size
    # the reference's own inverse agrees with ours on every code
    every = torch.arange(ours.codebook_size).view(1, 1, -1)
    torch.testing.assert_close(ours.codes_from_indices(every), reference.indices_to_codes(every))


@pytest.mark.parametrize("spherical", [False, True])
@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_lfq_and_bsq_equal_vector_quantize_pytorch(spherical, beta):
    """Outputs, indices and the training loss (entropy terms with the same weights and temperature + commitment)."""
    d = 6
    z = latents(d, scale=0.3)
    cls = BinarySphericalQuantizer if spherical else LookupFreeQuantizer
    ours = cls(codebook_dim=d, entropy_weight=0.2, entropy_temperature=0.05, diversity_gamma=1.5, beta=beta)
    reference = LFQ(dim=d, codebook_size=2**d, entropy_loss_weight=0.2, diversity_gamma=1.5,
                    commitment_loss_weight=beta, spherical=spherical)
    ref_out, ref_idx, ref_loss = reference(z, inv_temperature=1 / 0.05)
    out = ours(z)
    assert torch.equal(out.indices, ref_idx.long())
    torch.testing.assert_close(out.quantized, ref_out, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-5, atol=1e-6)


def test_lfq_entropy_groups_split_the_bits():
    """Groups of bits: per-sample entropy adds up exactly (independent groups), the codebook term is the sum of the
    groups' entropies; one group per bit is BSQ's factorized form."""
    d = 8
    z = latents(d, scale=0.3).permute(0, 2, 3, 1).reshape(-1, d)
    exact = LookupFreeQuantizer(codebook_dim=d, entropy_groups=1)
    grouped = LookupFreeQuantizer(codebook_dim=d, entropy_groups=2)
    per_sample_1, codebook_1 = exact.entropy_terms(z)
    per_sample_2, codebook_2 = grouped.entropy_terms(z)
    torch.testing.assert_close(per_sample_2, per_sample_1, rtol=1e-4, atol=1e-4)
    assert codebook_2 >= codebook_1 - 1e-4  # subadditivity: the grouped codebook entropy is an upper bound
    # per bit: the group softmax over {+1, -1} is a sigmoid of 4 x / T
    per_bit = LookupFreeQuantizer(codebook_dim=d, entropy_groups=d)
    p = torch.sigmoid(4 * z / per_bit.entropy_temperature)
    h = -(p * p.clamp_min(1e-5).log() + (1 - p) * (1 - p).clamp_min(1e-5).log())
    torch.testing.assert_close(per_bit.entropy_terms(z)[0], h.sum(1).mean(), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------ every quantizer
CONFIGS = {
    "vq": dict(type="vq", codebook_size=16, codebook_dim=4, kmeans_init=False),
    "vq-l2": dict(type="vq", codebook_size=16, codebook_dim=4, l2_normalize=True, kmeans_init=False),
    "vq-rotation": dict(type="vq", codebook_size=16, codebook_dim=4, gradient="rotation", kmeans_init=False),
    "simvq": dict(type="vq", codebook_size=16, codebook_dim=4, ema=False, codebook_transform="linear"),
    "fsq": dict(type="fsq", levels=[8, 5, 5, 5]),
    "lfq": dict(type="lfq", codebook_dim=10, entropy_groups=2),
    "bsq": dict(type="bsq", codebook_dim=10),
    "residual": dict(type="residual", codebook_size=16, codebook_dim=4, num_stages=3, kmeans_init=False),
    "residual-shared": dict(type="residual", codebook_size=16, codebook_dim=4, num_stages=2, shared_codebook=True),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_indices_to_codes_round_trip(name):
    """Train a few steps (k-means, EMA, restarts move the codebook), then in eval mode `codes_from_indices(indices)`
    is bitwise `quantized`, and (nearest-code and sign quantizers) re-quantizing the codes gives the same indices."""
    config = QuantizerConfig(**CONFIGS[name])
    quantizer = build_quantizer(config)
    for seed in range(3):
        quantizer(latents(config.codebook_dim, seed=seed))
    quantizer.eval()
    out = quantizer(latents(config.codebook_dim, seed=10))
    codes = quantizer.codes_from_indices(out.indices)
    assert torch.equal(codes, out.quantized)
    if config.type in ("vq", "lfq", "bsq"):  # codes are fixed points (not FSQ's tanh bound, not residual sums)
        assert torch.equal(quantizer(codes).indices, out.indices)
    expected = (2, config.num_stages, 4, 5) if config.type == "residual" else (2, 4, 5)
    assert out.indices.shape == expected and out.indices.dtype == torch.int64
    assert int(out.indices.min()) >= 0 and int(out.indices.max()) < quantizer.codebook_size


@pytest.mark.parametrize("name", list(CONFIGS))
def test_bf16_autocast_picks_the_same_indices_as_fp32(name):
    config = QuantizerConfig(**CONFIGS[name])
    quantizer = build_quantizer(config).eval()
    z = latents(config.codebook_dim, B=4, H=8, W=8)
    reference = quantizer(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = quantizer(z)
    assert torch.equal(out.indices, reference.indices)
    assert out.loss.dtype == torch.float32
    # a bf16 input (as a bf16 encoder produces) is quantized in fp32 too: the codes of its fp32 value
    z16 = z.bfloat16()
    assert torch.equal(quantizer(z16).indices, quantizer(z16.float()).indices)


def test_quantizer_losses_reach_the_input():
    """LFQ's commitment and entropy terms and FSQ's straight-through reach the encoder output."""
    for config in (CONFIGS["lfq"], CONFIGS["bsq"], CONFIGS["fsq"]):
        cfg = QuantizerConfig(**config)
        z = latents(cfg.codebook_dim, scale=0.5).requires_grad_(True)
        out = build_quantizer(cfg)(z)
        (out.quantized.sum() + out.loss).backward()
        assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    lfq = build_quantizer(QuantizerConfig(**CONFIGS["lfq"]))
    z = latents(10, scale=0.5).requires_grad_(True)
    lfq(z).entropy_loss.backward()
    assert z.grad.abs().sum() > 0  # the entropy term alone has a gradient


def test_usage_window_counts_the_codes_of_recent_steps():
    fsq = FiniteScalarQuantizer(levels=[3, 3], usage_window=2)
    one_code = torch.full((1, 2, 1, 1), -5.0)  # every channel at the lowest level: code 0
    fsq(one_code)
    assert fsq.window_usage() == pytest.approx(1 / 9)
    fsq(torch.tensor([[-5.0, 0.0, 5.0], [5.0, 0.0, -5.0]]).view(1, 2, 1, 3))  # 3 more codes
    assert fsq.window_usage() == pytest.approx(4 / 9)
    fsq(torch.full((1, 2, 1, 1), 5.0))
    fsq(torch.full((1, 2, 1, 1), 5.0))
    assert fsq.window_usage() == pytest.approx(1 / 9)  # only the last code is in the window of 2 steps
