"""Throughput and peak memory of ldtok's training step and encoder against an anchor-style fp32 baseline.

    python eval/bench.py --preset demo-kl demo-vq --resolution 64 --batch-size 8 --steps 5 --warmup 1 --repeats 3
    python eval/bench.py --device cuda --preset kl-f8 vq-f16-16k --resolution 256 --batch-size 16 \\
        --settings equal defaults custom --precision bf16 --channels-last --compile --out runs/bench/h100.json

Settings of ldtok's side, one row each: `equal` (fp32 eager, as the baseline: the algorithmic gain alone), `defaults`
(the trainer's defaults: mixed precision auto = bf16 where the device runs it natively, channels-last, fused AdamW),
`custom` (`--precision`, `--channels-last`, `--compile`).

Baseline: the exported diffusers model (`AutoencoderKL` / `VQModel` with its own quantizer), `lpips` and the same
PatchGAN, fp32 and eager, written like diffusers' example training scripts; ldtok: `build_model` + `AutoencoderLoss`
with the chosen options. Both start from the same weights; the perceptual network is LPIPS-VGG with a random backbone
(no download). See `eval/_bench.py` for what exactly is measured. Prints the ratio table, writes JSON.
"""

import sys
from dataclasses import dataclass

from _bench import run_benchmark
from _bench_config import PERCEPTUAL_NOTE, BenchConfig, describe_options, ldtok_options
from _bench_report import format_table, write_report

from ldtok.config_cli import ArgumentParser, add_config_arguments, config_from_args
from ldtok.errors import run_cli

# BenchConfig fields -> flags: `--preset` (repeatable) for `presets`; the optimizer fields keep the trainer's defaults
RENAME = {"presets": "preset"}
EXCLUDE = ("lr", "adam_betas", "max_grad_norm")


@dataclass
class ReportOptions:
    """Where `eval/bench.py` writes its report.

    Args:
        out (`str`, defaults to `"runs/bench/bench.json"`): JSON report path.
    """

    out: str = "runs/bench/bench.json"


def parse(argv: list[str] | None = None) -> tuple[BenchConfig, str]:
    """`(BenchConfig, report path)` of the command line; a bad value is a one-line `ConfigError` naming the flag."""
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    add_config_arguments(parser, BenchConfig, rename=RENAME, exclude=EXCLUDE)
    add_config_arguments(parser, ReportOptions)
    args = parser.parse_args(argv)
    config = config_from_args(BenchConfig, args, rename=RENAME, exclude=EXCLUDE)
    return config, config_from_args(ReportOptions, args).out


def main(argv: list[str] | None = None) -> None:
    config, out = parse(argv)
    settings = ", ".join(f"{name} ({describe_options(ldtok_options(config, name))})" for name in config.settings)
    forwards = "once per optimizer" if config.baseline == "lightning" else "once"
    print(f"ldtok bench: {config.device}, batch {config.batch_size} x {config.resolution}px, {config.steps} steps "
          f"after {config.warmup} warm-up, best of {config.repeats}; ldtok: {settings}; baseline: fp32 eager, "
          f"{config.baseline} (the autoencoder's forward {forwards} per step)", flush=True)
    rows = run_benchmark(config, log=lambda message: print(message, file=sys.stderr, flush=True))
    print(format_table(rows, device=config.device))
    print(PERCEPTUAL_NOTE)
    print("ratios: ldtok / baseline; peak memory: " + (
        "CUDA allocator peak" if config.device == "cuda" else "peak RSS of a fresh process per case, over the steps"))
    write_report(out, config, rows)
    print(f"wrote {out}")


if __name__ == "__main__":
    run_cli(main)  # one-line errors (config errors: exit code 2), no traceback
