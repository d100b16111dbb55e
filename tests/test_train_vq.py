"""End-to-end runs of `train/vq.py`: VQGAN and VQ-VAE-2 demos train, export, resume; 2 ranks agree; the codebook
is used."""

import json
import shutil

import pytest
import torch
from launch import launch, steps_logged
from safetensors.torch import load_file

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("config", ["configs/demo-vq.yaml", "configs/demo-vqvae2.yaml"])
def test_vq_demo_trains_exports_and_resumes(tmp_path, config):
    out = tmp_path / "run"
    # constant LR: a cosine schedule depends on max_steps, which the resumed run below extends from 4 to 6
    constant = "train.lr_schedule=constant"
    launch(f"output_dir={out}", "train.max_steps=4", "train.checkpoint_every=2", constant, script="train/vq.py",
           config=config)
    if "vqvae2" in config:
        from ldtok.models.vqvae2 import VQVAE2

        model, info = VQVAE2.from_pretrained(out / "final", output_loading_info=True)
        assert all(not v for v in info.values()), info
        top, bottom = model.encode_to_indices(torch.zeros(1, 3, 32, 32))
        assert top.shape == (1, 8, 8) and bottom.shape == (1, 16, 16)
    else:
        from diffusers import VQModel

        model, info = VQModel.from_pretrained(out / "final", output_loading_info=True)
        assert all(not v for v in info.values()), info
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    keys = {k for entry in logged for k in entry}
    assert any(k.startswith("codebook_usage_window_pct") for k in keys), keys
    assert any(k.startswith("val/codebook_usage") for k in keys), keys

    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    launch(f"output_dir={resumed}", "resume=latest", "train.max_steps=6", "train.checkpoint_every=2", constant,
           script="train/vq.py", config=config)
    assert steps_logged(resumed) == [1, 2, 3, 4, 5, 6]

    # the resumed run holds exactly the weights *and buffers* of an uninterrupted one: the EMA codebook
    # (`embedding`), its statistics (`cluster_size`, `embed_sum`) and the dead-code bookkeeping (`last_used`)
    straight = tmp_path / "straight"
    launch(f"output_dir={straight}", "train.max_steps=6", "train.checkpoint_every=2", constant, script="train/vq.py",
           config=config)
    a = load_file(resumed / "checkpoints" / "step_00000006" / "model.safetensors")
    b = load_file(straight / "checkpoints" / "step_00000006" / "model.safetensors")
    assert a.keys() == b.keys()
    for buffer in ("embedding", "cluster_size", "embed_sum", "last_used"):
        assert any(k.endswith(buffer) for k in a), (buffer, sorted(a))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=f"exact resume differs at {k}")


def test_two_ranks_hold_identical_codebooks(tmp_path):
    """Different data on each rank; EMA statistics, k-means init and dead-code restarts are all-reduced, so the
    weights *and buffers* (the EMA codebook, cluster sizes, sums) are bit-identical at the end."""
    out = tmp_path / "ddp"
    launch(f"output_dir={out}", "train.max_steps=4", "train.checkpoint_every=4", "model.quantizer.dead_code_steps=2",
           script="train/vq.py", config="configs/demo-vq.yaml", processes=2)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_processes"] == 2
    assert len(set(summary["rank_checksums"])) == 1, summary["rank_checksums"]


def test_demo_vqgan_uses_most_of_its_codebook(tmp_path):
    """A short demo run (k-means init + dead-code restart) ends using most of its 256 codes on validation images."""
    out = tmp_path / "usage"
    launch(f"output_dir={out}", "train.max_steps=40", "train.checkpoint_every=40", "train.val_images=32",
           "loss.disc_start=1000", "train.log_every=10", script="train/vq.py", config="configs/demo-vq.yaml")
    usage = json.loads((out / "summary.json").read_text())["validation"]["codebook_usage"]
    assert usage >= 0.5, usage
