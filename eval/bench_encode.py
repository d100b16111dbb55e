"""`ldtok encode` against the naive per-image encoding loop: images/s, and peak memory at 1x and 10x the data.

    python eval/bench_encode.py --model /tmp/demo-kl/final /tmp/demo-vq/final --resolution 64 \\
        --num-images 256 --scale 10 --out runs/bench/encode.json

One intra-op thread (`--threads`). ldtok: `ldtok.encoding.encode_dataset` in this process, as `ldtok encode
--data-source folder` runs it (batch 32, fp16 storage, one process, no DataLoader workers, shards of min(1024, 1x)
samples); naive, in a fresh process per case: diffusers `from_pretrained`, then per file PIL + torchvision
Resize/CenterCrop, `vae.encode(x[None])` in fp32, latents kept in a list and `torch.save`d at the end. 1x: the first
`--num-images` files of `--source-dir` (default: the 512 training crops of the default dataset); 10x: a folder
linking each of them `--scale` times. Peak memory: `ru_maxrss` (naive: of its process; ldtok: of this one, 1x
first). The defaults (256 and 2560 images at 64 px) take about 1.5 minutes per demo model on 2 CPU cores. See
`eval/_bench_encode.py` for exactly what is measured. Prints the table, writes JSON.
"""

import argparse
import sys

from _bench_encode import EncodeBenchConfig, format_table, run_benchmark, write_report


def parse(argv: list[str] | None = None) -> tuple[EncodeBenchConfig, str, str | None]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", nargs="+", required=True, help="AutoencoderKL / VQModel directories")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--num-images", type=int, default=256, help="images of the 1x dataset")
    parser.add_argument("--scale", type=int, default=10, help="the large dataset is this many times the 1x one")
    parser.add_argument("--batch-size", type=int, default=32, help="ldtok encode --batch-size")
    parser.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"], help="ldtok encode --dtype")
    parser.add_argument("--num-workers", type=int, default=0,
                        help="ldtok encode --num-workers (> 0: the peak is the largest process's, not the sum)")
    parser.add_argument("--samples-per-shard", type=int,
                        help="ldtok encode --samples-per-shard (default: min(1024, --num-images), a multiple of the "
                             "batch: shards larger than the 1x data would make 1x -> 10x measure the shard buffer)")
    parser.add_argument("--threads", type=int, default=1,
                        help="OMP_NUM_THREADS of every measured process; 0: torch's default, one per core (on a "
                             "busy machine those threads fight other processes: see eval/_bench_encode.py)")
    parser.add_argument("--source-dir", help="folder of images (default: the default dataset's training crops)")
    parser.add_argument("--work-dir", help="where the temporary image folders and outputs go (default: $TMPDIR)")
    parser.add_argument("--settings", nargs="+", default=["equal", "defaults"], choices=["equal", "defaults"],
                        help="ldtok encode's options, one row each: equal (fp32, NCHW, as the naive loop) or "
                             "defaults (the command's own: autocast auto, channels-last)")
    parser.add_argument("--out", default="runs/bench/encode.json", help="JSON report path")
    args = parser.parse_args(argv)
    config = EncodeBenchConfig(
        models=args.model, resolution=args.resolution, num_images=args.num_images, scale=args.scale,
        batch_size=args.batch_size, dtype=args.dtype, num_workers=args.num_workers,
        samples_per_shard=args.samples_per_shard, threads=args.threads or None, source_dir=args.source_dir,
        settings=args.settings,
    )
    return config, args.out, args.work_dir


def main(argv: list[str] | None = None) -> None:
    try:
        config, out, work_dir = parse(argv)
    except (AssertionError, FileNotFoundError, ValueError) as e:
        sys.exit(f"bench_encode: {e}")
    N, K = config.num_images, config.scale
    threads = config.threads or "torch's default"
    print(f"ldtok bench_encode: {config.resolution}px, 1x = {N} images, {K}x = {N * K}, threads per process: "
          f"{threads}; ldtok encode: batch {config.batch_size}, {config.dtype} storage, 1 process, "
          f"{config.num_workers} workers, {config.samples_per_shard} samples per shard; naive: batch 1, fp32",
          flush=True)
    try:
        rows = run_benchmark(config, work_dir=work_dir, log=lambda message: print(message, file=sys.stderr, flush=True))
    except ValueError as e:
        sys.exit(f"bench_encode: {e}")
    print(format_table(rows, scale=K))
    print(f"img/s: on the {K}x dataset (ldtok: encode_dataset's own rate; naive: its file loop and save); "
          "e2e: images / wall time of the whole call or process; ratio: over the naive loop")
    print(f"peak memory: ru_maxrss (naive: a fresh process per case; ldtok: this process, 1x first); growth: {K}x "
          "minus 1x")
    write_report(out, config, rows)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
