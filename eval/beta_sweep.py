"""The beta-VAE trade-off on the digits demo: train `configs/demo-mnist-vae.yaml` at several KL weights beta and
measure reconstruction, KL and how factorized / informative the latent is.

    OMP_NUM_THREADS=1 python eval/beta_sweep.py --out runs/beta-sweep [--betas 0.5 1 4] [--latent 8] [--steps 1500]

Each beta trains with `train/vae.py` (one process, CPU) into `OUT/beta_<b>/`, then is evaluated on the digits
validation split (180 images) with `ldtok.evaluation.evaluate_tokenizer` and the report written to
`OUT/beta_<b>/eval/` (reconstructions, traversals, prior samples, ...). Printed per beta (and written to
`OUT/results.json`):

- `bce`: Bernoulli NLL of the validation images in nats per image (sum over the 784 pixels, posterior mean decoded);
- `psnr`: PSNR (dB) of the decoded Bernoulli mean;
- `kl`: KL(q(z|x) || N(0, I)) in nats per image;
- `active`: latent channels with KL > 0.1 nats (Burda et al.'s active units, by KL);
- `mean_abs_corr`: mean |correlation| between the posterior means of the active channels over the validation set
  (lower: a more factorized aggregate posterior, the beta-VAE disentanglement pressure);
- `probe_acc`: accuracy of a logistic-regression probe from the posterior means to the digit label, fit on the
  training split and scored on validation (how much class information the code keeps).

Ratios are against beta = 1 (the plain VAE), measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ldtok.config import check_range, invalid
from ldtok.config_cli import ArgumentParser, add_config_arguments, config_from_args
from ldtok.errors import run_cli

ROOT = Path(__file__).resolve().parents[1]


def train_one(beta: float, out: Path, *, latent: int, steps: int) -> float:
    """Train at `beta` into `out` (skipped when `out/final` exists); returns the wall time in seconds."""
    if (out / "final").is_dir():
        return float("nan")
    start = time.perf_counter()
    cmd = [sys.executable, str(ROOT / "train" / "vae.py"), "--config", str(ROOT / "configs" / "demo-mnist-vae.yaml"),
           f"output_dir={out}", f"loss.kl_weight={beta}", f"model.latent_channels={latent}",
           f"train.max_steps={steps}", f"train.checkpoint_every={steps}", f"train.image_every={steps}",
           "train.report_to=none"]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


@torch.no_grad()
def codes_and_labels(model, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, torch.Tensor]:
    """Posterior means `(N, L)`, labels `(N,)`, Bernoulli NLL per image `(N,)` and the images of a digits split."""
    from ldtok.data import DataConfig, build_dataset, collate
    from ldtok.regularizers import bernoulli_nll

    data = DataConfig(source="digits", split=split, resolution=28, channels=1, label_column="label")
    dataset = build_dataset(data, train=False)
    batch = collate([dataset[i] for i in range(len(dataset))])
    x = batch["pixel_values"]
    mean = model.encode_posterior(x).mean  # (N, L, 1, 1)
    logits = model.vae.decode_logits(mean)
    nll = torch.stack([bernoulli_nll(logits[i : i + 1], x[i : i + 1]) * x[0].numel() for i in range(len(x))])
    return mean.flatten(1).numpy(), batch["label"].numpy(), nll.numpy(), x


def measure(run: Path) -> dict:
    from accelerate import Accelerator
    from sklearn.linear_model import LogisticRegression

    from ldtok.data import DataConfig, build_dataset
    from ldtok.evaluation import EvalOptions, evaluate_tokenizer
    from ldtok.evaluation.report import write_report
    from ldtok.models import load_tokenizer

    model = load_tokenizer(run / "final")
    val = DataConfig(source="digits", split="validation", resolution=28, channels=1, label_column="label")
    result = evaluate_tokenizer(model, build_dataset(val, train=False), accelerator=Accelerator(cpu=True),
                                options=EvalOptions(perceptual=[], fid="off", progress=False))
    write_report(result, run / "eval", model={"path": str(run / "final"), "kind": result.kind}, dataset=vars(val))
    kl = np.array(result.kl_per_channel)
    active = np.flatnonzero(kl > 0.1)
    z_val, y_val, nll, _ = codes_and_labels(model, "validation")
    z_train, y_train, _, _ = codes_and_labels(model, "train")
    corr = np.corrcoef(z_val[:, active], rowvar=False) if len(active) > 1 else np.ones((1, 1))
    off = np.abs(corr[~np.eye(len(corr), dtype=bool)])
    probe = LogisticRegression(max_iter=2000).fit(z_train, y_train)
    return {"bce": float(nll.mean()), "psnr": result.value("val/psnr"), "kl": float(kl.sum()),
            "active": int(len(active)), "mean_abs_corr": float(off.mean()) if off.size else 0.0,
            "probe_acc": float(probe.score(z_val, y_val)), "eval": str(run / "eval")}


@dataclass
class SweepOptions:
    """What the sweep trains.

    Args:
        out (`str`, defaults to `"runs/beta-sweep"`): one run per beta and `results.json`.
        betas (`list[float]`, defaults to `[0.5, 1.0, 4.0]`): the KL weights to train.
        latent (`int`, defaults to 8): latent size (8: room for beta to switch units off).
        steps (`int`, defaults to 1500): training steps per run.
    """

    out: str = "runs/beta-sweep"
    betas: list[float] = field(default_factory=lambda: [0.5, 1.0, 4.0])
    latent: int = 8
    steps: int = 1500

    def __post_init__(self):
        if not self.betas or min(self.betas) < 0:
            raise invalid("betas", f"needs at least one beta, each >= 0, got {self.betas}")
        check_range(self, "latent", gt=0)
        check_range(self, "steps", gt=0)


def main() -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    args = config_from_args(SweepOptions, add_config_arguments(parser, SweepOptions).parse_args())
    out = Path(args.out)
    results = {}
    for beta in args.betas:
        run = out / f"beta_{beta:g}"
        seconds = train_one(beta, run, latent=args.latent, steps=args.steps)
        results[beta] = {"train_s": seconds, **measure(run)}
    base = results.get(1.0)
    print(f"digits validation (180 images), latent {args.latent}, {args.steps} steps, 2-core CPU, OMP_NUM_THREADS=1")
    print("| beta | BCE (nats/img) | PSNR (dB) | KL (nats/img) | active units | mean abs corr | probe acc | "
          "KL / KL(beta=1) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for beta, r in results.items():
        ratio = f"{r['kl'] / base['kl']:.2f}" if base else "n/a"
        print(f"| {beta:g} | {r['bce']:.1f} | {r['psnr']:.2f} | {r['kl']:.2f} | {r['active']} | "
              f"{r['mean_abs_corr']:.3f} | {r['probe_acc']:.3f} | {ratio} |")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({f"{b:g}": r for b, r in results.items()}, indent=2))


if __name__ == "__main__":
    run_cli(main)
