"""Train an autoregressive prior (a small GPT) on VQGAN / VQ-VAE-2 code shards, then sample and decode.

    accelerate launch train/prior_transformer.py --config configs/prior-transformer-demo.yaml shards=DIR [key=value ...]

Codes are read in raster order; VQ-VAE-2's top codes come first, then the bottom codes, each level with its own
vocabulary offset (`ldtok.priors.CodeLayout`). At the end `num_samples` sequences are sampled (temperature, top-k),
written to `samples.safetensors` and, with `decode: true`, decoded by the tokenizer (`tokenizer=DIR`, default: the
model the shards were encoded with, found by its path relative to the shards and checked by its weights hash,
loaded by `ldtok.models.load_tokenizer`) into `samples.png`. Also
writes `metrics.jsonl`, `final/transformer` (`ldtok.priors.GPT.from_pretrained`), `final/prior.json` (layout,
tokenizer path) and `summary.json`; logs to the trackers of `train.report_to`. Keys and defaults:
`python train/prior_transformer.py --help`.
"""

import json
import logging

from ldtok.config import ConfigError, parse_args, write_text_atomic
from ldtok.errors import run_cli
from ldtok.models import load_tokenizer, save_pretrained_atomic
from ldtok.priors import CodeLayout, PriorTransformerConfig
from ldtok.priors.task import load_shards_manifest, save_sample_grid, shard_loader, shard_model_dir, train_to_end
from ldtok.priors.transformer_trainer import TransformerPriorTask, decode_samples, save_codes
from ldtok.shards import LatentShardDataset
from ldtok.training import TrainingLoop

logger = logging.getLogger("ldtok.prior_transformer")


def main() -> None:
    config = parse_args(PriorTransformerConfig)
    manifest = load_shards_manifest(
        config.shards, kinds=("vq", "vqvae2"), labels="model.num_classes" if config.model.num_classes else None,
        needs="this script needs VQ codes (train/prior_diffusion.py models KL latents)")
    tokenizer_dir = str(shard_model_dir(config.shards, config.tokenizer, key="tokenizer", manifest=manifest,
                                        what="model directory (or decode=false to only write the sampled codes)")
                        ) if config.decode else None
    # the tokenizer is loaded before training so that a wrong one fails now, not after it
    tokenizer = load_tokenizer(tokenizer_dir) if config.decode else None  # eval mode, on CPU until sampling
    codebook_sizes = tokenizer.codebook_sizes if tokenizer is not None else None
    if tokenizer is not None and (tokenizer.latent_kind != manifest["kind"]
                                  or max(codebook_sizes) != manifest["codebook_size"]):
        raise ConfigError(f"tokenizer: {tokenizer_dir} is a {tokenizer.latent_kind!r} model with codebooks of "
                          f"{codebook_sizes} codes, the shards hold {manifest['kind']!r} codes of codebook_size "
                          f"{manifest['codebook_size']}: not the model that encoded them")
    layout = CodeLayout.from_manifest(manifest, codebook_sizes=codebook_sizes, groups=config.code_groups)
    tc = config.train
    loop = TrainingLoop(tc, output_dir=config.output_dir, config=config, resume=config.resume)
    dataset = LatentShardDataset(config.shards, use_flip=config.use_flip)
    loader = shard_loader(dataset, loop, batch_size=tc.batch_size, num_workers=tc.num_workers)
    task = TransformerPriorTask(loop, config, layout=layout, loader=loader)
    logger.info("%d sequences of %d tokens, vocabulary %d, GPT with %.2fM parameters", len(dataset), layout.length,
                layout.vocab_size, sum(p.numel() for p in task.raw_model.parameters()) / 1e6)
    if not train_to_end(loop, task):
        return
    out = loop.out

    # Export, sample N sequences, decode, grid.
    if loop.is_main:
        save_pretrained_atomic(task.final_model, out / "final" / "transformer")
        write_text_atomic(out / "final" / "prior.json", json.dumps(
            {"tokenizer": tokenizer_dir, "shards": str(config.shards), "kind": manifest["kind"],
             "layout": layout.to_json()}, indent=2))
        codes = task.sample(config.num_samples)
        summary = {"steps": loop.state["step"], "final_loss": task.mean_loss,
                   "codes": str(save_codes(codes, out / "samples.safetensors")),
                   "transformer": str(out / "final" / "transformer")}
        if tokenizer is not None:
            images = decode_samples(tokenizer, codes, device=loop.accelerator.device)  # (N, 3, H, W)
            summary["samples"] = str(save_sample_grid(images, columns=config.grid_columns, path=out / "samples.png"))
        write_text_atomic(out / "summary.json", json.dumps(summary, indent=2))
        print(f"final loss {task.mean_loss:.4f} after {loop.state['step']} steps; "
              f"transformer: {summary['transformer']}")
        print(f"{config.num_samples} samples (temperature {config.temperature}, top_k {config.top_k}): codes "
              f"{summary['codes']}, grid {summary.get('samples', '(decode=false)')}")
    loop.accelerator.end_training()


if __name__ == "__main__":
    run_cli(main)
