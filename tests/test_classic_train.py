"""End-to-end runs of the classic families under `accelerate launch --cpu`: the hierarchical KL-VAE trains, resumes
exactly, exports and reloads; the MNIST-style demo trains with the regularizers on and `ldtok eval` draws its latent
space into report.html."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from launch import ROOT, launch, steps_logged
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

DEMO = "configs/demo-mnist-vae.yaml"
VAE2 = ["model.type=vae2", "model.in_channels=1", "data.channels=1", "model.layers_per_block=1",
        "model.latent_channels=4", "model.mid_block_add_attention=false", "loss.reconstruction=bce",
        "loss.free_bits=0.05", "loss.disc_weight=0.1", "loss.kl_schedule=cyclical", "loss.kl_cycles=2",
        "loss.kl_total_steps=8", "train.checkpoint_every=2"]


def logged(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def vae2_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("vae2") / "run"
    launch(f"output_dir={out}", "train.max_steps=4", *VAE2, config=DEMO)
    return out


def test_vae2_trains_with_both_kl_levels_and_a_greyscale_gan(vae2_run):
    terms = {k for entry in logged(vae2_run) for k in entry}
    assert {"rec", "kl", "kl_top", "kl_bottom", "gan", "disc_loss", "val/psnr"} <= terms
    assert sorted(p.name for p in (vae2_run / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]


def test_vae2_export_holds_the_trained_weights_and_samples_from_the_prior(vae2_run):
    from ldtok.data import DataConfig, build_dataset, collate
    from ldtok.models import load_tokenizer

    final = load_tokenizer(vae2_run / "final")
    assert final.kind == "vae2"
    trained = load_file(vae2_run / "checkpoints" / "step_00000004" / "model.safetensors")
    exported = final.state_dict()
    assert trained.keys() == exported.keys()
    for k in trained:
        torch.testing.assert_close(exported[k], trained[k], rtol=0, atol=0, msg=k)
    ckpt = load_tokenizer(vae2_run / "checkpoints" / "step_00000004" / "diffusers")
    data = DataConfig(source="digits", split="validation", resolution=32, channels=1)
    dataset = build_dataset(data, train=False)
    x = collate([dataset[i] for i in range(4)])["pixel_values"]
    torch.testing.assert_close(final(x).sample, ckpt(x).sample, rtol=0, atol=0)
    samples = final.sample_prior(4, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (4, 1, 32, 32) and torch.isfinite(samples).all()


def test_vae2_resume_matches_an_uninterrupted_run(vae2_run, tmp_path):
    resumed = tmp_path / "resumed"
    shutil.copytree(vae2_run, resumed)
    result = launch(f"output_dir={resumed}", "resume=latest", "train.max_steps=6", *VAE2, config=DEMO)
    assert "resumed from" in result.stderr and "step 4" in result.stderr
    assert steps_logged(resumed) == [1, 2, 3, 4, 5, 6]
    straight = tmp_path / "straight"
    launch(f"output_dir={straight}", "train.max_steps=6", *VAE2, config=DEMO)
    a = load_file(resumed / "checkpoints" / "step_00000006" / "model.safetensors")
    b = load_file(straight / "checkpoints" / "step_00000006" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=f"exact resume differs at {k}")


def test_mnist_demo_with_regularizers_then_ldtok_eval_draws_the_latent_space(tmp_path):
    from sklearn.metrics import roc_auc_score

    run = tmp_path / "demo"
    launch(f"output_dir={run}", "train.max_steps=20", "train.report_to=none", "train.log_every=5",
           "loss.sparsity=kl", "loss.sparsity_weight=0.1", "loss.contractive_weight=0.01",
           "loss.contractive_samples=2", config=DEMO, tiny=False)
    terms = {k for entry in logged(run) for k in entry}
    assert {"rec", "kl", "sparsity", "contractive"} <= terms
    labels = tmp_path / "labels.csv"
    # validation rows 0..179; call the first 20 "anomalous" (the numbers are only checked against sklearn here)
    labels.write_text("id,label\n" + "".join(f"validation/{i},{int(i < 20)}\n" for i in range(180)))
    out = tmp_path / "eval"
    cmd = [sys.executable, "-m", "ldtok.cli", "eval", "--model", str(run / "final"), "--out", str(out),
           "--data-source", "digits", "--resolution", "28", "--label-column", "label", "--perceptual", "none",
           "--fid", "off", "--no-progress", "--anomaly-labels", str(labels)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    html = (out / "report.html").read_text()
    for name in ("latent_atlas", "latent_traversals", "latent_arithmetic", "anomaly_scores", "prior_samples"):
        assert (out / f"{name}.png").is_file() and f'alt="{name}"' in html, name
    report = json.loads((out / "report.json").read_text())
    rows = report["per_image"]
    y = [int(int(r["id"].split("/")[1]) < 20) for r in rows]
    assert report["metrics"]["val/anomaly_auroc"] == pytest.approx(roc_auc_score(y, [r["mse"] for r in rows]))
