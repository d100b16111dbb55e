"""Subcommands of the `ldtok` command line that work with a trained tokenizer.

Each module has `add_arguments(parser)` and `run(args) -> int` and is registered in `ldtok.cli.SUBCOMMANDS`. Flags
that configure something are generated from a config dataclass with `ldtok.config_cli.add_config_arguments` and read
back with `config_from_args` (the same validation as a YAML config): `eval` from `ldtok.evaluation.EvalOptions`,
`push` from `PushOptions`, the shared dataset flags of `data_args` from `ldtok.data.DataConfig`.

- `encode`: a dataset to latent shards (KL posteriors or VQ indices), split across `accelerate launch` processes and
  resumable after a crash;
- `decode`: latent shards back to PNG images;
- `verify`: check a shard directory end to end;
- `eval`: reconstruction metrics, pictures and a self-contained report for a tokenizer;
- `push`: upload an exported tokenizer directory to the Hugging Face Hub.
"""
