"""Check a latent-shard directory end to end; the exit status is 1 when anything is wrong.

    ldtok verify latents/train

Reads every shard once: sizes and sha256 against `index.json`, headers, ids, tensor names, dtypes and row counts,
duplicate sample ids across the set, leftover temporary files and unlisted shards (`ldtok.shards.verify`).
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("shards", help="shard directory with an index.json")


def run(args: argparse.Namespace) -> int:
    from ldtok.shards import verify

    report = verify(args.shards)
    for problem in report.problems:
        print(f"problem: {problem}")
    status = "ok" if report.ok else f"FAILED ({len(report.problems)} problems)"
    print(f"{args.shards}: {status}; {report.num_samples} samples in {report.num_shards} shards, "
          f"{report.num_bytes / 2**20:.1f} MiB")  # fmt: skip
    return 0 if report.ok else 1
