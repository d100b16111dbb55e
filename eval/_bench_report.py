"""The tables and the JSON report of `eval/bench.py` (rows measured by `eval/_bench.py`)."""

from __future__ import annotations

import json
import statistics
import sys
from dataclasses import asdict
from pathlib import Path

import diffusers
import torch
from _bench import Row
from _bench_config import PERCEPTUAL_NOTE, BenchConfig, ldtok_options

from ldtok.atomic import write_text_atomic


def format_table(rows: list[Row], *, device: str = "cpu") -> str:
    """The ratio table: throughput (best run, and per core on CPU / TFLOP/s and MFU on CUDA) and peak memory of both
    sides; ratios ldtok / baseline, with the min-median-max over the repeats."""
    cuda = device == "cuda"
    extra = ("baseline TFLOP/s", "ldtok TFLOP/s", "ldtok MFU") if cuda else ("baseline img/s/core", "ldtok img/s/core")
    header = ("name", "setting", "baseline img/s", "ldtok img/s", "ratio", "min-med-max", *extra, "baseline peak MiB",
              "ldtok peak MiB", "MiB/img", "mem ratio")
    lines = []
    for r in rows:
        spread = r.speedups
        cells = [r.name, r.setting, f"{r.baseline.images_per_s:.2f}", f"{r.ldtok.images_per_s:.2f}",
                 f"{r.speedup:.2f}x", f"{spread[0]:.2f}-{statistics.median(spread):.2f}-{spread[-1]:.2f}"]
        if cuda:
            mfu = f"{100 * r.ldtok.mfu:.1f}%" if r.ldtok.mfu is not None else "-"
            cells += [f"{r.baseline.tflops:.1f}", f"{r.ldtok.tflops:.1f}", mfu]
        else:
            cells += [f"{r.baseline.images_per_s_per_core:.2f}", f"{r.ldtok.images_per_s_per_core:.2f}"]
        cells += [f"{r.baseline.peak_memory_mib:.0f}", f"{r.ldtok.peak_memory_mib:.0f}",
                  f"{r.ldtok.peak_memory_per_image_mib:.0f}", f"{r.memory_ratio:.2f}x"]
        lines.append(cells)
    widths = [max(len(line[i]) for line in [header, *lines]) for i in range(len(header))]

    def fmt(cells) -> str:
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *map(fmt, lines)])


def environment(config: BenchConfig) -> dict:
    """Versions and hardware, for the JSON report."""
    env = {"python": sys.version.split()[0], "torch": torch.__version__, "diffusers": diffusers.__version__,
           "threads": torch.get_num_threads()}
    if config.device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    return env


def write_report(path: str | Path, config: BenchConfig, rows: list[Row]) -> None:
    """Write the rows, the config and the environment as JSON (atomically)."""
    memory = ("torch.cuda.max_memory_allocated over the steps" if config.device == "cuda" else
              "ru_maxrss of a fresh process per case, high-water mark reset after building (see peak_scope)")
    report = {
        "config": asdict(config),
        "environment": environment(config),
        "notes": [PERCEPTUAL_NOTE, f"peak memory: {memory}", "ratios are ldtok / baseline",
                  f"baseline: diffusers model + lpips + PatchDiscriminator, fp32, eager, {config.baseline}",
                  "inputs: one fixed random batch; images_per_s: each side's fastest of `repeats` runs"],
        "rows": [{"name": r.name, "setting": r.setting, "options": asdict(ldtok_options(config, r.setting)),
                  "baseline": asdict(r.baseline), "ldtok": asdict(r.ldtok), "speedup": r.speedup,
                  "speedup_min_median_max": [r.speedups[0], statistics.median(r.speedups), r.speedups[-1]],
                  "cpu_time_speedup": r.cpu_time_speedup, "memory_ratio": r.memory_ratio,
                  "ldtok_images_per_s_per_core": r.ldtok.images_per_s_per_core,
                  "baseline_images_per_s_per_core": r.baseline.images_per_s_per_core,
                  "ldtok_peak_memory_per_image_mib": r.ldtok.peak_memory_per_image_mib,
                  "runs_images_per_s": r.runs} for r in rows],
    }
    write_text_atomic(path, json.dumps(report, indent=2) + "\n")
