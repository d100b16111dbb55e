"""Throughput and peak memory of ldtok's training step and encoder against an anchor-style baseline (`eval/bench.py`).

Benchmark code and its deliberately naive baseline live here, beside the library: `import ldtok` never loads them.
Files: `_bench_config` (what is measured), `_bench_steps` (both sides' training steps and encoders), `_bench_cases`
(one case run and measured), this one (the comparisons: repeats, rows), `_bench_report` (tables, JSON).

Each comparison runs two *cases* from the same weights, inputs and loss recipe:

- **baseline**, as the anchors' scripts (diffusers' `train_vqgan.py` / `train_autoencoderkl.py`, taming, LDM) do it:
  the plain diffusers model (`AutoencoderKL`, or `VQModel` with its own quantizer) loaded from ldtok's export,
  `lpips.LPIPS` called directly, the same `PatchDiscriminator`; fp32, eager, NCHW, separate forward calls (reals and
  fakes scored in two calls; the generator's GAN term runs the discriminator with live parameters, whose gradients are
  then dropped). Two bugs of those scripts are not copied, so both sides compute the same loss: the perceptual term
  is not under `torch.no_grad()`, and the discriminator's stray generator-step gradients are zeroed before its step.
- **ldtok**: `build_model` + `AutoencoderLoss` + `build_discriminator` through the trainer's own step
  (`ldtok.training.AutoencoderStep`: generator loss, backward, clip, step; discriminator loss, backward, clip, step)
  with the chosen precision (autocast on the autoencoder's and discriminator's forwards, as `Accelerator.prepare`
  does in training: the loss and its perceptual network stay fp32), channels-last and `torch.compile`.

Loss recipe: LDM's (L1 + LPIPS-VGG + KL 1e-6 or the quantizer loss + hinge PatchGAN with adaptive weight 0.5, on from
step 0) in ldtok's per-pixel scaling. Offline there is no ImageNet VGG: both sides use `lpips.LPIPS(net="vgg",
pnet_rand=True)`, a random backbone with the same compute. Inputs: one fixed random batch (no data loading).

Peak memory over the steps (warm-up included, building excluded): on CUDA `torch.cuda.max_memory_allocated` (cases
run in this process); on CPU `ru_maxrss` of a fresh process per case (forked from a server that has imported the
libraries, so every case starts from the same footprint), its high-water mark reset before the steps (Linux).
"""


from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from _bench_cases import Case, CaseResult, run_here, run_in_fresh_process
from _bench_config import BenchConfig, model_config
from _bench_steps import prepare_weights

from ldtok.errors import LdtokError


@dataclass
class Row:
    """One comparison: `name` (e.g. `"train demo-kl"`), ldtok's `setting`, each side's fastest `CaseResult`, the
    images per second of every repeat (`runs`, by side; repeat i of both sides ran back to back) and the ratios."""

    name: str
    setting: str
    baseline: CaseResult
    ldtok: CaseResult
    runs: dict[str, list[float]] = field(default_factory=dict)

    @property
    def speedup(self) -> float:
        return self.ldtok.images_per_s / self.baseline.images_per_s

    @property
    def speedups(self) -> list[float]:
        """ldtok / baseline of each repeat, sorted: min, median and max give the spread."""
        return sorted(a / b for a, b in zip(self.runs["ldtok"], self.runs["baseline"]))

    @property
    def cpu_time_speedup(self) -> float:
        return self.baseline.cpu_seconds / self.ldtok.cpu_seconds

    @property
    def memory_ratio(self) -> float:
        return self.ldtok.peak_memory_mib / self.baseline.peak_memory_mib


def run_benchmark(config: BenchConfig, *, work_dir: str | Path | None = None,
                  log: Callable[[str], None] = lambda message: None) -> list[Row]:
    """Measure every (preset, task): the baseline and ldtok under each setting, `repeats` times, alternating. Weights
    go to `work_dir` (default: a temporary folder)."""
    if config.device == "cuda" and not torch.cuda.is_available():
        raise LdtokError("--device cuda: CUDA is not available")
    run = run_in_fresh_process if config.device == "cpu" else run_here
    rows = []
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        for preset in config.presets:
            weights = prepare_weights(config, model_config(preset, config.resolution), Path(tmp) / preset)
            for task in config.tasks:
                sides = [("baseline", "equal")] + [("ldtok", setting) for setting in config.settings]
                runs: dict[tuple[str, str], list[CaseResult]] = {side: [] for side in sides}
                for repeat in range(config.repeats):
                    for (side, setting), results in runs.items():
                        label = side if side == "baseline" else f"{side} ({setting})"
                        log(f"{task} {preset}: {label} ({repeat + 1}/{config.repeats}) ...")
                        results.append(run(Case(config=config, preset=preset, task=task, side=side,
                                                weights=str(weights), setting=setting)))
                baseline = runs[("baseline", "equal")]
                for setting in config.settings:
                    ldtok = runs[("ldtok", setting)]
                    rows.append(Row(name=f"{task} {preset}", setting=setting,
                                    baseline=max(baseline, key=lambda r: r.images_per_s),
                                    ldtok=max(ldtok, key=lambda r: r.images_per_s),
                                    runs={"baseline": [r.images_per_s for r in baseline],
                                          "ldtok": [r.images_per_s for r in ldtok]}))
    return rows
