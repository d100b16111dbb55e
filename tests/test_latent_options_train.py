"""Issue 13's options end to end: decoder-only fine-tuning of a saved diffusers `AutoencoderKL` keeps its latent space
bit-identical, resume is exact with every option on, 2 ranks stay identical, the alignment model stays out of
checkpoints and exports."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from latent_helpers import encode, image_folder, shard_tensors, tiny_kl
from launch import launch, steps_logged
from safetensors.torch import load_file

from ldtok.shaping.trainable import is_decoder_parameter

CONSTANT = "train.lr_schedule=constant"
ALL_ON = ["loss.equivariance_weight=0.5", "train.latent_noise=0.2", "train.latent_noise_schedule=linear_decay",
          "train.mask_ratio=0.25", "train.mask_ratio_schedule=cosine_decay", "loss.align_weight=0.5"]


@pytest.fixture(scope="module")
def dino_dir(tmp_path_factory) -> Path:
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                          image_size=32, patch_size=4)
    path = tmp_path_factory.mktemp("dino") / "dino"
    Dinov2Model(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return image_folder(tmp_path_factory.mktemp("images"))


# ------------------------------------------------------------------------------------------------ item 3
@pytest.mark.slow
def test_decoder_only_finetuning_of_a_saved_autoencoderkl_keeps_its_latent_space(folder, tmp_path):
    init = tiny_kl(tmp_path / "init")
    out = tmp_path / "run"
    launch(f"output_dir={out}", f"model.init_from={init}", "train.trainable=decoder", "train.max_steps=3",
           "train.checkpoint_every=3", "train.latent_noise=0.1")
    before = load_file(init / "diffusion_pytorch_model.safetensors")
    after = load_file(out / "final" / "diffusion_pytorch_model.safetensors")
    assert before.keys() == after.keys()
    encoder_keys = [k for k in before if not is_decoder_parameter(k)]
    assert encoder_keys and all(torch.equal(before[k], after[k]) for k in encoder_keys), "encoder weights moved"
    assert any(not torch.equal(before[k], after[k]) for k in before if is_decoder_parameter(k)), "decoder unchanged"
    a, b = shard_tensors(encode(init, tmp_path / "a", folder).out_dir), shard_tensors(
        encode(out / "final", tmp_path / "b", folder).out_dir)
    floats = [k for k in a if a[k].is_floating_point()]
    assert floats and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in floats), "ldtok encode's latents changed"


# ------------------------------------------------------------------------------------------------ resume, ranks
RESUME_CASES = {
    "kl": ("train/vae.py", "configs/demo-kl.yaml", []),
    "vqvae2-decoder": ("train/vq.py", "configs/demo-vqvae2.yaml", ["train.trainable=decoder"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(RESUME_CASES))
def test_resume_is_exact_with_every_option_on(case, dino_dir, tmp_path):
    script, config, extra = RESUME_CASES[case]
    # constant schedules: a decaying one depends on max_steps, which the resumed run extends from 4 to 6
    schedules = ["train.latent_noise_schedule=constant", "train.mask_ratio_schedule=constant"]
    options = [*ALL_ON, *schedules, f"loss.align_model={dino_dir}", *extra, CONSTANT, "train.checkpoint_every=2"]
    out = tmp_path / "run"
    launch(f"output_dir={out}", "train.max_steps=4", *options, script=script, config=config)
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    launch(f"output_dir={resumed}", "resume=latest", "train.max_steps=6", *options, script=script, config=config)
    assert steps_logged(resumed) == [1, 2, 3, 4, 5, 6]
    straight = tmp_path / "straight"
    launch(f"output_dir={straight}", "train.max_steps=6", *options, script=script, config=config)
    logged = {k for line in (straight / "metrics.jsonl").read_text().splitlines() for k in json.loads(line)}
    assert {"equivariance", "align_cos", "align_dist"} <= logged
    ckpt_a, ckpt_b = resumed / "checkpoints" / "step_00000006", straight / "checkpoints" / "step_00000006"
    projection = load_file(ckpt_b / "model_2.safetensors")
    assert sorted(projection) == ["proj.bias", "proj.weight"], "the projection is checkpointed, alone"
    for name in ("model.safetensors", "model_1.safetensors", "model_2.safetensors"):
        a, b = load_file(ckpt_a / name), load_file(ckpt_b / name)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=f"exact resume differs at {name}:{k}")
    if "train.trainable=decoder" in extra:  # the frozen half, VQ codebooks (EMA buffers) included, never moved
        early, late = (load_file(straight / "checkpoints" / f"step_0000000{s}" / "model.safetensors") for s in (4, 6))
        frozen = [k for k in late if not is_decoder_parameter(k)]
        assert any(k.endswith("embedding") for k in frozen) and any(k.endswith("cluster_size") for k in frozen)
        assert all(torch.equal(early[k], late[k]) for k in frozen)
        assert any(not torch.equal(early[k], late[k]) for k in late if is_decoder_parameter(k))
    # the frozen vision model is in no checkpoint file and the projection in no export
    for path in ckpt_b.glob("*.safetensors"):
        assert not any("patch_embeddings" in k or k.startswith("embeddings.") for k in load_file(path)), path
    for path in (straight / "final").glob("*.safetensors"):
        assert not any(k.startswith("proj.") for k in load_file(path)), path


@pytest.mark.slow
@pytest.mark.parametrize("case", ["kl", "vqvae2"])
def test_two_ranks_stay_identical_with_the_options_on(case, dino_dir, tmp_path):
    script, config = {"kl": ("train/vae.py", "configs/demo-kl.yaml"),
                      "vqvae2": ("train/vq.py", "configs/demo-vqvae2.yaml")}[case]
    out = tmp_path / "ddp"
    launch(f"output_dir={out}", "train.max_steps=3", "train.checkpoint_every=3", *ALL_ON,
           "loss.equivariance_prob=0.5", f"loss.align_model={dino_dir}", script=script, config=config, processes=2)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_processes"] == 2
    assert len(summary["rank_checksums"]) == 2 and len(set(summary["rank_checksums"])) == 1
