"""Training throughput of each quantizer of `eval/compare_quantizers.py`, measured side by side in one process.

    OMP_NUM_THREADS=1 python eval/bench_quantizers.py --resolution 32 --batch-size 8 --steps 5 --repeats 3

Every variant is the comparison's model (the demo-vq architecture and loss, `configs/demo-vq.yaml` with the
variant's `model.quantizer.*` overrides) trained by ldtok's own step (`ldtok.training.AutoencoderStep`, AdamW,
under the trainer's default mixed precision: bf16 where the CPU runs it natively) on the same random batch. The
discriminator is off, as in the comparison's 250 steps (`loss.disc_start` is 300). The variants are timed in turns
(`--repeats` rounds of `--steps` timed steps each, after one warm-up step), so a load change on the machine reaches
every variant alike; the table gives the best round's img/s (min-median-max over rounds) and its ratio to `vq`'s best.
Writes `OUT/throughput.json` when `--out` is given.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ldtok.config import check_range, invalid, load_config
from ldtok.config_cli import ArgumentParser, add_config_arguments, config_from_args
from ldtok.errors import run_cli

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "eval"))
from compare_quantizers import VARIANTS  # noqa: E402  (the comparison's variants, defined once)


@dataclass
class QuantizerBenchOptions:
    """What is timed.

    Args:
        only (`list[str]`, *optional*): variants to time (default: all of compare_quantizers' `VARIANTS`).
        resolution (`int`, defaults to 32): image side.
        batch_size (`int`, defaults to 8): images per step.
        steps (`int`, defaults to 5): timed steps per variant and round.
        repeats (`int`, defaults to 3): rounds (each variant once per round, in turn).
        out (`str`, *optional*): directory for `throughput.json`.
    """

    only: list[str] = field(default_factory=list)
    resolution: int = 32
    batch_size: int = 8
    steps: int = 5
    repeats: int = 3
    out: str | None = None

    def __post_init__(self):
        unknown = [v for v in self.only if v not in VARIANTS]
        if unknown:
            raise invalid("only", f"unknown variant(s) {unknown} (allowed: {', '.join(VARIANTS)})")
        for key in ("resolution", "batch_size", "steps", "repeats"):
            check_range(self, key, gt=0)


class Trainer:
    """One variant's model, loss and optimizer, stepping the trainer's own `AutoencoderStep`."""

    def __init__(self, name: str, opts: QuantizerBenchOptions):
        from ldtok.losses import build_loss
        from ldtok.models import build_model
        from ldtok.performance import resolve_mixed_precision
        from ldtok.training import AutoencoderStep, RunConfig

        config = load_config(RunConfig, ROOT / "configs" / "demo-vq.yaml", [
            f"data.resolution={opts.resolution}", f"model.sample_size={opts.resolution}", *VARIANTS[name]])
        torch.manual_seed(0)
        self.model = build_model(config.model).train()
        self.loss_fn = build_loss(config.loss, max_steps=config.train.max_steps)
        self.step_fn = AutoencoderStep(model=self.model, loss_fn=self.loss_fn)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.train.lr, betas=(0.5, 0.9))
        precision = resolve_mixed_precision(config.train.mixed_precision, torch.device("cpu"))
        self.autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
        self.precision = precision

    def step(self, x: torch.Tensor, step: int) -> None:
        with self.autocast:
            gen = self.step_fn.generator(x, step=step)
        gen.loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def time_round(trainer: Trainer, x: torch.Tensor, *, steps: int, start: int) -> float:
    """Seconds per step over `steps` steps."""
    begin = time.perf_counter()
    for i in range(steps):
        trainer.step(x, start + i)
    return (time.perf_counter() - begin) / steps


def main() -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    opts = config_from_args(QuantizerBenchOptions, add_config_arguments(parser, QuantizerBenchOptions).parse_args())
    names = opts.only or list(VARIANTS)
    x = torch.rand(opts.batch_size, 3, opts.resolution, opts.resolution, generator=torch.Generator().manual_seed(0))
    x = x * 2 - 1
    trainers = {name: Trainer(name, opts) for name in names}
    for trainer in trainers.values():
        trainer.step(x, 0)  # warm-up: k-means init, allocator, kernels
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for r in range(opts.repeats):
        for name in names:  # in turns: load drift reaches every variant alike
            seconds[name].append(time_round(trainers[name], x, steps=opts.steps, start=1 + r * opts.steps))
    rates = {name: sorted(opts.batch_size / s for s in seconds[name]) for name in names}
    base = max(rates["vq"]) if "vq" in rates else None
    precision = next(iter(trainers.values())).precision
    print(f"training img/s, {opts.resolution} px, batch {opts.batch_size}, mixed precision {precision}, discriminator "
          f"off; {opts.repeats} rounds of {opts.steps} steps in turns (torch threads {torch.get_num_threads()})")
    print("| quantizer | img/s (best) | min-median-max | vs vq |")
    print("|---|---:|---:|---:|")
    for name in names:
        rs = rates[name]
        ratio = f"{max(rs) / base:.2f}x" if base else "n/a"
        print(f"| {name} | {max(rs):.1f} | {rs[0]:.1f}-{statistics.median(rs):.1f}-{rs[-1]:.1f} | {ratio} |")
    if opts.out:
        Path(opts.out).mkdir(parents=True, exist_ok=True)
        (Path(opts.out) / "throughput.json").write_text(json.dumps(
            {"options": vars(opts), "precision": precision, "img_per_s": rates}, indent=1))


if __name__ == "__main__":
    run_cli(main)
