"""Check a latent-shard directory end to end; the exit status is 1 when anything is wrong.

    ldtok verify latents/train

Reads every shard once: sizes and sha256 against `index.json`, headers, ids, tensor names, dtypes and row counts,
duplicate sample ids across the set, leftover temporary files and unlisted shards (`ldtok.shards.verify`).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from ldtok.config import check_range
from ldtok.config_cli import add_config_arguments, config_from_args


@dataclass
class VerifyOptions:
    """What `ldtok verify` checks and prints.

    Args:
        shards (`str`): shard directory with an index.json.
        max_problems (`int`, *optional*): print at most N problems, all when left out (the count in the last line is
            always complete).
    """

    shards: str
    max_problems: int | None = None

    def __post_init__(self):
        check_range(self, "max_problems", ge=0)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, VerifyOptions, positional=("shards",))


def run(args: argparse.Namespace) -> int:
    from ldtok.shards import verify

    options = config_from_args(VerifyOptions, args, positional=("shards",))
    report = verify(options.shards)
    shown = report.problems if options.max_problems is None else report.problems[: options.max_problems]
    for problem in shown:
        print(f"problem: {problem}")
    if len(shown) < len(report.problems):
        print(f"... and {len(report.problems) - len(shown)} more problems")
    status = "ok" if report.ok else f"FAILED ({len(report.problems)} problems)"
    print(f"{options.shards}: {status}; {report.num_samples} samples in {report.num_shards} shards, "
          f"{report.num_bytes / 2**20:.1f} MiB")  # fmt: skip
    return 0 if report.ok else 1
