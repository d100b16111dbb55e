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

import sys
from dataclasses import dataclass

from _bench_encode import EncodeBenchConfig, format_table, run_benchmark, write_report

from ldtok.config_cli import ArgumentParser, add_config_arguments, config_from_args
from ldtok.errors import run_cli

RENAME = {"models": "model"}  # `--model DIR [DIR ...]`
HELP = {"threads": "OMP_NUM_THREADS of every measured process; 0: torch's default, one per core (on a busy machine "
                   "those threads fight other processes: see eval/_bench_encode.py)"}


@dataclass
class ScriptOptions:
    """Where `eval/bench_encode.py` works and writes.

    Args:
        work_dir (`str`, *optional*): where the temporary image folders and outputs go ($TMPDIR when left out).
        out (`str`, defaults to `"runs/bench/encode.json"`): JSON report path.
    """

    work_dir: str | None = None
    out: str = "runs/bench/encode.json"


def parse(argv: list[str] | None = None) -> tuple[EncodeBenchConfig, str, str | None]:
    """`(EncodeBenchConfig, report path, work dir)` of the command line; a bad value is a one-line `ConfigError`
    naming the flag."""
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    add_config_arguments(parser, EncodeBenchConfig, rename=RENAME, help=HELP)
    add_config_arguments(parser, ScriptOptions)
    args = parser.parse_args(argv)
    config = config_from_args(EncodeBenchConfig, args, rename=RENAME, overrides={"threads": args.threads or None})
    options = config_from_args(ScriptOptions, args)
    return config, options.out, options.work_dir


def main(argv: list[str] | None = None) -> None:
    try:
        config, out, work_dir = parse(argv)
    except FileNotFoundError as e:  # a --model without a config.json
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
    run_cli(main)  # one-line errors (config errors: exit code 2), no traceback
