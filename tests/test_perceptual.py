"""The perceptual networks: LPIPS backbones through torchvision (offline errors name the file), ST-LPIPS."""

import sys
import types
from urllib.error import URLError

import pytest
import torch
from loss_helpers import images

from ldtok.errors import LdtokError
from ldtok.perceptual import PerceptualWeightsUnavailable, build_perceptual


@pytest.fixture(scope="module")
def stlpips_alex():
    return build_perceptual("stlpips-alex")


# --------------------------------------------------------------------------------------------- perceptual


def forbid_downloads(monkeypatch):
    """Offline as a user without network sees it: torch.hub's download raises URLError (nothing else is replaced)."""
    calls = []

    def offline(url, dst, *args, **kwargs):
        calls.append(url)
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    return calls


def test_lpips_backbone_loads_through_torchvision_and_offline_names_the_file_and_dir(monkeypatch, tmp_path):
    calls = forbid_downloads(monkeypatch)
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    checkpoints = tmp_path / "hub" / "checkpoints"
    with pytest.raises(PerceptualWeightsUnavailable) as error:
        build_perceptual("lpips-vgg")
    # torchvision's normal loading asked for the download (a connected machine would have fetched it there).
    assert len(calls) == 1 and calls[0].endswith("/vgg16-397923af.pth")
    message = str(error.value)
    assert "\n" not in message and isinstance(error.value, LdtokError)
    assert "vgg16-397923af.pth" in message and str(checkpoints) in message and "$TORCH_HOME/hub/checkpoints" in message
    assert "URLError" in message and "stlpips-vgg" in message
    # A corrupt cached file gives the same advice plus the cause, not a raw unpickling error, and no download.
    checkpoints.mkdir(parents=True, exist_ok=True)
    (checkpoints / "alexnet-owt-7be5be79.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(PerceptualWeightsUnavailable, match="alexnet-owt-7be5be79.pth.*loading failed"):
        build_perceptual("lpips-alex")
    assert len(calls) == 1
    # A random backbone needs no file at all.
    assert build_perceptual("lpips-alex", random_init=True) is not None and len(calls) == 1


def test_stlpips_alex_is_offline_frozen_and_a_distance(monkeypatch, stlpips_alex):
    forbid_downloads(monkeypatch)
    net = build_perceptual("stlpips-alex")
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    x = images(0)
    y = images(1).requires_grad_(True)
    assert torch.equal(net(x, x), torch.zeros(2))
    d = net(x, y)
    assert d.shape == (2,) and (d > 0).all()
    d.sum().backward()
    assert y.grad.abs().sum() > 0
    assert build_perceptual("none") is None


def test_stlpips_matches_the_package_implementation(monkeypatch, stlpips_alex):
    # The package's modules import IPython and torchsummary (not dependencies) without using them on this path.
    ipython, torchsummary = types.ModuleType("IPython"), types.ModuleType("torchsummary")
    ipython.embed, torchsummary.summary = (lambda *a, **k: None), (lambda *a, **k: None)
    monkeypatch.setitem(sys.modules, "IPython", ipython)
    monkeypatch.setitem(sys.modules, "torchsummary", torchsummary)
    from stlpips_pytorch import stlpips

    reference = stlpips.LPIPS(net="alex", variant="shift_tolerant", verbose=False).eval()
    x, y = images(0), images(1)
    with torch.no_grad():
        assert torch.allclose(stlpips_alex(x, y), reference(x, y).flatten(), rtol=1e-5, atol=1e-7)
