"""Running the training scripts under `accelerate launch --cpu` from tests."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--dynamo_backend", "no"]
# A tiny model on 32 px crops; the GAN starts at step 2 so every loss term runs within 4 steps.
TINY = ["model.block_out_channels=[32, 64]", "model.norm_num_groups=32", "model.sample_size=32",
        "data.resolution=32", "train.batch_size=4", "train.val_images=4", "train.grid_images=2",
        "train.log_every=1", "loss.disc_start=2", "loss.disc_channels=16", "loss.disc_layers=2",
        "train.warmup_steps=0", "train.report_to=none"]

def launch(*overrides, processes: int = 1, script: str = "train/vae.py", config: str = "configs/demo-kl.yaml",
           check: bool = True, tiny: bool = True, precision: str = "no") -> subprocess.CompletedProcess:
    # `--cpu --num_processes 2` alone starts one process; `--multi_gpu` with ACCELERATE_USE_CPU starts gloo ranks.
    multi = ["--multi_gpu", "--main_process_port", str(free_port())] if processes > 1 else ["--cpu"]
    cmd = [*ACCELERATE, "--mixed_precision", precision, *multi, "--num_processes", str(processes), str(ROOT / script),
           "--config", str(ROOT / config), *(TINY if tiny else []), *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    if check:
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-6000:]
    return result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def steps_logged(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]
