"""`ldtok eval` on binary-code quantizers (LFQ, BSQ): the entropy of every bit, from the code histogram."""

from __future__ import annotations

import math

import pytest
import torch

from ldtok.evaluation import EvalOptions, evaluate_tokenizer
from ldtok.metrics import bit_entropy
from ldtok.models import ModelConfig, build_model
from ldtok.quantizers import QuantizerConfig

TINY = {"block_out_channels": [32, 64], "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 32,
        "sample_size": 32, "mid_block_add_attention": False}


def test_bit_entropy_by_hand():
    # 2 bits, codes 0b00..0b11. Only codes 0b10 and 0b11: the MSB is always 1 (0 bits), the LSB a fair coin (1 bit).
    assert bit_entropy(torch.tensor([0, 0, 5, 5]), bits=2).tolist() == pytest.approx([0.0, 1.0])
    assert bit_entropy(torch.tensor([1, 1, 1, 1]), bits=2).tolist() == pytest.approx([1.0, 1.0])
    # P(MSB = 1) = 3/4: H = -(3/4 log2 3/4 + 1/4 log2 1/4)
    h = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
    assert bit_entropy(torch.tensor([1, 0, 3, 0]), bits=2)[0].item() == pytest.approx(h)
    with pytest.raises(AssertionError, match="histogram"):
        bit_entropy(torch.ones(5), bits=2)


@pytest.mark.parametrize("kind", ["lfq", "bsq"])
def test_eval_reports_the_entropy_of_each_bit(kind):
    from accelerate import Accelerator

    torch.manual_seed(0)
    config = ModelConfig(type="vqgan", **TINY)
    config.quantizer = QuantizerConfig(type=kind, codebook_dim=4)
    model = build_model(config).eval()
    images = [{"pixel_values": torch.rand(3, 32, 32) * 2 - 1, "id": f"img{i}"} for i in range(6)]
    result = evaluate_tokenizer(model, images, accelerator=Accelerator(cpu=True),
                                options=EvalOptions(batch_size=3, perceptual=[], fid="off", progress=False))
    (level,) = result.codebook.values()  # one level
    per_bit = level["bit_entropy"]
    assert len(per_bit) == 4 and all(0.0 <= h <= 1.0 for h in per_bit)
    assert result.value("val/bit_entropy_mean") == pytest.approx(sum(per_bit) / 4)
    assert result.value("val/bit_entropy_min") == pytest.approx(min(per_bit))
