"""eval/ablate.py end to end on one tiny source photo: tiles, tokenizer, encode, eval, prior, gFID, the table."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_ablation_runs_every_stage_and_prints_the_table(tmp_path):
    from skimage import data

    (tmp_path / "photos").mkdir()
    Image.fromarray(data.astronaut()).resize((128, 128)).save(tmp_path / "photos" / "astronaut.png")
    cmd = [sys.executable, "eval/ablate.py", "--out", str(tmp_path / "out"), "--sources", str(tmp_path / "photos"),
           "--only", "+align", "--align-model", "stlpips-alex", "--steps", "2", "--prior-steps", "2", "--samples", "4",
           "--resolution", "32", "--tile-source-side", "128", "--val-every", "4"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tokenizers"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads((tmp_path / "out" / "ablation.json").read_text())
    assert result["data"]["train"] == 12 and result["data"]["val"] == 4  # 16 tiles of 32 px, every 4th held out
    row = result["results"]["+align"]  # one row (every variant runs the same stages); offline: ST-LPIPS AlexNet
    for key in ("psnr", "ssim", "stlpips", "val_loss", "gfid"):
        assert isinstance(row[key], float), (key, row)
    assert "align_model: stlpips-alex" in (tmp_path / "out" / "align" / "config.yaml").read_text()
    assert "align_cos" in (tmp_path / "out" / "align" / "metrics.jsonl").read_text()
    assert "| +align |" in done.stdout and "12 training / 4 validation tiles" in done.stdout
