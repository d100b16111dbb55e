import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Use the checkout's library even when the package was not installed in editable mode.
sys.path.insert(0, str(ROOT / "tokenizers"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _no_downloads(monkeypatch):
    """A test never downloads: torch.hub's download (torchvision's weights, LPIPS backbones) fails as offline."""
    import urllib.error

    import torch.hub

    def offline(url, *args, **kwargs):
        raise urllib.error.URLError(f"downloads are disabled in tests ({url})")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
