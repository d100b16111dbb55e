import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Use the checkout's library even when the package was not installed in editable mode.
sys.path.insert(0, str(ROOT / "tokenizers"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # One of several pytest-xdist workers (`make test`): the workers already fill the cores, so each (and every
    # process it launches) runs torch on one thread instead of oversubscribing them.
    os.environ["OMP_NUM_THREADS"] = "1"


import pytest  # noqa: E402


def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _no_downloads(monkeypatch):
    """A test never downloads: torch.hub's download (torchvision's weights, LPIPS backbones) fails as offline."""
    import urllib.error

    import torch.hub

    def offline(url, *args, **kwargs):
        raise urllib.error.URLError(f"downloads are disabled in tests ({url})")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
