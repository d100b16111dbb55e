"""Subcommands of the `ldtok` command line that work with a trained tokenizer.

Each module has `add_arguments(parser)` and `run(args) -> int` and is registered in `ldtok.cli.SUBCOMMANDS`:

- `encode`: a dataset to latent shards (KL posteriors or VQ indices), split across `accelerate launch` processes and
  resumable after a crash;
- `decode`: latent shards back to PNG images;
- `verify`: check a shard directory end to end;
- `eval`: reconstruction metrics, pictures and a self-contained report for a tokenizer.
"""
