import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Use the checkout's library even when the package was not installed in editable mode.
sys.path.insert(0, str(ROOT / "tokenizers"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
