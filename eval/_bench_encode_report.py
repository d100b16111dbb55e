"""The table and the JSON report of `eval/bench_encode.py` (rows from `_bench_encode.run_benchmark`)."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict
from importlib import metadata
from pathlib import Path

from ldtok.atomic import write_text_atomic


def format_table(rows: list, *, scale: int) -> str:
    """img/s and e2e img/s on the `scale`x dataset, the ratio to the naive loop, peak memory at 1x and `scale`x."""
    header = ("name", "img/s", "ratio", "e2e img/s", "peak MiB 1x", f"peak MiB {scale}x", "growth MiB")
    lines = [[r.name, f"{r.large.images_per_s:.1f}", f"{r.ratio:.2f}x", f"{r.large.e2e_images_per_s:.1f}",
              f"{r.small.peak_memory_mib:.0f}", f"{r.large.peak_memory_mib:.0f}", f"{r.growth_mib:+.1f}"]
             for r in rows]
    widths = [max(len(line[i]) for line in [header, *lines]) for i in range(len(header))]

    def fmt(cells) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *map(fmt, lines)])


def environment() -> dict:
    """Versions and the machine, for the JSON report (read without importing torch)."""
    env = {"python": sys.version.split()[0], "cpus": os.cpu_count(), "platform": sys.platform}
    for package in ("torch", "diffusers", "datasets", "torchvision"):
        try:
            env[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            env[package] = None
    if hasattr(os, "getloadavg"):
        env["load_average"] = list(os.getloadavg())  # 1, 5, 15 min, at the end: other work skews the rates
    return env


NOTES = [
    "img/s: on the large dataset; ldtok: encode_dataset's own rate (its encoding loop); naive: the file loop and "
    "the final torch.save; e2e: images / wall time of the whole call (ldtok, in process) or process (naive)",
    "ratio: img/s over the naive loop's",
    "peak memory: ru_maxrss (interpreter and libraries included): naive, of a fresh process per case; ldtok, of this "
    "process when the case ends (1x runs first); growth: large - 1x",
    "ldtok encode --samples-per-shard: min(1024, 1x size) unless set, so that the 1x run already holds a full shard "
    "buffer (ldtok's memory depends on the shard size, not on the dataset size)",
    "naive: diffusers from_pretrained, PIL + torchvision Resize/CenterCrop, vae.encode(x[None]) in fp32 under "
    "no_grad, latents kept in a list, torch.save(torch.cat(...)) at the end",
]


def write_report(path: str | Path, config, rows: list) -> None:
    """Write the rows, the config and the environment as JSON (atomically)."""
    report = {
        "config": asdict(config),
        "environment": environment(),
        "notes": NOTES,
        "rows": [{"name": r.name, "side": r.side, "setting": r.setting, "model": r.model, "ratio": r.ratio,
                  "small": asdict(r.small), "large": asdict(r.large), "growth_mib": r.growth_mib,
                  "growth_bytes_per_image": r.growth_bytes_per_image} for r in rows],
    }
    write_text_atomic(path, json.dumps(report, indent=2) + "\n")


