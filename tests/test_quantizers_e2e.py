"""Every quantizer end to end: trains under `train/vq.py`, resumes exactly, exports, loads through `load_tokenizer`,
encodes to shards, decodes, and the prior transformer trains on its tokens."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from launch import launch
from safetensors.torch import load_file

from ldtok.cli import main as ldtok
from ldtok.data import DataConfig, build_dataset
from ldtok.models import load_tokenizer
from ldtok.shards import LatentShardDataset, load_manifest

pytestmark = pytest.mark.slow

# name -> (training config, overrides, exported class, prior overrides)
CHAINS = {
    "fsq": ("configs/demo-fsq.yaml", [], "QuantizedAutoencoder", []),
    "lfq": ("configs/demo-lfq.yaml", [], "QuantizedAutoencoder", ["code_groups=2"]),  # 256 codes: 2 digits of 16
    "bsq": ("configs/demo-lfq.yaml", ["model.quantizer.type=bsq", "model.quantizer.entropy_groups=8"],
            "QuantizedAutoencoder", []),
    "residual": ("configs/demo-vq.yaml", ["model.quantizer.type=residual", "model.quantizer.num_stages=2",
                                          "model.quantizer.codebook_size=16", "model.quantizer.quantize_dropout=0.5"],
                 "QuantizedAutoencoder", []),
    "simvq": ("configs/demo-vq.yaml", ["model.quantizer.ema=false", "model.quantizer.codebook_transform=linear",
                                       "model.quantizer.gradient=rotation"], "VQModel", []),
}
TINY_GPT = ["model.num_layers=1", "model.num_heads=2", "model.hidden_size=32", "model.dropout=0.0",
            "train.batch_size=4", "train.warmup_steps=0", "train.max_steps=2", "train.log_every=1",
            "train.checkpoint_every=0", "num_samples=2", "grid_columns=2", "top_k=null"]


def images(n: int = 2) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1


@pytest.mark.parametrize("name", list(CHAINS))
def test_quantizer_trains_resumes_exports_encodes_decodes_and_feeds_the_prior(tmp_path, name):
    config, overrides, class_name, prior_overrides = CHAINS[name]
    run = tmp_path / "run"
    common = [*overrides, "train.checkpoint_every=2", "train.keep_checkpoints=2"]
    launch(f"output_dir={run}", "train.max_steps=4", *common, script="train/vq.py", config=config)
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(k.startswith("codebook_usage_window_pct") for e in logged for k in e), logged[-1]

    # resume from step 2: the same final weights as the uninterrupted run, bit for bit
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000004")
    shutil.rmtree(resumed / "final")
    launch(f"output_dir={resumed}", "resume=latest", "train.max_steps=4", *common, script="train/vq.py",
           config=config)
    weights = "diffusion_pytorch_model.safetensors"
    a, b = load_file(run / "final" / weights), load_file(resumed / "final" / weights)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs after resuming"

    # the export loads through load_tokenizer, and indices -> images is the eval-mode reconstruction
    assert json.loads((run / "final" / "config.json").read_text())["_class_name"] == class_name
    tok = load_tokenizer(run / "final")
    x = images()
    indices = tok.encode_to_indices(x)
    with torch.no_grad():
        torch.testing.assert_close(tok.decode_indices(indices), tok(x).sample, rtol=0, atol=1e-6)

    # encode to shards (smallest integer dtype; residual: one tensor per stage), read them back, decode them
    shards = tmp_path / "codes"
    assert ldtok(["encode", "--model", str(run / "final"), "--out", str(shards), "--data-source", "default",
                  "--resolution", "32", "--max-samples", "8", "--batch-size", "4", "--samples-per-shard", "8",
                  "--no-progress", "--autocast", "no", "--no-channels-last"]) == 0  # fp32, contiguous: as `tok`
    names = ["indices_stage0", "indices_stage1"] if name == "residual" else ["indices"]
    fields = load_manifest(shards)["fields"]
    assert sorted(set(fields) - {"label"}) == names
    expected = list(indices.shape[-2:])
    assert all(fields[n]["dtype"] == "uint8" and fields[n]["shape"] == expected for n in names)
    stored = LatentShardDataset(shards)[0]
    item = build_dataset(DataConfig(source="default", resolution=32, max_samples=8, crop="center"), train=False)[0]
    assert stored["id"] == item["id"]
    x0 = item["pixel_values"][None]
    codes0 = tok.encode_to_indices(x0)  # (1, h, w), or (1, S, h, w)
    codes0 = codes0[0] if name == "residual" else codes0
    assert all(torch.equal(stored[n], codes0[s]) for s, n in enumerate(names))
    with torch.no_grad():
        torch.testing.assert_close(tok.decode_fields({n: stored[n][None] for n in names}), tok(x0).sample,
                                   rtol=0, atol=1e-6)
    decoded = tmp_path / "decoded"
    assert ldtok(["decode", str(shards), "--model", str(run / "final"), "--out", str(decoded), "--limit", "2"]) == 0
    assert len(list(decoded.glob("*.png"))) == 2

    # the prior transformer trains on the tokens, samples and decodes
    prior = tmp_path / "prior"
    launch(f"shards={shards}", f"output_dir={prior}", *TINY_GPT, *prior_overrides, script="train/prior_transformer.py",
           config="configs/prior-transformer-demo.yaml", tiny=False)
    summary = json.loads((prior / "summary.json").read_text())
    codes = load_file(summary["codes"])
    assert sorted(set(codes) - {"label"}) == names
    assert all(list(codes[n].shape[1:]) == expected and int(codes[n].max()) < tok.codebook_sizes[0] for n in names)
    layout = json.loads((prior / "final" / "prior.json").read_text())["layout"]["levels"][0]
    tokens_per_position = (2 if name == "residual" else 1) * (2 if "code_groups=2" in prior_overrides else 1)
    assert layout["stages"] * layout["groups"] == tokens_per_position
    if name == "residual":  # the stages as summed embeddings: one step per position, every stage sampled in range
        summed = tmp_path / "prior-summed"
        launch(f"shards={shards}", f"output_dir={summed}", *TINY_GPT, "residual_stages=summed",
               script="train/prior_transformer.py", config="configs/prior-transformer-demo.yaml", tiny=False)
        gpt = json.loads((summed / "final" / "transformer" / "config.json").read_text())
        assert gpt["tokens_per_step"] == 2 and gpt["block_size"] == expected[0] * expected[1]
        summary = json.loads((summed / "summary.json").read_text())
        codes = load_file(summary["codes"])
        assert all(list(codes[n].shape[1:]) == expected and int(codes[n].max()) < tok.codebook_sizes[0] for n in names)
        assert (summed / "samples.png").is_file()
