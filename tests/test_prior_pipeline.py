"""The exported latent diffusion prior: `save_prior_pipeline` writes a diffusers pipeline directory that
`LatentPriorPipeline.from_pretrained` (and `DiffusionPipeline.from_pretrained` with the documented arguments) loads and
samples from, inverting the latent scaling the prior was trained with. Tiny models, CPU, nothing downloaded."""

import errno
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    UNet2DModel,
)
from PIL import Image

from ldtok.errors import DiskFullError
from ldtok.model_card import read_front_matter
from ldtok.models import KLAutoencoder, tokenizer_sha256
from ldtok.priors.pipeline import LatentPriorPipeline, PriorPipelineError, save_prior_pipeline
from ldtok.shards import LatentShardDataset, ShardWriter, write_manifest

C, LATENT, IMAGE = 4, 8, 16  # latent channels, latent side, image side (the VAE downsamples by 2)


def tiny_vae(**overrides) -> AutoencoderKL:
    kwargs = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                  latent_channels=C, norm_num_groups=8, sample_size=IMAGE)
    return AutoencoderKL(**{**kwargs, **overrides})


def tiny_unet(**overrides) -> UNet2DModel:
    kwargs = dict(sample_size=LATENT, in_channels=C, out_channels=C, block_out_channels=(32, 64), layers_per_block=1,
                  down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    return UNet2DModel(**{**kwargs, **overrides})


@pytest.fixture
def tokenizer_dir(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "tok" / "final"
    KLAutoencoder(vae=tiny_vae()).export(path)  # an ldtok KL export, as `final/` of a VAE run (scaling 0.18215)
    return path


@pytest.fixture
def exported(tmp_path, tokenizer_dir):
    torch.manual_seed(1)
    return save_prior_pipeline(tmp_path / "prior" / "final", unet=tiny_unet(),
                               scheduler=DDPMScheduler(num_train_timesteps=100, clip_sample=False),
                               tokenizer_dir=tokenizer_dir, scaling_factor=0.5, shift_factor=0.25, step=7)


def test_save_writes_a_diffusers_pipeline_directory_with_the_latent_scaling(exported):
    index = json.loads((exported / "model_index.json").read_text())
    assert index["_class_name"] == "LatentPriorPipeline"
    assert index["unet"] == ["diffusers", "UNet2DModel"]
    assert index["scheduler"] == ["diffusers", "DDPMScheduler"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    assert (index["scaling_factor"], index["shift_factor"]) == (0.5, 0.25)  # the shards', not the VAE config's
    vae_config = json.loads((exported / "vae" / "config.json").read_text())
    assert (vae_config["scaling_factor"], vae_config["shift_factor"]) == (0.5, 0.25)
    for sub in ("unet", "vae"):
        assert (exported / sub / "config.json").is_file()
        assert (exported / sub / "diffusion_pytorch_model.safetensors").is_file()
    assert (exported / "scheduler" / "scheduler_config.json").is_file()
    assert "from ldtok.priors.pipeline import LatentPriorPipeline" in (exported / "pipeline.py").read_text()
    card = (exported / "README.md").read_text()
    assert read_front_matter(exported / "README.md")["library_name"] == "diffusers"
    assert "optimizer steps: 7" in card and "(z - 0.25) * 0.5" in card
    assert not [p.name for p in exported.parent.iterdir() if p.name.startswith(".")]  # no temporary left


def test_from_pretrained_samples_images_of_the_tokenizer_size_in_unit_range(exported, tokenizer_dir):
    pipe = LatentPriorPipeline.from_pretrained(exported)
    assert isinstance(pipe.unet, UNet2DModel) and isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.scheduler, DDPMScheduler)
    assert (pipe.config.scaling_factor, pipe.config.shift_factor) == (0.5, 0.25)
    saved_vae = AutoencoderKL.from_pretrained(tokenizer_dir)
    for a, b in zip(pipe.vae.state_dict().values(), saved_vae.state_dict().values()):
        assert torch.equal(a, b)  # the tokenizer's weights, copied
    out = pipe(batch_size=2, num_inference_steps=2, generator=torch.manual_seed(0), output_type="pt")
    images = out.images
    assert images.shape == (2, 3, IMAGE, IMAGE)
    assert images.min() >= 0 and images.max() <= 1 and images.std() > 0
    again = pipe(batch_size=2, num_inference_steps=2, generator=torch.manual_seed(0), output_type="pt").images
    assert torch.equal(images, again)  # the generator makes sampling reproducible


def test_diffusion_pipeline_from_pretrained_loads_it_with_the_documented_call(exported, tmp_path, monkeypatch):
    from diffusers.utils import dynamic_modules_utils

    # diffusers copies pipeline.py into its module cache and imports it from there: keep that cache in tmp_path
    monkeypatch.setattr(dynamic_modules_utils, "HF_MODULES_CACHE", str(tmp_path / "hf_modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    try:
        pipe = DiffusionPipeline.from_pretrained(exported, custom_pipeline="pipeline", trust_remote_code=True)
    finally:
        for name in set(sys.modules) - before:
            if name.startswith("diffusers_modules"):
                del sys.modules[name]
    assert type(pipe) is LatentPriorPipeline  # ldtok's class itself, not a copy
    assert pipe.config.scaling_factor == 0.5
    images = pipe(batch_size=1, num_inference_steps=2, output_type="pt").images
    assert images.shape == (1, 3, IMAGE, IMAGE) and 0 <= images.min() and images.max() <= 1


def constant_unet(values: list[float]) -> UNet2DModel:
    """A UNet that predicts `values` (one per channel) everywhere, whatever its input."""
    unet = tiny_unet()
    with torch.no_grad():
        unet.conv_out.weight.zero_()
        unet.conv_out.bias.copy_(torch.tensor(values))
    return unet


def test_samples_are_unscaled_exactly_as_the_training_latents_were_scaled(tmp_path, tokenizer_dir, monkeypatch):
    # prediction_type "sample" and alpha_prev = 1 at the last step: DDIM's final latents are the UNet's prediction
    values = [0.5, -1.0, 2.0, 0.25]
    scheduler = DDIMScheduler(num_train_timesteps=100, prediction_type="sample", clip_sample=False,
                              set_alpha_to_one=True)
    out = save_prior_pipeline(tmp_path / "final", unet=constant_unet(values), scheduler=scheduler,
                              tokenizer_dir=tokenizer_dir, scaling_factor=0.5, shift_factor=0.25)
    pipe = LatentPriorPipeline.from_pretrained(out)
    expected = torch.tensor(values).view(1, C, 1, 1).expand(3, C, LATENT, LATENT)
    latents = pipe(batch_size=3, num_inference_steps=2, output_type="latent").images
    torch.testing.assert_close(latents, expected)  # the prior's (normalized) space

    seen = []
    decode = pipe.vae.decode

    def capture(z, *args, **kwargs):
        seen.append(z.clone())
        return decode(z, *args, **kwargs)

    monkeypatch.setattr(pipe.vae, "decode", capture)
    images = pipe(batch_size=3, num_inference_steps=2, output_type="pt").images
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], expected / 0.5 + 0.25)  # z = latents / scaling_factor + shift_factor
    torch.testing.assert_close(images, (decode(expected / 0.5 + 0.25).sample / 2 + 0.5).clamp(0, 1))


def test_no_shift_factor_means_zero_and_the_tokenizer_config_scale_is_not_used(tmp_path, tokenizer_dir):
    assert AutoencoderKL.load_config(tokenizer_dir)["scaling_factor"] == pytest.approx(0.18215)
    out = save_prior_pipeline(tmp_path / "final", unet=tiny_unet(), scheduler=DDPMScheduler(num_train_timesteps=10),
                              tokenizer_dir=tokenizer_dir, scaling_factor=1.25)
    pipe = LatentPriorPipeline.from_pretrained(out)
    assert (pipe.config.scaling_factor, pipe.config.shift_factor) == (1.25, 0.0)
    # the copy states the prior's scaling too; the tokenizer itself is left as it was
    assert (pipe.vae.config.scaling_factor, pipe.vae.config.shift_factor) == (1.25, None)
    assert AutoencoderKL.load_config(tokenizer_dir)["scaling_factor"] == pytest.approx(0.18215)
    assert tokenizer_sha256(out / "vae") == tokenizer_sha256(tokenizer_dir)  # the same tokenizer
    z = torch.randn(2, C, LATENT, LATENT)
    torch.testing.assert_close(pipe.unscale_latents(z), z / 1.25)


@pytest.mark.parametrize("convention", ["sd", "sd3"])
def test_unscaling_inverts_what_the_shard_reader_feeds_the_trainer(tmp_path, tokenizer_dir, convention):
    vae = AutoencoderKL.from_pretrained(tokenizer_dir).eval()
    with torch.no_grad():
        posterior = vae.encode(torch.rand(8, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(0)) * 2 - 1
                               ).latent_dist
    shards = tmp_path / "shards"
    with ShardWriter(shards, kind="kl", samples_per_shard=4, metadata={"resolution": str(IMAGE)}) as writer:
        writer.add({"mean": posterior.mean, "logvar": posterior.logvar}, [f"img{i}" for i in range(8)])
    write_manifest(shards, model={"path": str(tokenizer_dir)}, latent_convention=convention)
    dataset = LatentShardDataset(shards, sample_posterior=False)  # what train/prior_diffusion.py trains on
    scale, shift = dataset.source.scaling_factor, dataset.source.shift_factor
    assert (shift != 0) == (convention == "sd3")
    out = save_prior_pipeline(tmp_path / "final", unet=tiny_unet(), scheduler=DDPMScheduler(num_train_timesteps=10),
                              tokenizer_dir=tokenizer_dir, scaling_factor=scale, shift_factor=shift)
    pipe = LatentPriorPipeline.from_pretrained(out)
    normalized = torch.stack([dataset[i]["latents"] for i in range(len(dataset))])  # (8, C, h, w)
    ids = [dataset[i]["id"] for i in range(len(dataset))]
    means = posterior.mean[[int(i[3:]) for i in ids]]
    torch.testing.assert_close(pipe.unscale_latents(normalized), means, rtol=1e-5, atol=1e-5)


def test_output_types(exported):
    pipe = LatentPriorPipeline.from_pretrained(exported)
    pipe.set_progress_bar_config(disable=True)

    def sample(**kwargs):
        return pipe(batch_size=2, num_inference_steps=2, generator=torch.manual_seed(3), **kwargs)

    pt = sample(output_type="pt").images
    arr = sample(output_type="np").images
    assert isinstance(arr, np.ndarray) and arr.shape == (2, IMAGE, IMAGE, 3)
    np.testing.assert_allclose(arr, pt.permute(0, 2, 3, 1).numpy(), atol=1e-6)
    pil = sample().images  # "pil" is the default
    assert len(pil) == 2 and all(isinstance(im, Image.Image) and im.size == (IMAGE, IMAGE) for im in pil)
    assert np.abs(np.asarray(pil[0], dtype=np.float32) / 255 - arr[0]).max() <= 1 / 255 + 1e-6
    assert sample(output_type="latent").images.shape == (2, C, LATENT, LATENT)
    tup = sample(output_type="pt", return_dict=False)
    assert isinstance(tup, tuple) and torch.equal(tup[0], pt)
    with pytest.raises(ValueError, match="output_type"):
        sample(output_type="jpeg")


def test_any_scheduler_samples_and_a_swapped_one_is_saved(exported, tmp_path):
    pipe = LatentPriorPipeline.from_pretrained(exported)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)  # init_noise_sigma > 1, scaled inputs
    images = pipe(batch_size=2, num_inference_steps=3, generator=torch.manual_seed(0), output_type="pt").images
    assert images.shape == (2, 3, IMAGE, IMAGE) and 0 <= images.min() and images.max() <= 1
    pipe.save_pretrained(tmp_path / "euler")
    assert isinstance(LatentPriorPipeline.from_pretrained(tmp_path / "euler").scheduler, EulerDiscreteScheduler)


def test_class_conditional_prior_takes_one_label_per_image(tmp_path, tokenizer_dir):
    out = save_prior_pipeline(tmp_path / "final", unet=tiny_unet(num_class_embeds=3),
                              scheduler=DDPMScheduler(num_train_timesteps=10), tokenizer_dir=tokenizer_dir,
                              scaling_factor=1.0)
    pipe = LatentPriorPipeline.from_pretrained(out)
    a = pipe(batch_size=2, num_inference_steps=2, generator=torch.manual_seed(0), output_type="latent",
             class_labels=[0, 0]).images
    b = pipe(batch_size=2, num_inference_steps=2, generator=torch.manual_seed(0), output_type="latent",
             class_labels=[2, 2]).images
    assert not torch.equal(a, b)  # the label conditions the sample
    assert pipe(batch_size=4, num_inference_steps=1, output_type="pt").images.shape[0] == 4  # labels 0, 1, 2, 0
    with pytest.raises(ValueError, match="class_labels"):
        pipe(batch_size=2, num_inference_steps=1, class_labels=[0, 3])


def test_a_failed_save_leaves_no_half_written_directory_and_keeps_the_previous_one(exported, tokenizer_dir,
                                                                                   monkeypatch):
    before = (exported / "model_index.json").read_text()

    def broken_save(self, directory, **kwargs):  # the VAE is saved after the UNet: a half-written pipeline
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / "config.json").write_text("{")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(AutoencoderKL, "save_pretrained", broken_save)
    unet, scheduler = tiny_unet(), DDPMScheduler(num_train_timesteps=10)
    with pytest.raises(DiskFullError, match="disk full while writing"):
        save_prior_pipeline(exported, unet=unet, scheduler=scheduler, tokenizer_dir=tokenizer_dir, scaling_factor=2.0)
    assert (exported / "model_index.json").read_text() == before  # the previous export, whole
    fresh = exported.parent / "other"
    with pytest.raises(DiskFullError):
        save_prior_pipeline(fresh, unet=unet, scheduler=scheduler, tokenizer_dir=tokenizer_dir, scaling_factor=2.0)
    assert not fresh.exists()
    assert sorted(p.name for p in exported.parent.iterdir()) == ["final"]  # no .tmp / .old directories left

    monkeypatch.undo()
    replace = os.replace

    def replace_fails_on_the_new_export(src, dst):  # the old export is already moved aside when this one fails
        if Path(src).name.startswith(".final.tmp-"):
            raise OSError(errno.EIO, "I/O error")
        return replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_fails_on_the_new_export)
    with pytest.raises(OSError, match="I/O error"):
        save_prior_pipeline(exported, unet=unet, scheduler=scheduler, tokenizer_dir=tokenizer_dir, scaling_factor=2.0)
    assert (exported / "model_index.json").read_text() == before  # moved back
    assert sorted(p.name for p in exported.parent.iterdir()) == ["final"]

    monkeypatch.undo()
    save_prior_pipeline(exported, unet=unet, scheduler=scheduler, tokenizer_dir=tokenizer_dir, scaling_factor=2.0)
    assert json.loads((exported / "model_index.json").read_text())["scaling_factor"] == 2.0  # replaced
    assert sorted(p.name for p in exported.parent.iterdir()) == ["final"]


def test_components_that_do_not_fit_are_one_line_errors(tmp_path, tokenizer_dir):
    scheduler = DDPMScheduler(num_train_timesteps=10)
    with pytest.raises(PriorPipelineError, match="3-channel latents, the VAE's are 4"):
        save_prior_pipeline(tmp_path / "a", unet=tiny_unet(in_channels=3, out_channels=3), scheduler=scheduler,
                            tokenizer_dir=tokenizer_dir, scaling_factor=1.0)
    with pytest.raises(PriorPipelineError, match="no config.json"):
        save_prior_pipeline(tmp_path / "b", unet=tiny_unet(), scheduler=scheduler, tokenizer_dir=tmp_path / "none",
                            scaling_factor=1.0)
    vq = tmp_path / "vq"
    vq.mkdir()
    (vq / "config.json").write_text(json.dumps({"_class_name": "VQModel"}))
    with pytest.raises(PriorPipelineError, match="not an AutoencoderKL"):
        save_prior_pipeline(tmp_path / "c", unet=tiny_unet(), scheduler=scheduler, tokenizer_dir=vq,
                            scaling_factor=1.0)
    with pytest.raises(PriorPipelineError, match="scaling_factor"):
        save_prior_pipeline(tmp_path / "d", unet=tiny_unet(), scheduler=scheduler, tokenizer_dir=tokenizer_dir,
                            scaling_factor=0.0)
    assert not any((tmp_path / n).exists() for n in "abcd")
