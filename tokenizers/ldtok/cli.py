"""The `ldtok` command line: encode datasets into latent shards, decode and verify them, evaluate tokenizers.

Flags that configure something come from dataclasses (`ldtok.config_cli`), as the YAML configs' keys do; a usage
or config error is one line, exit code 2. Every subcommand runs through `ldtok.errors.run_cli`: a failure the user can
fix is one line (`error: ...`) and a non-zero exit status, no traceback; `--debug` (or `LDTOK_DEBUG=1`) shows the
traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass
from typing import Literal

from ldtok.config import check_choice
from ldtok.config_cli import ArgumentParser, add_config_arguments, config_from_args

# name -> (module, help); each module has `add_arguments(parser)` and `run(args) -> int`.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "encode": ("ldtok.commands.encode", "encode a dataset into resumable latent shards"),
    "decode": ("ldtok.commands.decode", "decode latent shards back into PNG images"),
    "verify": ("ldtok.commands.verify", "check a latent-shard directory; exit status 1 if anything is wrong"),
    "eval": ("ldtok.commands.eval", "evaluate a tokenizer's reconstructions and write report.html / report.json"),
    "push": ("ldtok.commands.push", "upload an exported tokenizer directory (with its model card) to the HF Hub"),
}


def _info(args: argparse.Namespace) -> int:
    import torch

    import ldtok
    from ldtok.perceptual import PERCEPTUAL_NETS, build_perceptual

    print(f"ldtok {ldtok.__version__}, torch {torch.__version__}")
    print(f"CUDA devices: {torch.cuda.device_count()}")
    for name in PERCEPTUAL_NETS:
        if name == "none":
            continue
        try:
            build_perceptual(name)
            status = "available"
        except RuntimeError as e:
            status = "unavailable: " + str(e).splitlines()[0]
        print(f"perceptual {name:14s} {status}")
    return 0


# `ldtok keys --config NAME` -> (module, class) of that script's config
CONFIGS: dict[str, tuple[str, str]] = {
    "train": ("ldtok.training", "RunConfig"),  # train/vae.py and train/vq.py
    "prior-diffusion": ("ldtok.priors.config", "PriorDiffusionConfig"),
    "prior-transformer": ("ldtok.priors.config", "PriorTransformerConfig"),
    "eval": ("ldtok.evaluation", "EvalOptions"),  # `ldtok eval`'s flags
}


@dataclass
class KeysOptions:
    """What `ldtok keys` lists.

    Args:
        config (`"train"`, `"prior-diffusion"`, `"prior-transformer"`, `"eval"` or `"all"`, defaults to `"train"`):
            which config: train (vae.py, vq.py), the priors, the options of `ldtok eval`, or all.
    """

    config: Literal["train", "prior-diffusion", "prior-transformer", "eval", "all"] = "train"

    def __post_init__(self):
        check_choice(self, "config", [*CONFIGS, "all"])


def _keys(args: argparse.Namespace) -> int:
    from ldtok.config import describe

    options = config_from_args(KeysOptions, args)
    names = list(CONFIGS) if options.config == "all" else [options.config]
    for name in names:
        module_name, class_name = CONFIGS[name]
        cls = getattr(importlib.import_module(module_name), class_name)
        if len(names) > 1:
            print(f"# {name} ({class_name})")
        print(describe(cls))
    return 0


def main(argv: list[str] | None = None) -> int:
    """The `ldtok` console script.

    Without `argv` (the console script, `python -m ldtok.cli`) the command line runs through `run_cli`: one-line
    errors and an exit status (`SystemExit`). With `argv` (a program or a test) it returns the subcommand's exit
    status and failures raise (`LdtokError` for those a user can fix).
    """
    if argv is None:
        from ldtok.errors import run_cli

        run_cli(lambda: _main(sys.argv[1:]))
    return _main(argv)


def _main(argv: list[str]) -> int:
    parser = ArgumentParser(prog="ldtok", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of a failure (as LDTOK_DEBUG=1 does)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, devices, which perceptual networks work offline").set_defaults(func=_info)
    keys = sub.add_parser("keys", help="every config key with its type, default and description")
    add_config_arguments(keys, KeysOptions)
    keys.set_defaults(func=_keys)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, formatter_class=argparse.RawDescriptionHelpFormatter)
        if name == chosen:  # only the subcommand that runs is imported (encode's and eval's imports take seconds)
            module = importlib.import_module(module_name)
            p.description = module.__doc__
            module.add_arguments(p)
            p.set_defaults(func=module.run)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    main()
