"""End-to-end runs of `train/vae.py` under `accelerate launch --cpu`: train, checkpoint, resume, 2 processes,
bad data, and the exported model inside a diffusers pipeline."""

import json
import re
from pathlib import Path

import pytest
import torch
from launch import launch, steps_logged
from PIL import Image
from safetensors.torch import load_file

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run4(tmp_path_factory):
    """4 steps, checkpoints at 2 and 4."""
    out = tmp_path_factory.mktemp("run") / "vae"
    # constant LR: a cosine schedule depends on max_steps, which the resumed run below extends from 4 to 6
    launch(f"output_dir={out}", "train.max_steps=4", "train.checkpoint_every=2", "train.lr_schedule=constant")
    return out


def test_train_writes_checkpoints_grid_and_final_diffusers_model(run4):
    from diffusers import AutoencoderKL

    assert sorted(p.name for p in (run4 / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]
    for ckpt in (run4 / "checkpoints").iterdir():
        AutoencoderKL.from_pretrained(ckpt / "diffusers")  # every checkpoint is from_pretrained-able
    vae, info = AutoencoderKL.from_pretrained(run4 / "final", output_loading_info=True)
    assert all(not v for v in info.values()), info
    summary = json.loads((run4 / "summary.json").read_text())
    assert summary["steps"] == 4
    assert summary["torch_threads"] == 1  # launch() runs with OMP_NUM_THREADS=1: what a bit-exact rerun needs
    assert summary["latent_statistics"]["scaling_factor"] == pytest.approx(vae.config.scaling_factor)
    grid = Image.open(summary["validation"]["grid"])
    assert grid.size[1] > 2 * 32  # originals above reconstructions
    assert (run4 / "config.yaml").is_file()
    logged = [json.loads(line) for line in (run4 / "metrics.jsonl").read_text().splitlines()]
    terms = {k for entry in logged for k in entry}
    assert {"rec", "perceptual", "kl", "gan", "adaptive_weight", "disc_loss", "val/psnr"} <= terms


def test_a_finished_run_is_not_overwritten_without_resume(run4):
    result = launch(f"output_dir={run4}", "train.max_steps=4", check=False)
    assert result.returncode != 0
    assert "already holds checkpoints" in result.stderr and "resume=latest" in result.stderr
    assert "FileExistsError" not in result.stderr  # a message, not our traceback (accelerate's launcher adds its own)


def test_resume_latest_continues_from_step_4_and_matches_an_uninterrupted_run(run4, tmp_path):
    resumed = tmp_path / "resumed"
    import shutil

    shutil.copytree(run4, resumed)
    result = launch(f"output_dir={resumed}", "resume=latest", "train.max_steps=6", "train.checkpoint_every=2",
                    "train.lr_schedule=constant")
    assert "resumed from" in result.stderr and "step 4" in result.stderr
    steps = steps_logged(resumed)
    assert steps == [1, 2, 3, 4, 5, 6], steps  # steps 5 and 6 appended, nothing restarted from 0
    assert json.loads((resumed / "summary.json").read_text())["steps"] == 6

    straight = tmp_path / "straight"
    launch(f"output_dir={straight}", "train.max_steps=6", "train.checkpoint_every=2", "train.lr_schedule=constant")
    a = load_file(resumed / "checkpoints" / "step_00000006" / "model.safetensors")
    b = load_file(straight / "checkpoints" / "step_00000006" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=f"exact resume differs at {k}")


def test_two_processes_end_with_identical_weights(tmp_path):
    out = tmp_path / "ddp"
    launch(f"output_dir={out}", "train.max_steps=3", "train.checkpoint_every=3", processes=2)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_processes"] == 2
    assert len(summary["rank_checksums"]) == 2 and len(set(summary["rank_checksums"])) == 1


def test_bad_images_are_skipped_and_reported(tmp_path):
    import numpy as np

    data = tmp_path / "bad"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(data / f"ok{i}.png")
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).convert("CMYK").save(data / "cmyk.jpg")
    Image.fromarray(rng.integers(0, 65535, (40, 40), dtype=np.uint16)).save(data / "deep16.png")
    Image.fromarray(rng.integers(0, 255, (40, 40, 4), dtype=np.uint8), "RGBA").save(data / "alpha.png")
    Image.new("RGB", (1, 1), (200, 10, 10)).save(data / "tiny.png")
    good = data / "ok0.png"
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(data / "full.jpg", quality=90)
    (data / "truncated.jpg").write_bytes((data / "full.jpg").read_bytes()[:300])
    assert good.exists()
    out = tmp_path / "run"
    result = launch(f"output_dir={out}", "data.source=folder", f"data.path={data}", "train.max_steps=4",
                    "train.checkpoint_every=4", "train.batch_size=3",
                    "data.val_fraction=0")  # 12 files (no holdout), 4 batches: one whole epoch
    summary = json.loads((out / "summary.json").read_text())
    # CMYK, 16-bit, RGBA and 1x1 images are converted and trained on; only the truncated file is undecodable
    skipped = re.findall(r"skipped an undecodable image: (\S+)", result.stderr)
    assert skipped == ["truncated.jpg"], skipped
    assert summary["skipped_files"] == 1
    assert summary["images_seen"] == 11 and summary["steps"] == 4  # the other 11 files, in 4 batches


def byte_alphabet() -> list[str]:
    """GPT-2/CLIP's printable stand-ins for the 256 byte values."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def tiny_clip_tokenizer(path: Path):
    """A byte-level CLIP tokenizer with no merges, made offline (no hub download)."""
    import inspect

    from transformers import CLIPTokenizer

    chars = byte_alphabet()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": i + len(chars) for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    if "vocab" in inspect.signature(CLIPTokenizer.__init__).parameters:  # transformers >= 5
        return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77), len(vocab)
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(vocab_file=str(path / "vocab.json"), merges_file=str(path / "merges.txt"),
                         model_max_length=77), len(vocab)


def test_exported_vae_runs_inside_a_stable_diffusion_pipeline(run4, tmp_path):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    vae = AutoencoderKL.from_pretrained(run4 / "final")
    tokenizer, vocab_size = tiny_clip_tokenizer(tmp_path / "tok")
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1))
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=vae.config.latent_channels, out_channels=vae.config.latent_channels,
        block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, norm_num_groups=32,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    assert pipe.vae_scale_factor == 2
    image = pipe("a photo of a cat", num_inference_steps=2, height=32, width=32, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 32, 32, 3) and float(image.std()) > 0
