"""eval/bench_quantizers.py times the comparison's variants in turns and reports ratios to vq's best round."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quantizer_throughput_rows_and_ratios(tmp_path):
    cmd = [sys.executable, "eval/bench_quantizers.py", "--only", "vq", "lfq", "--steps", "1", "--repeats", "2",
           "--out", str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tokenizers"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rates = json.loads((tmp_path / "throughput.json").read_text())["img_per_s"]
    assert set(rates) == {"vq", "lfq"} and all(len(r) == 2 and min(r) > 0 for r in rates.values())
    rows = {line.split("|")[1].strip(): line for line in done.stdout.splitlines() if line.startswith("| ")}
    assert rows["vq"].rstrip().endswith("| 1.00x |")
    assert f"{max(rates['lfq']) / max(rates['vq']):.2f}x" in rows["lfq"]


def test_unknown_variant_is_a_one_line_config_error():
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tokenizers")}
    done = subprocess.run([sys.executable, "eval/bench_quantizers.py", "--only", "pq"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "--only" in done.stderr and "Traceback" not in done.stderr
