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

import argparse
import sys

from _bench import PERCEPTUAL_NOTE, SETTINGS, BenchConfig, describe_options, ldtok_options, run_benchmark
from _bench_report import format_table, write_report


def parse(argv: list[str] | None = None) -> tuple[BenchConfig, str]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", nargs="+", default=["demo-kl"], help="model presets (KL and VQGAN families)")
    parser.add_argument("--tasks", nargs="+", default=["train", "encode"], choices=["train", "encode"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--settings", nargs="+", default=["equal", "defaults"], choices=list(SETTINGS),
                        help="ldtok's side in each comparison (one row each); the baseline is always fp32 eager")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                        help="the custom setting's autocast dtype (fp16 with a GradScaler)")
    parser.add_argument("--channels-last", action="store_true", help="custom: channels-last models and inputs")
    parser.add_argument("--compile", action="store_true", help="custom: torch.compile the models / encode function")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per case")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    parser.add_argument("--repeats", type=int, default=1,
                        help="measure each side this many times (alternating) and keep its fastest run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--disc-channels", type=int, default=64)
    parser.add_argument("--disc-layers", type=int, default=3)
    parser.add_argument("--out", default="runs/bench/bench.json", help="JSON report path")
    args = parser.parse_args(argv)
    config = BenchConfig(
        presets=args.preset, tasks=args.tasks, device=args.device, settings=args.settings, precision=args.precision,
        channels_last=args.channels_last, compile=args.compile, batch_size=args.batch_size,
        resolution=args.resolution, steps=args.steps, warmup=args.warmup, repeats=args.repeats, seed=args.seed,
        disc_channels=args.disc_channels, disc_layers=args.disc_layers,
    )
    return config, args.out


def main(argv: list[str] | None = None) -> None:
    try:
        config, out = parse(argv)
    except (AssertionError, ValueError) as e:
        sys.exit(f"bench: {e}")
    settings = ", ".join(f"{name} ({describe_options(ldtok_options(config, name))})" for name in config.settings)
    print(f"ldtok bench: {config.device}, batch {config.batch_size} x {config.resolution}px, {config.steps} steps "
          f"after {config.warmup} warm-up, best of {config.repeats}; ldtok: {settings}; baseline: fp32 eager",
          flush=True)
    rows = run_benchmark(config, log=lambda message: print(message, file=sys.stderr, flush=True))
    print(format_table(rows, device=config.device))
    print(PERCEPTUAL_NOTE)
    print("ratios: ldtok / baseline; peak memory: " + (
        "CUDA allocator peak" if config.device == "cuda" else "peak RSS of a fresh process per case, over the steps"))
    write_report(out, config, rows)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
