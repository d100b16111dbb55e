"""Evaluate a trained tokenizer's reconstructions: PSNR, SSIM, LPIPS / ST-LPIPS, rFID, codebook usage or KL per
channel, per-image errors, pictures, and a self-contained report.html (the same as `ldtok eval`).

    python eval/reconstruct.py --model runs/kl/final --out runs/kl/eval
    accelerate launch eval/reconstruct.py --model runs/kl/final --out runs/kl/eval --batch-size 32

Flags: `python eval/reconstruct.py --help`.
"""

import argparse

from ldtok.commands import eval as eval_command
from ldtok.config_cli import ArgumentParser
from ldtok.errors import run_cli


def main() -> int:
    parser = ArgumentParser(description=eval_command.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    eval_command.add_arguments(parser)  # the flags of `ldtok eval`, generated from its options dataclasses
    return eval_command.run(parser.parse_args())


if __name__ == "__main__":
    run_cli(main)  # one-line errors, exit status; --debug / LDTOK_DEBUG=1 for the traceback
