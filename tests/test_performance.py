"""The fast defaults (`ldtok.performance` and the trainer keys behind them): each changes speed, not results."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from launch import launch

from ldtok.losses import LossConfig
from ldtok.models import ModelConfig, build_model
from ldtok.perceptual import build_perceptual
from ldtok.performance import (
    ACCELERATE_ENV,
    adamw,
    bf16_supported,
    enable_tf32,
    perceptual_dtype,
    resolve_mixed_precision,
)
from ldtok.training import TrainConfig

TINY = {"block_out_channels": [32, 64], "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 32,
        "sample_size": 32, "mid_block_add_attention": False}
CPU = torch.device("cpu")


def test_mixed_precision_auto_follows_accelerate_then_the_hardware(monkeypatch):
    monkeypatch.delenv(ACCELERATE_ENV, raising=False)
    assert TrainConfig().mixed_precision == "auto"
    assert resolve_mixed_precision("auto", CPU) == ("bf16" if bf16_supported(CPU) else "no")
    for launched in ("no", "fp16", "bf16"):
        monkeypatch.setenv(ACCELERATE_ENV, launched)  # what `accelerate launch --mixed_precision X` exports
        assert resolve_mixed_precision("auto", CPU) == launched
        assert resolve_mixed_precision("no", CPU) == "no"  # an explicit key overrides Accelerate
        assert resolve_mixed_precision("bf16", CPU) == "bf16"
    with pytest.raises(ValueError, match="fp8"):
        resolve_mixed_precision("fp8", CPU)


def test_channels_last_gives_the_same_gradients():
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    torch.manual_seed(0)
    reference = build_model(ModelConfig(type="kl", deterministic=True, **TINY))
    fast = copy.deepcopy(reference).to(memory_format=torch.channels_last)
    grads = []
    for model, inputs in ((reference, x), (fast, x.to(memory_format=torch.channels_last))):
        model(inputs).sample.square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert fast.vae.encoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert (grads[0] - grads[1]).norm() / grads[0].norm() < 1e-5


def test_fused_adamw_takes_the_same_step():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(64, 32)), torch.nn.Parameter(torch.randn(32))]
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    fused = adamw(params, lr=1e-2, betas=(0.5, 0.9), weight_decay=0.01, device=CPU)
    plain = torch.optim.AdamW(copies, lr=1e-2, betas=(0.5, 0.9), weight_decay=0.01, foreach=False)
    assert fused.defaults["fused"]
    for _ in range(3):
        for group in (params, copies):
            for p, g in zip(group, (torch.ones(64, 32), torch.full((32,), -2.0))):
                p.grad = g.clone()
        fused.step()
        plain.step()
    for a, b in zip(params, copies):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)


def test_tf32_is_switched_on_for_cuda_only():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        enable_tf32(CPU)
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        enable_tf32(torch.device("cuda"))  # only flags: no GPU needed
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("net", ["lpips-vgg", "stlpips-alex"])
def test_perceptual_backbone_runs_in_bf16_and_the_distance_in_fp32(net):
    """`loss.perceptual_precision=bf16`: the backbone's convolutions in bf16, the heads and the distance in fp32,
    the distance within 1% of the fp32 one and its image gradient pointing the same way."""
    torch.manual_seed(0)
    perceptual = build_perceptual(net, random_init=True)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    y = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1)
    seen: dict[str, set] = {"backbone": set(), "heads": set()}
    convs = [m for m in perceptual.net.net.modules() if isinstance(m, torch.nn.Conv2d)]
    convs[0].register_forward_hook(lambda m, i, o: seen["backbone"].add(o.dtype))
    heads = [m for name, m in perceptual.net.named_modules() if name.startswith("lin") and
             isinstance(m, torch.nn.Conv2d)]
    assert heads
    heads[0].register_forward_hook(lambda m, i, o: seen["heads"].add(i[0].dtype))

    def distance_and_grad():
        y_ = y.clone().requires_grad_()
        d = perceptual(x, y_)
        d.sum().backward()
        return d, y_.grad

    d32, g32 = distance_and_grad()
    assert seen == {"backbone": {torch.float32}, "heads": {torch.float32}}
    seen["backbone"].clear(), seen["heads"].clear()
    d16, g16 = perceptual.set_backbone_precision(torch.bfloat16) and distance_and_grad()
    assert seen == {"backbone": {torch.bfloat16}, "heads": {torch.float32}}
    assert d16.dtype == torch.float32 and g16.dtype == torch.float32
    assert torch.allclose(d16, d32, rtol=1e-2)
    # bf16 keeps ~3 significant digits per layer: the image gradient keeps its direction (cosine 0.99 through a
    # random VGG16, 0.998 through the trained ST-LPIPS VGG, on random 64 px images)
    assert torch.nn.functional.cosine_similarity(g16.flatten(), g32.flatten(), dim=0) > 0.98
    assert not any(p.requires_grad for p in perceptual.parameters())  # still frozen


def test_perceptual_precision_auto_follows_bf16_runs_only():
    assert perceptual_dtype("auto", "bf16") == torch.bfloat16
    assert perceptual_dtype("auto", "no") is None and perceptual_dtype("auto", "fp16") is None
    assert perceptual_dtype("fp32", "bf16") is None and perceptual_dtype("bf16", "no") == torch.bfloat16
    with pytest.raises(ValueError, match="perceptual_precision"):
        LossConfig(perceptual_precision="fp16")


@pytest.mark.slow
def test_launch_flag_sets_the_precision_and_workers_train(tmp_path):
    """`accelerate launch --mixed_precision bf16` reaches the run (no config key overrides it); channels-last (the
    default) and DataLoader workers train end to end."""
    run = tmp_path / "run"
    launch(f"output_dir={run}", "train.max_steps=2", "data.num_workers=1", precision="bf16")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["mixed_precision"] == "bf16" and summary["steps"] == 2
    assert summary["perceptual_precision"] == "bf16"  # loss.perceptual_precision=auto follows the bf16 run


@pytest.mark.slow
def test_compiled_models_train_and_export_plain_weights(tmp_path):
    run = tmp_path / "run"
    launch(f"output_dir={run}", "train.max_steps=1", "train.compile=true", "loss.perceptual=none",
           "train.val_images=2")
    config = json.loads((run / "final" / "config.json").read_text())
    assert config["_class_name"] == "AutoencoderKL"
    from safetensors.torch import load_file

    keys = load_file(run / "final" / "diffusion_pytorch_model.safetensors")
    assert not any("_orig_mod" in k for k in keys)  # the export is of the module, not the compiled wrapper
