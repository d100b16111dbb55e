"""`train/prior_diffusion.py` end to end, and what both prior scripts refuse or stop on (wrong shards, divergence),
under `accelerate launch --cpu` on tiny shards encoded here by tiny untrained tokenizers."""

import json
import sys
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DModel
from PIL import Image
from prior_helpers import RES, ROOT, TINY_GPT, TINY_UNET, grid_size, launch, load_script, logged, make_prior_shards
from safetensors.torch import load_file

from ldtok.config import ConfigError
from ldtok.shards import load_manifest


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, Path]:
    """KL, VQ and VQ-VAE-2 shard directories of 16 random 32 px images, each with the model that encoded them."""
    return make_prior_shards(tmp_path_factory.mktemp("priors"))


@pytest.mark.slow
def test_prior_diffusion_trains_samples_decodes_and_exports(shards, tmp_path):
    out = tmp_path / "diffusion"
    result = launch("prior_diffusion.py", "prior-diffusion-demo.yaml", f"shards={shards['kl']}", f"output_dir={out}",
                    *TINY_UNET, "unet.num_classes=4", "train.max_steps=40", "train.log_every=10",
                    f"val_shards={shards['kl']}", "val_timesteps=3")
    entries = logged(out)
    assert [e["step"] for e in entries] == [10, 20, 30, 40]
    losses = [e["loss"] for e in entries]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses
    assert all(e["it_per_s"] > 0 for e in entries)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_loss"] == pytest.approx(losses[-1]) and "final loss" in result.stdout
    # the held-out denoising loss: at fixed timesteps and noise, in the range of the training loss
    assert 0 < summary["val_loss"] < 2 * losses[0] and "validation denoising loss" in result.stdout
    assert Image.open(summary["samples"]).size == grid_size(6, 4)  # 6 decoded 32 px samples, 4 per row
    unet, info = UNet2DModel.from_pretrained(out / "final" / "unet", output_loading_info=True)
    assert all(not v for v in info.values()), info
    latents = torch.randn(2, 4, 16, 16)
    with torch.no_grad():
        assert unet(latents, 10, class_labels=torch.tensor([0, 3])).sample.shape == latents.shape
    prior = json.loads((out / "final" / "prior.json").read_text())
    stats = load_manifest(shards["kl"])["stats"]
    assert prior["scaling_factor"] == pytest.approx(stats["scaling_factor"]) and prior["vae"] == str(
        shards["kl"].parent / "vae")
    # final/ is a diffusers pipeline: loaded whole, it samples images with the run's latent scaling
    from ldtok.priors.pipeline import LatentPriorPipeline

    pipe = LatentPriorPipeline.from_pretrained(out / "final")
    assert pipe.config.scaling_factor == pytest.approx(stats["scaling_factor"])
    images = pipe(batch_size=2, num_inference_steps=2, class_labels=torch.tensor([0, 3]), output_type="pt",
                  generator=torch.manual_seed(0)).images
    assert images.shape == (2, 3, RES, RES) and 0 <= images.min() and images.max() <= 1


def test_scripts_reject_wrong_shards_labels_and_decoders_before_building_anything(shards, tmp_path, monkeypatch):
    cases = [  # (script, overrides, message)
        ("prior_transformer", [f"shards={shards['kl']}"], "needs VQ codes"),
        ("prior_diffusion", [f"shards={shards['vq']}"], "needs KL latents"),
        ("prior_transformer", [f"shards={shards['vq']}", "model.num_classes=3"], "stores no labels"),
        ("prior_diffusion", [f"shards={shards['kl']}", f"vae={tmp_path}"], "no diffusers AutoencoderKL directory"),
        ("prior_diffusion", [f"shards={shards['kl']}", f"val_shards={shards['vq']}"], "val_shards must be KL latents"),
        ("prior_transformer", [f"shards={tmp_path}"], "index.json"),
        ("prior_transformer", [f"shards={shards['vq']}", "train.bogus=1"], "unknown config key 'train.bogus'"),
        ("prior_transformer", [f"shards={shards['vq']}", f"tokenizer={shards['vqvae2'].parent / 'vqvae2'}"],
         "not the model that encoded them"),
    ]
    for script, overrides, message in cases:
        config = ROOT / "configs" / ("prior-transformer-demo.yaml" if script == "prior_transformer"
                                     else "prior-diffusion-demo.yaml")
        monkeypatch.setattr(sys, "argv", [script, "--config", str(config), f"output_dir={tmp_path / 'run'}",
                                          *overrides])
        with pytest.raises(ConfigError, match=message):  # run_cli: one line, exit code 2
            load_script(script).main()
    assert not (tmp_path / "run").exists()  # nothing was built or written


@pytest.mark.slow
@pytest.mark.parametrize("script", ["prior_diffusion", "prior_transformer"])
def test_a_diverging_prior_stops_naming_the_step_and_writes_no_non_finite_weights(shards, tmp_path, script):
    out = tmp_path / script
    if script == "prior_diffusion":
        args = ["prior_diffusion.py", "prior-diffusion-demo.yaml", f"shards={shards['kl']}", *TINY_UNET]
    else:
        args = ["prior_transformer.py", "prior-transformer-demo.yaml", f"shards={shards['vq']}", *TINY_GPT]
    result = launch(*args, f"output_dir={out}", "train.lr=1e9", "train.max_steps=30", "train.checkpoint_every=1",
                    "train.max_nonfinite_steps=2", check=False)
    assert result.returncode != 0
    assert "error: training diverged: 2 optimizer steps in a row had non-finite values" in result.stderr, (
        result.stderr[-3000:])
    assert "last good checkpoint: " + str(out / "checkpoints") in result.stderr
    assert not [line for line in result.stderr.splitlines() if line.strip().startswith('File "')
            and any(f'"{ROOT / part}' in line for part in ("tokenizers", "train"))]  # our code, not the in-repo .venv
    for checkpoint in (out / "checkpoints").iterdir():
        assert all(torch.isfinite(t).all() for t in load_file(checkpoint / "model.safetensors").values())
    assert not (out / "final").exists()
