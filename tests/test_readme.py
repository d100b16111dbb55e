"""The README's Python snippets marked `<!-- runnable -->` run as written, on tiny models in a scratch directory."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
RUNNABLE = re.compile(r"<!-- runnable -->\s*\n```python\n(.*?)\n```", re.DOTALL)
TINY = {"block_out_channels": [32, 64], "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 32,
        "sample_size": 32, "mid_block_add_attention": False}


def runnable_snippets() -> list[str]:
    return RUNNABLE.findall((ROOT / "README.md").read_text())


def _params():
    params = []
    for i, code in enumerate(runnable_snippets()):
        marks = [pytest.mark.slow] if "train(" in code else []  # the Python API example trains 2 steps
        params.append(pytest.param(code, id=f"snippet{i}", marks=marks))
    return params


def test_the_readme_has_runnable_snippets_for_the_api_and_the_vq_families():
    snippets = runnable_snippets()
    assert len(snippets) >= 3
    assert any("train(config)" in s for s in snippets)
    assert any("indices.top, indices.bottom" in s for s in snippets)


@pytest.fixture()
def scratch(tmp_path, monkeypatch):
    """A directory with the repository's configs and tiny exported VQGAN / VQ-VAE-2 models where the README has
    the demo runs."""
    from ldtok.models import ModelConfig, build_model
    from ldtok.quantizers import QuantizerConfig

    (tmp_path / "configs").symlink_to(ROOT / "configs")
    quantizer = QuantizerConfig(codebook_size=64, codebook_dim=4, kmeans_init=False)
    for family in ("vq", "vqvae2"):
        torch.manual_seed(0)
        model = build_model(ModelConfig(type="vqgan" if family == "vq" else "vqvae2", **TINY, quantizer=quantizer))
        model.export(tmp_path / "runs" / f"demo-{family}" / "final")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("code", _params())
def test_readme_snippet_runs(code, scratch):
    # a fresh Python session, as a reader's: earlier tests in this process built Accelerators of their own
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    namespace = {"images": images, "__name__": "readme"}
    exec(compile(code, "README.md", "exec"), namespace)
    if "decoded" in namespace:
        assert namespace["decoded"].shape == images.shape
