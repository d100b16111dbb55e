"""Train an autoregressive prior (a small GPT) on VQGAN / VQ-VAE-2 code shards, then sample and decode.

    accelerate launch train/prior_transformer.py --config configs/prior-transformer-demo.yaml shards=DIR [key=value ...]

Codes are read in raster order; VQ-VAE-2's top codes come first, then the bottom codes, each level with its own
vocabulary offset (`ldtok.priors.CodeLayout`). At the end `num_samples` sequences are sampled (temperature, top-k),
written to `samples.safetensors` and, with `decode: true`, decoded by the tokenizer (`tokenizer=DIR`, default: the
model the shards were encoded with, loaded by `ldtok.models.load_tokenizer`) into `samples.png`. Also
writes `metrics.jsonl`, `final/transformer` (`ldtok.priors.GPT.from_pretrained`), `final/prior.json` (layout,
tokenizer path) and `summary.json`. Keys and defaults: `python train/prior_transformer.py --help`.
"""

import json
import logging
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from safetensors.torch import save, save_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ldtok.checkpoint import (
    checkpoint_dir,
    list_checkpoints,
    load_tensors,
    read_trainer_state,
    remove_leftovers,
    resolve_resume,
    save_checkpoint,
)
from ldtok.config import ConfigError, parse_args, save_config, write_text_atomic
from ldtok.ema import ModelEMA
from ldtok.errors import run_cli
from ldtok.guard import NonFiniteGuard
from ldtok.images import make_grid, save_image_atomic
from ldtok.models import load_tokenizer, save_pretrained_atomic
from ldtok.priors import GPT, CodeLayout, PriorTransformerConfig
from ldtok.run_checks import check_batch_fills
from ldtok.shards import LatentShardDataset, load_manifest
from ldtok.shards.manifest import atomic_write_bytes
from ldtok.training import learning_rate

logger = logging.getLogger("ldtok.prior_transformer")


def decode_codes(tokenizer, codes: dict[str, torch.Tensor]) -> torch.Tensor:
    """Images `(B, 3, H, W)` in [-1, 1] of code maps `{field: (B, h, w) or (B, S, h, w)}` (a `load_tokenizer`
    model)."""
    if tokenizer.kind == "vq":
        return tokenizer.decode_indices(codes["indices"])
    return tokenizer.decode_indices(codes["indices_top"], codes["indices_bottom"])


def main() -> None:
    try:
        config = parse_args(PriorTransformerConfig)
    except (ConfigError, AssertionError) as e:
        sys.exit(f"config error: {e}")
    try:
        manifest = load_manifest(config.shards)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"config error: shards: {e}")
    if manifest["kind"] not in ("vq", "vqvae2"):
        sys.exit(f"config error: shards: {config.shards} holds kind={manifest['kind']!r} shards; this script needs VQ "
                 "codes (train/prior_diffusion.py models KL latents)")
    tokenizer_dir = config.tokenizer or manifest["model"].get("path")
    if config.decode and (not tokenizer_dir or not (Path(tokenizer_dir) / "config.json").is_file()):
        sys.exit(f"config error: tokenizer: no model directory at {tokenizer_dir!r} (set tokenizer=DIR, or "
                 "decode=false to only write the sampled codes)")
    conditional = config.model.num_classes is not None
    if conditional and "label" not in manifest["fields"]:
        sys.exit(f"config error: model.num_classes is set but {config.shards} stores no labels")
    tc, out = config.train, Path(config.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=tc.gradient_accumulation_steps,
        mixed_precision=tc.mixed_precision,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # its per-file "saved ..." lines drown ours
    set_seed(tc.seed)

    # Data and layout; the tokenizer is loaded before training so that a wrong one fails now, not after it.
    tokenizer = codebook_sizes = None
    if config.decode:
        tokenizer = load_tokenizer(tokenizer_dir)  # eval mode, on CPU until sampling
        codebook_sizes = tokenizer.codebook_sizes
        if tokenizer.kind != manifest["kind"] or max(codebook_sizes) != manifest["codebook_size"]:
            sys.exit(f"config error: tokenizer: {tokenizer_dir} is a {tokenizer.kind!r} model with codebooks of "
                     f"{codebook_sizes} codes, the shards hold {manifest['kind']!r} codes of codebook_size "
                     f"{manifest['codebook_size']}: not the model that encoded them")
    try:
        layout = CodeLayout.from_manifest(manifest, codebook_sizes=codebook_sizes, groups=config.code_groups)
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    dataset = LatentShardDataset(config.shards, use_flip=config.use_flip)
    check_batch_fills(num_images=len(dataset), batch_size=tc.batch_size, num_processes=accelerator.num_processes,
                      what="samples")
    loader = DataLoader(dataset, batch_size=tc.batch_size, shuffle=True, drop_last=True, num_workers=tc.num_workers)

    model = GPT(vocab_size=layout.vocab_size, block_size=layout.length, num_layers=config.model.num_layers,
                num_heads=config.model.num_heads, hidden_size=config.model.hidden_size, dropout=config.model.dropout,
                num_classes=config.model.num_classes or 0)
    optimizer = torch.optim.AdamW(model.parameter_groups(tc.weight_decay), lr=tc.lr, betas=tuple(tc.adam_betas))
    ema = ModelEMA(model, decay=tc.ema_decay) if tc.ema_decay else None
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    set_seed(tc.seed, device_specific=True)  # same init on every rank (above); from here, per-rank noise
    raw_model = accelerator.unwrap_model(model)
    if ema is not None:
        ema.to(accelerator.device)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        remove_leftovers(out)  # of an interrupted checkpoint write, rotation or final export
        save_config(config, out / "config.yaml")
        logger.info("%d sequences of %d tokens, vocabulary %d, GPT with %.2fM parameters", len(dataset),
                    layout.length, layout.vocab_size, sum(p.numel() for p in raw_model.parameters()) / 1e6)

    accelerator.wait_for_everyone()
    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "nonfinite_steps": 0}
    resume_from = resolve_resume(config.resume, out)  # checksums verified
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        state.update(read_trainer_state(resume_from))
        if ema is not None:  # loaded on the CPU, copied to the device by load_state_dict (`cpu:0` is no device for it)
            ema.load_state_dict(load_tensors(resume_from / "ema.safetensors"))
        logger.info("resumed from %s at step %d", resume_from, state["step"])
    if resume_from is not None and state["step"] >= tc.max_steps and (out / "summary.json").is_file():
        # a finished run rerun (summary.json is written last, after the export): nothing to do, nothing rewritten
        if accelerator.is_main_process:
            print(f"{out}: the run already finished at step {state['step']} (train.max_steps={tc.max_steps}); "
                  f"nothing to do; final model: {out / 'final'}")
        accelerator.end_training()
        return
    guard = NonFiniteGuard(accelerator=accelerator, max_consecutive=tc.max_nonfinite_steps,
                           last_good=lambda: (list_checkpoints(out) or [None])[-1])
    guard.total = state["nonfinite_steps"]

    def weights() -> dict[str, torch.nn.Module]:
        return {"transformer": raw_model, **({"ema": ema.model} if ema is not None else {})}

    def write_checkpoint_extra(path: Path) -> None:
        save_pretrained_atomic(ema.model if ema is not None else raw_model, path / "transformer")
        if ema is not None:
            save_file({k: v.contiguous().cpu() for k, v in ema.state_dict().items()}, path / "ema.safetensors")

    # Train: next-token cross-entropy over the whole sequence.
    progress = tqdm(total=tc.max_steps, initial=state["step"], disable=not accelerator.is_main_process,
                    desc="prior-transformer", dynamic_ncols=True)
    window: list[torch.Tensor] = []
    mean_loss, window_start = float("nan"), time.perf_counter()
    model.train()
    while state["step"] < tc.max_steps:
        loader.set_epoch(state["epoch"])
        batches = accelerator.skip_first_batches(loader, state["batch_in_epoch"]) if state["batch_in_epoch"] else loader
        for batch in batches:
            state["batch_in_epoch"] += 1
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(state["step"], base=tc.lr, warmup_steps=tc.warmup_steps,
                                            max_steps=tc.max_steps, schedule=tc.lr_schedule)
            tokens = layout.pack(batch)  # (B, L)
            with accelerator.accumulate(model):
                logits = model(tokens[:, :-1], class_labels=batch["label"] if conditional else None).logits  # (B, L, V)
                loss = F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten())
                # skips the step (on every rank) when the loss or gradient norm is non-finite
                guard.step(loss, optimizer, model.parameters(), max_grad_norm=tc.max_grad_norm)
            window.append(loss.detach())
            if not accelerator.sync_gradients:
                continue
            if guard.end_step(step=state["step"] + 1, terms={"loss": loss.detach()}):
                state["nonfinite_steps"] = guard.total
                continue
            state["step"] += 1
            if ema is not None:
                ema.update(raw_model)
            progress.update(1)
            done = state["step"] >= tc.max_steps
            if state["step"] % tc.log_every == 0 or done:
                finite = [w for w in window if torch.isfinite(w)] or window  # a skipped step's loss is not news
                mean_loss = accelerator.reduce(torch.stack(finite).mean(), "mean").item()
                it_per_s = len(window) / tc.gradient_accumulation_steps / (time.perf_counter() - window_start)
                window.clear()
                window_start = time.perf_counter()
                progress.set_postfix(loss=f"{mean_loss:.4f}")
                if accelerator.is_main_process:
                    with open(out / "metrics.jsonl", "a") as fh:
                        fh.write(json.dumps({"step": state["step"], "loss": mean_loss, "it_per_s": it_per_s,
                                             "lr": optimizer.param_groups[0]["lr"]}) + "\n")
            if tc.checkpoint_every and (state["step"] % tc.checkpoint_every == 0 or done):
                guard.check_weights(weights(), writing=checkpoint_dir(out) / f"step_{state['step']:08d}")
                save_checkpoint(accelerator, out, step=state["step"], trainer_state=state,
                                write_extra=write_checkpoint_extra, keep=tc.keep_checkpoints)
            if done:
                break
        else:
            state["epoch"] += 1
            state["batch_in_epoch"] = 0
    progress.close()
    accelerator.wait_for_everyone()
    guard.check_weights(weights(), writing=out / "final")

    # Export, sample N sequences, decode, grid.
    if accelerator.is_main_process:
        final_model = (ema.model if ema is not None else raw_model).eval()
        save_pretrained_atomic(final_model, out / "final" / "transformer")
        write_text_atomic(out / "final" / "prior.json", json.dumps(
            {"tokenizer": tokenizer_dir, "shards": str(config.shards), "kind": manifest["kind"],
             "layout": layout.to_json()}, indent=2))
        N, device = config.num_samples, accelerator.device
        generator = torch.Generator(device).manual_seed(tc.seed)
        labels = torch.arange(N, device=device) % config.model.num_classes if conditional else None
        with accelerator.autocast():
            tokens = final_model.generate(num_samples=N, length=layout.length, class_labels=labels,
                                          temperature=config.temperature, top_k=config.top_k,
                                          allowed_tokens=layout.allowed_tokens(), generator=generator)
        codes = layout.unpack(tokens)  # {field: (N, h, w)}
        tensors = {name: c.cpu().contiguous() for name, c in codes.items()}
        if labels is not None:
            tensors["label"] = labels.cpu()
        atomic_write_bytes(out / "samples.safetensors", save(tensors))
        summary = {"steps": state["step"], "final_loss": mean_loss, "codes": str(out / "samples.safetensors"),
                   "transformer": str(out / "final" / "transformer")}
        if tokenizer is not None:
            tokenizer.to(device)
            with torch.no_grad():
                images = torch.cat([decode_codes(tokenizer, {k: v[i : i + 16] for k, v in codes.items()}).float()
                                    for i in range(0, N, 16)])  # (N, 3, H, W)
            cols = min(config.grid_columns, N)
            pad = (-N) % cols  # white tiles complete the last row
            images = torch.cat([images, images.new_ones(pad, *images.shape[1:])])
            summary["samples"] = str(save_image_atomic(make_grid(list(images.split(cols))), out / "samples.png"))
        write_text_atomic(out / "summary.json", json.dumps(summary, indent=2))
        print(f"final loss {mean_loss:.4f} after {state['step']} steps; transformer: {summary['transformer']}")
        print(f"{N} samples (temperature {config.temperature}, top_k {config.top_k}): codes {summary['codes']}, "
              f"grid {summary.get('samples', '(decode=false)')}")
    accelerator.end_training()


if __name__ == "__main__":
    run_cli(main)
